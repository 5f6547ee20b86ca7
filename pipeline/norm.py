"""The backbone's final norm, described exactly and rebuilt as a float32 module.

Heads, the logit lens and the gates all normalise an intermediate state the way the backbone
normalises its last one. Families differ in ways that matter for that: Llama/Mistral/Qwen use
RMSNorm `x / rms(x) * w`; GPT-2, GPT-NeoX/Pythia, OPT, Falcon, Phi and BLOOM use LayerNorm with
a bias; Cohere, OLMo and DBRX use LayerNorm without bias (OLMo without any weight); Gemma's
RMSNorm scales by `1 + w`. A head that assumed RMSNorm on a GPT-2 would not start at the
model's logit lens, silently.

So the description is *read from the module numerically*: random probes go through a float32
copy of the backbone's norm, and the first candidate formula that reproduces its output (at a
large and at an eps-sized scale, so a wrong eps is caught too) is the description. A norm that
no candidate reproduces is refused, naming what was tried, rather than approximated.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

NormKind = Literal["rms", "layer"]
NORM_KINDS: tuple[str, ...] = ("rms", "layer")
WEIGHT_OFFSETS: tuple[float, ...] = (0.0, 1.0)
"""0: gain = weight (Llama, GPT-2, ...); 1: gain = 1 + weight (Gemma's RMSNorm)."""

FINAL_NORM_NAMES: tuple[str, ...] = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f", "final_norm")
"""Attribute names that hold the final norm across HF architectures (Llama, Mistral, Qwen: norm;
GPT-2, BLOOM: ln_f; OPT: final_layer_norm; Phi: final_layernorm; Mamba, DBRX: norm_f)."""

_EPS_NAMES = ("variance_epsilon", "eps", "epsilon", "layer_norm_eps", "rms_norm_eps")
_PROBE_ROWS = 16
_TOL = dict(rtol=1e-4, atol=1e-4)


class NormError(ValueError):
    """The final norm cannot be described exactly; the message says what was tried."""


@dataclass(frozen=True, eq=False)
class FinalNormSpec:
    """What the backbone's final norm computes, as plain float32 tensors and numbers.

    y = normalize(x) * (weight_offset + weight) + bias, with normalize(x) =
    x / sqrt(mean(x^2) + eps) for "rms" and (x - mean(x)) / sqrt(var(x) + eps) for "layer".
    """

    kind: NormKind
    weight: torch.Tensor  # [H] float32
    bias: torch.Tensor | None = None  # [H] float32
    eps: float = 1e-5
    weight_offset: float = 0.0

    def __post_init__(self) -> None:
        problems = check_norm_fields(self.kind, self.weight, self.bias, self.eps, self.weight_offset)
        if problems:
            raise NormError("invalid final norm: " + "; ".join(problems))

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[0]

    def module(self) -> "FinalNorm":
        """A fresh, trainable float32 copy (heads and gates each own one)."""
        return FinalNorm(self.kind, self.hidden_size, self.eps, self.weight_offset, bias=self.bias is not None,
                         weight=self.weight, bias_init=self.bias)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The norm, frozen and in float32: x [..., H] -> [..., H] float32."""
        u = normalize(x, self.kind, self.eps)  # [..., H]
        return _affine(u, self.weight.to(u.device), None if self.bias is None else self.bias.to(u.device),
                       self.weight_offset)


def check_norm_fields(kind: str, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
                      weight_offset: float) -> list[str]:
    """Every problem with a norm description, for one error message (shared with TeacherWeights)."""
    problems = []
    if kind not in NORM_KINDS:
        problems.append(f"norm kind {kind!r} is unknown; use one of {', '.join(NORM_KINDS)}")
    if weight.ndim != 1:
        problems.append(f"norm weight has shape {tuple(weight.shape)}; expected [hidden]")
    elif bias is not None and bias.shape != weight.shape:
        problems.append(f"norm bias has shape {tuple(bias.shape)}; expected [{weight.shape[0]}] like the weight")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        problems.append(f"norm eps {eps!r} must be a finite number >= 0")
    if weight_offset not in WEIGHT_OFFSETS:
        problems.append(f"norm weight offset {weight_offset!r} must be 0 (gain = weight) or 1 (gain = 1 + weight)")
    return problems


def normalize(x: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """The norm without gain or bias, in float32: cached states are float16 and SmolLM2's
    ~23,000 outliers square past float16's max. x [..., H] -> [..., H] float32."""
    x = x.to(torch.float32)  # [..., H]
    if kind == "layer":
        x = x - x.mean(dim=-1, keepdim=True)  # [..., H] centred
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)  # [..., H]


