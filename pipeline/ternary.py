"""BitNet b1.58 layers for exit heads: ternary weights, 8-bit activations, packed export and
an integer CPU inference path.

A float32 exit head over SmolLM2's vocabulary is a 49152 x 576 matrix (113 MB); each exit
layer that ships one pays that again. Quantization-aware training with `BitLinear` makes the
head ternary: W~ = gamma * q with q in {-1, 0, 1} and gamma = mean(|W|) per tensor (BitNet
b1.58's absmean), while activations are quantized per token to int8 by their absmax. Training
keeps a latent float weight and passes gradients straight through both roundings (STE).

For inference the same numbers are exact integers: y = (gamma / s) * (x_int . q) + b, where
x_int = round(s * x) and s = 127 / max|x| per token. `pack_bitlinear` stores q at 2 bits per
weight (16x smaller than float32 on disk); `PackedBitLinear` unpacks once at load into an
int8 [out, in] buffer (4x smaller resident than float32) and computes `x_int . q` with an
int8 x int8 -> int32 matmul (`torch._int_mm`, which runs on CPU through oneDNN/VNNI for any
row count), so no float weight is ever formed. Integer sums of at most in_features * 128
stay far below 2^24, so the result equals the fake-quantized float path up to the rounding of
the final scale multiply.

H-BitLinear rotates the input by an orthonormal Hadamard matrix before the activation
quantizer: the rotation spreads an outlier channel over many channels, so the per-token
absmax, and with it the int8 step, shrinks. The weight lives in the same rotated basis
(W' = W H^T), so W' (H x) = W x and a head built `from_linear` computes exactly what the float
head did before any quantization noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

ACT_BITS = 8
"""Activation bits of BitLinear; the packed path's int8 matmul needs exactly 8."""
WEIGHT_EPS = 1e-5
"""Added to gamma before dividing, so an all-zero weight quantizes to zeros, not NaN."""
ACT_EPS = 1e-5
"""Floor of a token's absmax, so an all-zero token quantizes to zeros, not NaN."""
NORM_EPS = 1e-6
"""eps of the parameter-free RMS normalisation in front of the activation quantizer."""
MIN_HADAMARD_BLOCK = 8
"""Smallest Hadamard block BitLinear accepts: a block of 1-4 channels barely spreads outliers."""
_CODE_ZERO = 1  # 2-bit code of q = 0 (codes are q + 1), also the padding code
_UNPACK_CHUNK = 1 << 20  # packed bytes unpacked at a time, bounding the transient memory at load


class TernaryError(ValueError):
    """A ternary layer or packed dict cannot be built as asked; the message says how to fix it."""


# ----------------------------------------------------------------------------- quantizers

class _StraightThrough(torch.autograd.Function):
    """Forward fn(x), backward the identity to x: the straight-through estimator.

    One pass over x in the forward (no `x + (y - x).detach()` temporaries), which matters for a
    vocabulary-sized weight re-quantized at every step.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return fn(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def weight_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary q in {-1, 0, 1} (float) and the per-tensor absmean scale gamma (BitNet b1.58).

    gamma = mean(|w|) makes round(w / gamma) keep the weights near the mean magnitude at +-1 and
    zero out the small ones: about a third of a Gaussian matrix becomes 0.
    """
    gamma = w.abs().mean()  # []
    q = torch.div(w, gamma + WEIGHT_EPS).round_().clamp_(-1, 1)  # [out, in] in {-1, 0, 1}
    return q, gamma


def _dequantized_weight(w: torch.Tensor) -> torch.Tensor:
    q, gamma = weight_quant(w)
    return q.mul_(gamma)  # [out, in]


def fake_weight(w: torch.Tensor) -> torch.Tensor:
    """q * gamma in the forward, gradient of the identity to the latent w (STE)."""
    return _StraightThrough.apply(w, _dequantized_weight)  # [out, in]


