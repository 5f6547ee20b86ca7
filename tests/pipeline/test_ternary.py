"""BitNet b1.58 layers: the quantizers' grids, STE gradients, Hadamard rotations that change
nothing before quantization, the 2-bit packing, and the integer inference path equal to the
fake-quantized training path (so a packed head answers what the trained head answered)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.ternary import (
    BitLinear,
    PackedBitLinear,
    TernaryError,
    activation_quant,
    fake_weight,
    hadamard_block_size,
    hadamard_matrix,
    pack_bitlinear,
    pack_ternary,
    quantization_loss,
    unpack_ternary,
    weight_quant,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_weight_quant_is_ternary_with_absmean_scale():
    w = torch.randn(32, 48, generator=_gen())
    q, gamma = weight_quant(w)
    assert set(q.unique().tolist()) == {-1.0, 0.0, 1.0}
    assert torch.allclose(gamma, w.abs().mean())
    assert torch.equal(fake_weight(w), q * gamma)
    zero_q, _ = weight_quant(torch.zeros(3, 4))
    assert torch.equal(zero_q, torch.zeros(3, 4))


def test_activation_quant_uses_the_int8_grid_per_token():
    x = torch.randn(4, 7, 16, generator=_gen()) * torch.linspace(0.01, 100, 7).view(1, 7, 1)
    y = activation_quant(x)
    scale = 127 / x.abs().amax(-1, keepdim=True)
    grid = y * scale
    assert torch.allclose(grid, grid.round(), atol=1e-3)
    assert torch.allclose(grid.abs().amax(-1), torch.full((4, 7), 127.0))
    assert (y - x).abs().max() <= (0.5 / scale).max() * 1.001
    assert torch.equal(activation_quant(torch.zeros(2, 5)), torch.zeros(2, 5))


def test_ste_gradients_reach_the_latent_weight_and_the_input():
    layer = BitLinear(16, 8, bias=True)
    x = torch.randn(5, 16, generator=_gen(), requires_grad=True)
    g = torch.randn(5, 8, generator=_gen(1))
    (layer(x) * g).sum().backward()
    # STE: the weight gradient is that of F.linear(xq, W) at the quantized input.
    xq = activation_quant(layer._prepare(x.detach()))  # [5, 16] after the RMS norm
    assert torch.allclose(layer.weight.grad, g.T @ xq, atol=1e-5)
    assert torch.allclose(layer.bias.grad, g.sum(0))
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_quantizers_pass_the_identity_gradient():
    for quantize in (activation_quant, fake_weight):
        x = torch.randn(6, 10, generator=_gen(), requires_grad=True)
        g = torch.randn(6, 10, generator=_gen(1))
        (quantize(x) * g).sum().backward()
        assert torch.equal(x.grad, g)


def test_quantization_loss_sums_layers_and_has_a_gradient():
    model = nn.Sequential(BitLinear(16, 8), nn.ReLU(), BitLinear(8, 4, hadamard=True))
    loss = quantization_loss(model)
    expected = sum(F.mse_loss(m.weight, fake_weight(m.weight)) for m in (model[0], model[2]))
    assert torch.allclose(loss, expected)
    loss.backward()
    assert model[0].weight.grad.abs().sum() > 0
    assert quantization_loss(nn.Linear(3, 3)).item() == 0.0


@pytest.mark.parametrize("n", [1, 8, 64, 576, 896])
def test_hadamard_is_orthonormal(n):
    h = hadamard_matrix(n)
    assert torch.allclose(h @ h.T, torch.eye(n), atol=1e-5)
    b = hadamard_block_size(n)
    assert torch.allclose(h[:b, :b].abs(), torch.full((b, b), b ** -0.5))
    assert hadamard_block_size(576) == 64


def test_hadamard_needs_a_usable_block():
    with pytest.raises(TernaryError, match="hadamard=False"):
        BitLinear(6, 4, hadamard=True)


@pytest.mark.parametrize("hadamard", [False, True])
def test_from_linear_computes_the_float_layer_before_quantization(hadamard):
    w, b = torch.randn(24, 576, generator=_gen()), torch.randn(24, generator=_gen(1))
    layer = BitLinear.from_linear(w, b, hadamard=hadamard)
    x = torch.randn(3, 5, 576, generator=_gen(2))
    assert torch.allclose(layer(x, quantize=False), F.linear(x, w, b), atol=1e-4)
    if hadamard:  # the latent weight is the float one in the rotated basis
        assert torch.allclose(layer.weight, w @ hadamard_matrix(576).T, atol=1e-5)


def test_hadamard_shrinks_an_outlier_channel():
    x = torch.randn(64, 576, generator=_gen())
    x[:, 7] *= 50
    rotated = BitLinear(576, 4, hadamard=True, norm=False)._prepare(x)
    ratio = lambda t: (t.abs().amax(-1) / t.pow(2).mean(-1).sqrt()).mean()
    assert ratio(rotated) < ratio(x) / 2


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (17, 13), (4096, 64)])
def test_pack_unpack_round_trip(shape):
    q = torch.randint(-1, 2, shape, generator=_gen(), dtype=torch.int8)
    packed = pack_ternary(q)
    assert packed.dtype == torch.uint8 and packed.numel() == (q.numel() + 3) // 4
    assert torch.equal(unpack_ternary(packed, shape), q)
    with pytest.raises(TernaryError):
        pack_ternary(torch.tensor([2], dtype=torch.int8))
    with pytest.raises(TernaryError):
        unpack_ternary(packed, (shape[0] + 4, shape[1]))


def _assert_same_outputs(fake: torch.Tensor, packed: torch.Tensor) -> None:
    """Equal to float rounding, and the same argmax on every row (up to exact integer ties)."""
    scale = fake.abs().amax(-1, keepdim=True)
    assert ((fake - packed).abs() <= 1e-5 * scale + 1e-6).all()
    fake2, packed2 = fake.reshape(-1, fake.shape[-1]), packed.reshape(-1, packed.shape[-1])
    same = fake2.argmax(-1) == packed2.argmax(-1)
    tied = torch.isclose(fake2.gather(1, packed2.argmax(-1, keepdim=True)).squeeze(1), fake2.amax(-1),
                         rtol=1e-6, atol=0)
    assert (same | tied).all()
    assert same.float().mean() > 0.95


@pytest.mark.parametrize("hadamard,norm,bias", [(False, False, False), (True, False, True), (False, True, True),
                                                (True, True, False)])
def test_packed_equals_fake_quant(hadamard, norm, bias, tmp_path):
    layer = BitLinear(64, 4096, bias=bias, hadamard=hadamard, norm=norm)  # a vocab-sized projection
    x = torch.randn(2, 32, 64, generator=_gen(3)) * 3
    with torch.no_grad():
        fake = layer(x)
    save_file(pack_bitlinear(layer), tmp_path / "head.safetensors")
    packed_layer = PackedBitLinear.from_packed(load_file(tmp_path / "head.safetensors"))
    assert packed_layer.weight_q.dtype == torch.int8
    assert not any(t.is_floating_point() and t.numel() >= 64 * 4096 for t in packed_layer.state_dict().values())
    _assert_same_outputs(fake, packed_layer(x))
    _assert_same_outputs(fake, PackedBitLinear.from_bitlinear(layer)(x))


def test_packed_single_token_and_smollm_width():
    layer = BitLinear.from_linear(torch.randn(512, 576, generator=_gen()) * 0.02, hadamard=True)
    packed = PackedBitLinear.from_packed(pack_bitlinear(layer))
    x = torch.randn(1, 576, generator=_gen(1))
    with torch.no_grad():
        _assert_same_outputs(layer(x), packed(x))


def test_packed_dict_is_checked():
    d = pack_bitlinear(BitLinear(8, 4))
    del d["gamma"]
    with pytest.raises(TernaryError, match="gamma"):
        PackedBitLinear.from_packed(d)
