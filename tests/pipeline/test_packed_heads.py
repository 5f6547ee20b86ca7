"""Inference heads and gates loaded from the quantize stage's packed file compute what the
fake-quantized training modules compute, hold no float copy of a ternary matrix, and refuse a
packed dict that does not fit with a message naming the keys."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flows.stages.quantize import packed_state
from pipeline.config import GatesConfig, HeadsConfig, QuantizeConfig
from pipeline.gates import build_gates
from pipeline.heads import build_heads
from pipeline.packed_heads import load_packed_gates, load_packed_heads
from pipeline.quantize import build_ternary_gates, build_ternary_heads
from pipeline.teacher import TeacherWeights
from pipeline.ternary import BitLinear, PackedBitLinear

HIDDEN, VOCAB, LAYERS, RANK = 64, 300, [1, 2], 8


def _teacher(norm_kind: str) -> TeacherWeights:
    """Random teacher; the LayerNorm one has biases on the norm and the LM head, so every
    optional float tensor of the packed file is exercised."""
    g = torch.Generator().manual_seed(0)
    layer = norm_kind == "layer"
    return TeacherWeights(
        lm_head=torch.randn(VOCAB, HIDDEN, generator=g) / HIDDEN**0.5,
        final_norm=1 + 0.3 * torch.randn(HIDDEN, generator=g),
        lm_head_bias=0.1 * torch.randn(VOCAB, generator=g) if layer else None,
        final_norm_bias=0.1 * torch.randn(HIDDEN, generator=g) if layer else None,
        norm_kind=norm_kind,
    )


def _perturb(modules: nn.ModuleDict, seed: int) -> nn.ModuleDict:
    """Move every float parameter off its init (an adapter's up-map starts at zero, a norm at
    the teacher's), as training would, so a head that loaded the wrong tensor cannot match."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in modules.parameters():
            p.add_(0.2 * p.abs().mean().clamp_min(0.1) * torch.randn(p.shape, generator=g))
    return modules


def _round_trip(modules: nn.ModuleDict, tmp_path) -> dict[str, torch.Tensor]:
    """What the quantize stage writes (its own `packed_state`), read back from safetensors."""
    save_file(packed_state(modules), tmp_path / "packed.safetensors")
    return load_file(tmp_path / "packed.safetensors")


def _hidden(n: int = 300) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    h = torch.randn(n, HIDDEN, generator=g) * 3  # [n, H]
    h[:, 5] *= 40  # an outlier channel, as middle layers have
    return h


def _assert_close_rows(got: torch.Tensor, want: torch.Tensor, chained: bool) -> None:
    """Each row's largest difference, relative to its largest |value|, is float rounding
    (1e-5) on nearly every row and 1e-4 on all of them for a single ternary layer. Where one
    ternary layer feeds another (adapter down -> up, gate mlp.0 -> mlp.2) the second one
    requantizes the first's output to int8, so a float rounding difference can move one
    activation across a rounding boundary: a few rows then differ by that one step (~2e-4)."""
    rel = (got - want).abs().amax(-1) / want.abs().amax(-1).clamp_min(1e-30)  # [n] (or [] for a gate)
    assert float(rel.max()) <= (1e-3 if chained else 1e-4), float(rel.max())
    assert float((rel <= 1e-5).float().mean()) >= 0.98, float((rel <= 1e-5).float().mean())


def _assert_same_logits(got: torch.Tensor, want: torch.Tensor, chained: bool) -> None:
    _assert_close_rows(got, want, chained)
    # The packed sums are integers, so two vocab rows can tie exactly for the top (a linear head
    # of 64 channels: ~1% of rows); the float path then picks either by rounding noise. Every
    # other row has the same argmax, and a tied row's training argmax is one of the tied maxima.
    top = got.amax(dim=-1, keepdim=True)  # [n, 1]
    tied = (got == top).sum(-1) > 1  # [n]
    assert torch.equal(got.argmax(-1)[~tied], want.argmax(-1)[~tied])
    assert (got.gather(1, want.argmax(-1, keepdim=True)) == top).all()
    assert tied.float().mean() < 0.05, int(tied.sum())


def _assert_no_float_ternary_matrix(ternary: nn.ModuleDict, packed_modules: nn.ModuleDict, n_layers: int) -> None:
    shapes = {tuple(m.weight.shape) for m in ternary.modules() if isinstance(m, BitLinear)}
    assert not any(isinstance(m, BitLinear) for m in packed_modules.modules())
    packed_layers = [m for m in packed_modules.modules() if isinstance(m, PackedBitLinear)]
    assert len(packed_layers) == n_layers and all(m.weight_q.dtype == torch.int8 for m in packed_layers)
    tensors = [*packed_modules.named_parameters(), *packed_modules.named_buffers()]
    floats = [name for name, t in tensors if t.is_floating_point() and tuple(t.shape) in shapes]
    assert not floats, f"float copies of ternary matrices: {floats}"


@pytest.mark.parametrize("norm_kind", ["rms", "layer"])
@pytest.mark.parametrize("kind", ["linear", "adapter"])
@pytest.mark.parametrize("hadamard", [False, True])
def test_packed_heads_equal_the_fake_quant_training_heads(tmp_path, kind, hadamard, norm_kind):
    teacher = _teacher(norm_kind)
    cfg = HeadsConfig(kind=kind, rank=RANK, layers=LAYERS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        float_heads = _perturb(build_heads(cfg, LAYERS, teacher), seed=2)
    ternary = build_ternary_heads(float_heads, QuantizeConfig(hadamard=hadamard), teacher)
    heads = load_packed_heads(cfg, LAYERS, teacher, _round_trip(ternary, tmp_path))

    assert list(heads) == [str(layer) for layer in LAYERS]
    _assert_no_float_ternary_matrix(ternary, heads, len(LAYERS) * (1 if kind == "linear" else 2))
    if kind == "adapter":  # one shared frozen float LM head, as in training
        assert heads["1"].lm_head is heads["2"].lm_head
    h = _hidden()  # [n, H]
    ids = torch.randint(0, VOCAB, (h.shape[0], 7), generator=torch.Generator().manual_seed(3))  # [n, k]
    with torch.no_grad():
        for key in heads:
            want, got = ternary[key](h), heads[key](h)  # [n, V]
            _assert_same_logits(got, want, chained=kind == "adapter")
            feats = heads[key].features(h)  # [n, H]
            # an adapter's up-map requantizes down's output: a float rounding difference may move
            # one of its int8 activations across a rounding boundary, hence a looser bound here
            want_feats = ternary[key].features(h)  # [n, H]
            assert ((feats - want_feats).abs() <= 1e-3 * want_feats.abs().amax(-1, keepdim=True)).all()
            # subset and per-row scoring read the same weights (and gamma) as the full projection
            torch.testing.assert_close(heads[key].project(feats, ids[0]), got[:, ids[0]])
            torch.testing.assert_close(heads[key].project_rows(feats, ids), got.gather(1, ids))


@pytest.mark.parametrize("hadamard", [False, True])
def test_packed_gates_equal_the_fake_quant_training_gates(tmp_path, hadamard):
    teacher = _teacher("layer")
    cfg = GatesConfig(hidden_ratio=4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        float_gates = _perturb(build_gates(cfg, LAYERS, teacher), seed=4)
        for g in float_gates.values():  # confidence features with non-trivial statistics
            g.set_feature_stats(torch.randn(g.num_features), torch.rand(g.num_features) + 0.5)
        c = torch.randn(_hidden().shape[0], 4)  # [n, 4] the heads' confidence features
    assert all(g.num_features for g in float_gates.values())
    ternary = build_ternary_gates(float_gates, QuantizeConfig(hadamard=hadamard), teacher)
    gates = load_packed_gates(cfg, teacher, _round_trip(ternary, tmp_path))
    for key, g in gates.items():
        assert g.features == float_gates[key].features
        assert torch.equal(g.feature_std, float_gates[key].feature_std)

    assert list(gates) == [str(layer) for layer in LAYERS]
    _assert_no_float_ternary_matrix(ternary, gates, 2 * len(LAYERS))
    h = _hidden()
    with torch.no_grad():
        for key in gates:
            want, got = ternary[key](h, c), gates[key](h, c)  # [n]
            rel = (got - want).abs() / want.abs().max()  # [n]: relative to the largest logit
            assert float(rel.max()) <= 1e-3 and float((rel <= 1e-5).float().mean()) >= 0.98  # chained, as above
            torch.testing.assert_close(gates[key].exit_probability(h, c), ternary[key].exit_probability(h, c),
                                       atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def packed_adapters():
    teacher = _teacher("rms")
    cfg = HeadsConfig(kind="adapter", rank=RANK, layers=LAYERS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ternary = build_ternary_heads(_perturb(build_heads(cfg, LAYERS, teacher), 2), QuantizeConfig(), teacher)
    return teacher, cfg, packed_state(ternary)


def test_missing_and_unexpected_keys_are_named_with_the_fix(packed_adapters):
    teacher, cfg, packed = packed_adapters
    broken = {k: v for k, v in packed.items() if k not in ("1.down.gamma", "2.norm.weight")}
    broken["3.norm.weight"] = packed["1.norm.weight"]
    with pytest.raises(ValueError) as e:
        load_packed_heads(cfg, LAYERS, teacher, broken)
    msg = str(e.value)
    assert "missing keys ['1.down.gamma', '2.norm.weight']" in msg and "unexpected keys ['3.norm.weight']" in msg
    assert "load with the 'adapter' heads config" in msg

    # another layer set, another rank, another kind: each names what does not fit
    with pytest.raises(ValueError, match=r"unexpected keys \['2\.down"):
        load_packed_heads(cfg, [1], teacher, packed)
    with pytest.raises(ValueError, match=r"1\.down is \[8, 64\], expected \[4, 64\]"):
        load_packed_heads(cfg.model_copy(update={"rank": 4}), LAYERS, teacher, packed)
    with pytest.raises(ValueError, match=r"missing keys \['1\.proj\.packed"):
        load_packed_heads(cfg.model_copy(update={"kind": "linear"}), LAYERS, teacher, packed)


def test_packed_gates_missing_keys_and_width_are_named(tmp_path):
    teacher = _teacher("layer")
    cfg = GatesConfig(hidden_ratio=4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        packed = packed_state(build_ternary_gates(build_gates(cfg, LAYERS, teacher), QuantizeConfig(), teacher))
    with pytest.raises(ValueError, match=r"missing keys \['2\.mlp\.0\.bias'\].*hidden_ratio 4"):
        load_packed_gates(cfg, teacher, {k: v for k, v in packed.items() if k != "2.mlp.0.bias"})
    with pytest.raises(ValueError, match=r"1\.mlp\.0 is \[16, 64\], expected \[32, 64\]"):
        load_packed_gates(GatesConfig(hidden_ratio=2), teacher, packed)
    nan = {**packed, "1.norm.weight": torch.full_like(packed["1.norm.weight"], float("nan"))}
    with pytest.raises(ValueError, match=r"1\.norm\.weight is \[64\] non-finite"):
        load_packed_gates(cfg, teacher, nan)
    with pytest.raises(ValueError, match="gates.packed.safetensors of a quantize artifact"):
        load_packed_gates(cfg, teacher, {})