def _quantize_activations(x: torch.Tensor, bits: int = ACT_BITS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax quantization: the integer grid values (as float) and the scale s.

    x ~ x_int / s with s = qmax / max|x| over the last dim, x_int in [-2^(bits-1), 2^(bits-1) - 1].
    Shared by the fake-quant forward and the packed integer path, so both round identically.
    """
    qmax = 2 ** (bits - 1) - 1
    scale = qmax / x.abs().amax(dim=-1, keepdim=True).clamp(min=ACT_EPS)  # [..., 1]
    x_int = torch.clamp(torch.round(x * scale), -qmax - 1, qmax)  # [..., in]
    return x_int, scale


def activation_quant(x: torch.Tensor, bits: int = ACT_BITS) -> torch.Tensor:
    """x rounded to its per-token int grid and dequantized; gradient of the identity (STE)."""
    if not 2 <= bits <= 16:
        raise TernaryError(f"activation bits must be in [2, 16], got {bits}")
    def dequantize(t: torch.Tensor) -> torch.Tensor:
        t_int, scale = _quantize_activations(t, bits)
        return t_int.div_(scale)  # [..., in]

    return _StraightThrough.apply(x, dequantize)  # [..., in]


def rms_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / rms(x) over the last dim, without a gain: the norm in front of the quantizer.

    Gives every token the same scale before absmax rounding, so the int8 grid is used evenly.
    """
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + NORM_EPS)  # [..., in]


# ----------------------------------------------------------------------------- Hadamard

def hadamard_block_size(n: int) -> int:
    """Largest power of two dividing n: the block of `hadamard_matrix(n)` (576 -> 64)."""
    if n < 1:
        raise TernaryError(f"Hadamard size must be positive, got {n}")
    return n & -n