def _affine(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, offset: float) -> torch.Tensor:
    gain = weight + offset if offset else weight  # [H]
    out = u * gain  # [..., H]
    return out if bias is None else out + bias  # [..., H]


class FinalNorm(nn.Module):
    """A trainable float32 copy of the backbone's final norm.

    `weight` (and `bias`) are parameters; kind, eps and the weight offset are fixed facts of the
    backbone. `normalize` and `affine` are exposed separately because the adapter head corrects
    the state between the two.
    """

    def __init__(self, kind: NormKind, hidden_size: int, eps: float, weight_offset: float = 0.0, bias: bool = False,
                 weight: torch.Tensor | None = None, bias_init: torch.Tensor | None = None):
        super().__init__()
        problems = check_norm_fields(kind, torch.empty(hidden_size), None, eps, weight_offset)
        if problems:
            raise NormError("invalid final norm: " + "; ".join(problems))
        self.kind, self.eps, self.weight_offset = kind, float(eps), float(weight_offset)
        init = torch.full((hidden_size,), 1.0 - weight_offset) if weight is None else weight
        self.weight = nn.Parameter(init.detach().to(torch.float32).clone())  # [H]
        if bias:
            b = torch.zeros(hidden_size) if bias_init is None else bias_init
            self.bias = nn.Parameter(b.detach().to(torch.float32).clone())  # [H]
        else:
            self.register_parameter("bias", None)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, self.kind, self.eps)  # [..., H] float32

    def affine(self, u: torch.Tensor) -> torch.Tensor:
        """Gain (with the backbone's offset) and bias on a normalised state u [..., H]."""
        return _affine(u, self.weight, self.bias, self.weight_offset)  # [..., H]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.affine(self.normalize(x))  # [..., H] float32

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, hidden={self.weight.shape[0]}, eps={self.eps}, "
                f"weight_offset={self.weight_offset}, bias={self.bias is not None}")