def _sylvester(b: int) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix of a power-of-two size b (symmetric, entries +-1/sqrt(b))."""
    h = torch.ones(1, 1)
    while h.shape[0] < b:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]]), h)  # [2k, 2k]
    return h / math.sqrt(b)  # [b, b]


def hadamard_matrix(n: int) -> torch.Tensor:
    """Orthonormal [n, n] rotation: block-diagonal copies of the Sylvester-Hadamard matrix of
    the largest power of two dividing n (a single full Hadamard when n is a power of two).

    Why block-diagonal rather than zero-padding to the next power of two (576 -> 1024): padding
    makes the rotated basis 1024 wide, so the ternary weight stored, unpacked and multiplied
    grows 1.78x, which is what the packed head exists to avoid, and it is no longer a square
    rotation of the input. Blocks keep the layer n wide, are exactly orthonormal (H H^T = I),
    and cost n * b multiply-adds per token (576 * 64, against 576 * 49152 for the head); each
    outlier is spread over b = 64 channels, enough to shrink the absmax that sets the int8 step.
    """
    b = hadamard_block_size(n)
    return torch.block_diag(*([_sylvester(b)] * (n // b)))  # [n, n]


def _rotate(x: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """x @ H^T for the block-diagonal H made of `block`, in O(n * b) per row."""
    b = block.shape[0]
    y = x.unflatten(-1, (x.shape[-1] // b, b)) @ block.mT  # [..., n / b, b]
    return y.flatten(-2)  # [..., n]


# ----------------------------------------------------------------------------- BitLinear

class BitLinear(nn.Module):
    """Linear layer trained for ternary weights and int8 activations (BitNet b1.58).

    forward: [norm] -> [Hadamard] -> activation_quant -> F.linear(., fake_weight(W), b).
    `weight` is the latent float matrix, in the rotated basis when `hadamard`. `norm=False`
    is for callers that normalise already (exit heads apply the backbone's final norm).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, hadamard: bool = False,
                 norm: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.hadamard, self.norm = hadamard, norm
        self.weight = nn.Parameter(torch.empty(out_features, in_features))  # [out, in]
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None  # [out]
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's init
        if bias:
            bound = 1 / math.sqrt(in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        if hadamard:
            b = hadamard_block_size(in_features)
            if b < MIN_HADAMARD_BLOCK:
                raise TernaryError(f"hadamard=True needs in_features divisible by {MIN_HADAMARD_BLOCK} "
                                   f"(got {in_features}, block {b}); use hadamard=False")
            self.register_buffer("hadamard_block", _sylvester(b), persistent=False)  # [b, b]
        else:
            self.hadamard_block = None

    @classmethod
    def from_linear(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *, hadamard: bool = False,
                    norm: bool = False) -> BitLinear:
        """Start from a trained float matrix [out, in]; rotated as W H^T when `hadamard`, so
        that before quantization the layer computes exactly `F.linear(x, weight, bias)`."""
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias=bias is not None, hadamard=hadamard, norm=norm)
        w = weight.detach().to(torch.float32)  # [out, in]
        if hadamard:
            w = _rotate(w, layer.hadamard_block)  # [out, in] rows H w_o, i.e. W H^T
        with torch.no_grad():
            layer.weight.copy_(w)
            if bias is not None:
                layer.bias.copy_(bias.detach().to(torch.float32))
        return layer

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the quantizer sees it: normalised and rotated as configured."""
        x = x.to(self.weight.dtype)  # [..., in]
        if self.norm:
            x = rms_normalize(x)  # [..., in]
        if self.hadamard_block is not None:
            x = _rotate(x, self.hadamard_block)  # [..., in]
        return x

    def forward(self, x: torch.Tensor, *, quantize: bool = True) -> torch.Tensor:
        """x [..., in] -> [..., out]; `quantize=False` is the float layer (no rounding at all)."""
        x = self._prepare(x)  # [..., in]
        if not quantize:
            return F.linear(x, self.weight, self.bias)  # [..., out]
        return F.linear(activation_quant(x), fake_weight(self.weight), self.bias)  # [..., out]

    def quantization_loss(self) -> torch.Tensor:
        """MSE(W, W~) with W~ = q * gamma: the lambda_q term pulling latent weights onto the grid.

        Not the STE W~ (W - STE(W) has zero gradient): q is a constant of w (round has zero
        derivative almost everywhere) and gamma = mean|w| keeps its gradient.
        """
        q, gamma = weight_quant(self.weight)
        return F.mse_loss(self.weight, q.detach() * gamma)  # []

    @torch.no_grad()
    def ternary_state(self) -> dict[str, torch.Tensor | None]:
        """q (int8 [out, in]), gamma (float32 []) and bias (float32 [out] or None) for packing."""
        q, gamma = weight_quant(self.weight.float())
        return {"q": q.to(torch.int8), "gamma": gamma.float(),
                "bias": None if self.bias is None else self.bias.detach().float().clone()}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, hadamard={self.hadamard}, norm={self.norm}")


def quantization_loss(module: nn.Module) -> torch.Tensor:
    """Sum of `BitLinear.quantization_loss` over every BitLinear in `module` (0 if none)."""
    losses = [m.quantization_loss() for m in module.modules() if isinstance(m, BitLinear)]
    if not losses:
        param = next(module.parameters(), None)
        return torch.zeros((), device=None if param is None else param.device)
    return torch.stack(losses).sum()  # []


# ----------------------------------------------------------------------------- packing

def pack_ternary(q: torch.Tensor) -> torch.Tensor:
    """Ternary int8 values -> uint8, 4 per byte (2-bit codes q + 1, first value in the low bits).

    Row-major over q; the tail is padded with the code of 0. [*shape] -> [ceil(numel / 4)].
    """
    flat = q.reshape(-1)
    if flat.numel() and (flat.min() < -1 or flat.max() > 1):
        raise TernaryError(f"pack_ternary takes values in {{-1, 0, 1}}, got [{int(flat.min())}, {int(flat.max())}]")
    codes = (flat.to(torch.int16) + 1).to(torch.uint8)  # [numel] in {0, 1, 2}
    pad = (-codes.numel()) % 4
    if pad:
        codes = torch.cat([codes, codes.new_full((pad,), _CODE_ZERO)])  # [4 * nbytes]
    c = codes.view(-1, 4)  # [nbytes, 4]
    return c[:, 0] | (c[:, 1] << 2) | (c[:, 2] << 4) | (c[:, 3] << 6)  # [nbytes] uint8


def unpack_ternary(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of `pack_ternary`: uint8 [nbytes] -> int8 values in {-1, 0, 1} of `shape`.

    Unpacks a few MB at a time into the preallocated result, so loading a vocab-sized head
    does not hold several full-size temporaries at once.
    """
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (numel + 3) // 4:
        raise TernaryError(f"packed must be uint8 [{(numel + 3) // 4}] for shape {tuple(shape)}, "
                           f"got {packed.dtype} {tuple(packed.shape)}")
    out = torch.empty(packed.numel() * 4, dtype=torch.int8, device=packed.device)  # [4 * nbytes]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)  # [4]
    for s in range(0, packed.numel(), _UNPACK_CHUNK):
        chunk = packed[s:s + _UNPACK_CHUNK]  # [c]
        codes = (chunk.unsqueeze(-1) >> shifts) & 3  # [c, 4]
        out[4 * s:4 * (s + chunk.numel())] = codes.view(-1).to(torch.int8) - 1
    return out[:numel].view(tuple(shape))


def pack_bitlinear(layer: BitLinear) -> dict[str, torch.Tensor]:
    """A BitLinear as flat tensors for safetensors: everything `PackedBitLinear` needs.

    Keys: packed (uint8), gamma (float32 [1]), shape (int64 [2]), hadamard, norm (uint8 [1]
    flags) and bias (float32 [out], only when the layer has one). Prefix the keys to store
    several layers in one file.
    """
    state = layer.ternary_state()
    d = {
        "packed": pack_ternary(state["q"]).cpu(),  # [ceil(out * in / 4)]
        "gamma": state["gamma"].reshape(1).cpu(),  # [1]
        "shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64),  # [2]
        "hadamard": torch.tensor([int(layer.hadamard)], dtype=torch.uint8),  # [1]
        "norm": torch.tensor([int(layer.norm)], dtype=torch.uint8),  # [1]
    }
    if state["bias"] is not None:
        d["bias"] = state["bias"].cpu()  # [out]
    return d


def _int8_matmul(x_int: torch.Tensor, weight_q: torch.Tensor) -> torch.Tensor:
    """x_int [m, in] int8 times weight_q^T ([out, in] int8) -> int32 [m, out], exactly.

    CPU `torch._int_mm` takes any m; CUDA needs m > 16, so short batches are zero-padded there.
    """
    m = x_int.shape[0]
    if x_int.is_cuda and m <= 16:
        x_int = torch.cat([x_int, x_int.new_zeros(17 - m, x_int.shape[1])])  # [17, in]
    return torch._int_mm(x_int, weight_q.t())[:m]  # [m, out] int32


class PackedBitLinear(nn.Module):
    """Inference form of a BitLinear: int8 ternary weights, int8 activations, int32 sums.

    Weights are unpacked once at load ([out, in] int8: a quarter of float32's resident memory)
    and never converted to float; y = acc * (gamma / s) + bias with acc = x_int . q.
    """

    def __init__(self, weight_q: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None = None,
                 hadamard: bool = False, norm: bool = False):
        super().__init__()
        if weight_q.dtype != torch.int8 or weight_q.dim() != 2:
            raise TernaryError(f"weight_q must be int8 [out, in], got {weight_q.dtype} {tuple(weight_q.shape)}")
        self.out_features, self.in_features = weight_q.shape
        self.hadamard, self.norm = hadamard, norm
        self.register_buffer("weight_q", weight_q.contiguous())  # [out, in] int8
        # Own copies: a tensor read by safetensors may view the whole file's buffer and keep it alive.
        self.register_buffer("gamma", gamma.detach().float().reshape(()).clone())  # []
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())  # [out]
        block = _sylvester(hadamard_block_size(self.in_features)) if hadamard else None
        self.register_buffer("hadamard_block", block, persistent=False)  # [b, b]

    @classmethod
    def from_packed(cls, d: dict[str, torch.Tensor]) -> PackedBitLinear:
        """Build from `pack_bitlinear`'s dict (e.g. read back with safetensors' load_file)."""
        missing = [k for k in ("packed", "gamma", "shape", "hadamard", "norm") if k not in d]
        if missing:
            raise TernaryError(f"packed BitLinear dict lacks {missing}; write it with pack_bitlinear")
        shape = tuple(int(v) for v in d["shape"].tolist())
        return cls(unpack_ternary(d["packed"], shape), d["gamma"], d.get("bias"),
                   hadamard=bool(d["hadamard"].item()), norm=bool(d["norm"].item()))

    @classmethod
    def from_bitlinear(cls, layer: BitLinear) -> PackedBitLinear:
        """Same as packing and loading back, without the 2-bit round trip."""
        state = layer.ternary_state()
        return cls(state["q"], state["gamma"], state["bias"], hadamard=layer.hadamard, norm=layer.norm)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] float -> [..., out] float32 through an int8 x int8 -> int32 matmul."""
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features).float()  # [m, in]
        if self.norm:
            x = rms_normalize(x)  # [m, in]
        if self.hadamard_block is not None:
            x = _rotate(x, self.hadamard_block)  # [m, in]
        x_int, scale = _quantize_activations(x, ACT_BITS)  # [m, in], [m, 1]
        acc = _int8_matmul(x_int.to(torch.int8), self.weight_q)  # [m, out] int32
        y = acc.float().mul_(self.gamma / scale)  # [m, out]
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*lead, self.out_features)  # [..., out]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, hadamard={self.hadamard}, norm={self.norm}")