def describe_norm(norm: nn.Module, hidden_size: int | None = None) -> FinalNormSpec:
    """Read a norm module's exact description by probing it against the candidate formulas.

    The weight and bias are taken from the module (a weight-less norm, like OLMo's, gets ones);
    eps from its attribute when it has one, else estimated from its output on eps-sized inputs.
    Raises NormError naming the class and every formula tried if none reproduces it.
    """
    name = type(norm).__name__
    weight = _param(norm, "weight")
    bias = _param(norm, "bias")
    if weight is not None and weight.ndim != 1:
        raise NormError(f"final norm {name} has a weight of shape {tuple(weight.shape)}; only a [hidden] gain is "
                        "supported")
    hidden = weight.shape[0] if weight is not None else hidden_size
    if hidden is None:
        shape = getattr(norm, "normalized_shape", None)
        hidden = int(shape[-1]) if isinstance(shape, (tuple, list)) and shape else None
    if hidden is None:
        raise NormError(f"final norm {name} has no weight and no normalized_shape; pass hidden_size")

    probe = copy.deepcopy(norm).to("cpu", torch.float32)  # fp32 copy: the comparison is exact to rounding
    gen = torch.Generator().manual_seed(0)
    shift = torch.randn(1, hidden, generator=gen)  # [1, H] a non-zero mean tells RMS from LayerNorm
    big = 3.0 * torch.randn(_PROBE_ROWS, hidden, generator=gen) + 2.0 * shift  # [n, H]
    small = 1e-2 * (torch.randn(_PROBE_ROWS, hidden, generator=gen) + shift)  # [n, H] var ~1e-4: eps shows
    with torch.no_grad():
        got_big, got_small = probe(big), probe(small)  # [n, H] each
    if not isinstance(got_big, torch.Tensor) or got_big.shape != big.shape:
        raise NormError(f"final norm {name} does not map [n, {hidden}] to [n, {hidden}]; it is not a norm")

    attr_eps = next((float(getattr(norm, n)) for n in _EPS_NAMES if isinstance(getattr(norm, n, None), float)), None)
    tried = []
    for kind in NORM_KINDS:
        for offset in WEIGHT_OFFSETS:
            if weight is None and offset:
                continue  # without a weight the gain is 1 whatever the convention
            w = torch.ones(hidden) - offset if weight is None else weight  # [H]
            candidates = [] if attr_eps is None else [attr_eps]
            estimate = _estimate_eps(small, got_small, kind, w, bias, offset)
            candidates += [e for e in _round_first(estimate) if e not in candidates]
            errors = []
            for eps in candidates:
                spec = FinalNormSpec(kind, w, bias, eps, offset)
                pairs = [(spec.apply(big), got_big), (spec.apply(small), got_small)]  # [n, H] each
                if all(torch.allclose(a, b, **_TOL) for a, b in pairs):
                    return spec
                errors.append(max(_deviation(a, b) for a, b in pairs))
            epss = ", ".join(f"{e:.3g}" for e in candidates) or "none readable"
            best = f"{min(errors):.3g}" if errors else "n/a"
            tried.append(f"{_formula(kind, offset, bias is not None)} (eps {epss}; max error {best})")
    raise NormError(
        f"final norm {name} matches none of the formulas heads can rebuild exactly; tried "
        + "; ".join(tried)
        + ". Add its formula to pipeline/norm.py, or use a backbone with an RMSNorm or LayerNorm final norm"
    )


def _param(module: nn.Module, name: str) -> torch.Tensor | None:
    t = getattr(module, name, None)
    return t.detach().to("cpu", torch.float32).contiguous().clone() if isinstance(t, torch.Tensor) else None


def _estimate_eps(x: torch.Tensor, y: torch.Tensor, kind: str, weight: torch.Tensor, bias: torch.Tensor | None,
                  offset: float) -> float | None:
    """eps such that y = c / sqrt(s + eps) * gain + bias, from rows whose s is eps-sized:
    c / u = sqrt(s + eps) per element, so eps = (c / u)^2 - s. None where it cannot be read."""
    gain = weight + offset  # [H]
    u = (y - bias if bias is not None else y) / gain  # [n, H]; inf where gain == 0, masked below
    c = x - x.mean(-1, keepdim=True) if kind == "layer" else x  # [n, H]
    s = c.pow(2).mean(-1, keepdim=True)  # [n, 1]
    ok = (gain.abs() > 1e-3) & (u.abs() > 1e-3) & (c.abs() > 1e-4)  # [n, H]
    if not ok.any():
        return None
    eps = ((c / u).pow(2) - s)[ok].median().item()
    return max(eps, 0.0) if math.isfinite(eps) else None


def _round_first(eps: float | None) -> list[float]:
    """The estimate rounded to one significant digit (the value configs hold, e.g. 1e-5), then as is."""
    if eps is None:
        return []
    if eps == 0.0:
        return [0.0]
    rounded = float(f"{eps:.0e}")
    return [rounded, eps] if rounded != eps else [eps]


def _deviation(a: torch.Tensor, b: torch.Tensor) -> float:
    d = (a - b).abs().max().item()
    return d if math.isfinite(d) else float("inf")


def _formula(kind: str, offset: float, bias: bool) -> str:
    norm = "rms_norm(x)" if kind == "rms" else "layer_norm(x)"
    gain = "(1 + w)" if offset else "w"
    return f"{norm} * {gain}" + (" + b" if bias else "")
