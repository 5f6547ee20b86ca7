"""Ternary exit heads and gates for inference, read straight from their packed file.

The quantize stage ships `packed_state` of its ternary heads and gates: every BitLinear at
module path P as `P.<k>` for the keys of `pipeline.ternary.pack_bitlinear`, and every other
float parameter (the norms) under its own name. Loading that into the training modules would
rebuild a float latent matrix per ternary layer (a [V, H] float32 copy per linear head); here
each ternary matrix becomes a `PackedBitLinear` (int8 weights, int8 activations, int32 sums)
and no float copy of it is ever formed. The norms, and the adapter heads' shared frozen LM head,
stay float exactly as in training.

The modules keep the training interface (`features` / `project` / `project_rows` / `forward`
for heads, `forward` / `exit_probability` for gates), so scoring, calibration and evaluation
run them unchanged. They compute what the fake-quantized training modules compute up to float
rounding (`PackedBitLinear` uses the same activation quantizer; only the final scale multiply
rounds differently), except that where one ternary layer feeds another (adapter down -> up, gate
mlp.0 -> mlp.2) that rounding can move an activation of the second across an int8 rounding
boundary: a rare row then differs by one quantization step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pipeline.config import GatesConfig, HeadsConfig
from pipeline.gates import ExitGate, state_features
from pipeline.heads import AdapterHead, ExitHead, FrozenLMHead
from pipeline.sources import check_layers
from pipeline.teacher import TeacherWeights
from pipeline.ternary import PackedBitLinear

_PACKED_KEYS = ("packed", "gamma", "shape", "hadamard", "norm")
"""Keys `pack_bitlinear` always writes; `bias` too for a layer that has one (which a slot
needs exactly when the float layer it replaces has one)."""
FEATURE_STATS = ("feature_mean", "feature_std")
"""A gate's confidence-feature statistics: buffers, shipped beside its float parameters."""
_TERNARY_SLOTS = {"linear": ("proj",), "adapter": ("down", "up"), "gate": ("mlp.0", "mlp.2")}
"""Module paths of the BitLinears inside each ternary module of `pipeline.quantize`."""


class PackedLinearHead(ExitHead):
    """`TernaryLinearHead` for inference: the float norm, then the packed [V, H] projection."""

    def __init__(self, layer: int, teacher: TeacherWeights):
        super().__init__(layer, teacher)
        # Placeholder on the meta device (shape only, no memory) until `load_packed_heads` puts
        # the PackedBitLinear here; it gives the shape the packed matrix must have.
        self.proj: nn.Module = nn.Linear(teacher.hidden_size, teacher.vocab_size,
                                         bias=teacher.lm_head_bias is not None, device="meta")

    def project(self, feats: torch.Tensor, vocab_idx: torch.Tensor | None = None) -> torch.Tensor:
        if vocab_idx is None:
            return self.proj(feats)  # [n, V]
        return _rows_of(self.proj, vocab_idx)(feats)  # [n, k]

    def project_rows(self, feats: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Each row on its own ids, through the ids the batch uses at all: n * u * H work for u
        distinct ids (at most n * k), and the same integer sums as the full projection."""
        uniq, inverse = torch.unique(ids, return_inverse=True)  # [u], [n, k]
        return self.project(feats, uniq).gather(1, inverse)  # [n, k]


def _rows_of(layer: PackedBitLinear, idx: torch.Tensor) -> PackedBitLinear:
    """A PackedBitLinear of the output rows `idx` of `layer`, with the whole matrix's gamma:
    subset scoring runs the very forward the full projection does (k x H int8 gathered)."""
    idx = idx.to(layer.weight_q.device)
    bias = None if layer.bias is None else layer.bias.index_select(0, idx)  # [k]
    return PackedBitLinear(layer.weight_q.index_select(0, idx), layer.gamma, bias,  # [k, H] int8
                           hadamard=layer.hadamard, norm=layer.norm)


class _PackedProblems:
    """Every key problem of a packed dict, gathered over all modules and raised once."""

    def __init__(self, packed: dict[str, torch.Tensor], what: str, fix: str):
        self.packed, self.what, self.fix = packed, what, fix
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.mismatched: list[str] = []

    def take(self, key: str) -> torch.Tensor | None:
        if key not in self.packed:
            self.missing.append(key)
            return None
        self.used.add(key)
        return self.packed[key]

    def raise_if_any(self) -> None:
        unexpected = sorted(set(self.packed) - self.used)
        if not (self.missing or unexpected or self.mismatched):
            return
        parts = [f"missing keys {self.missing}" if self.missing else "",
                 f"unexpected keys {unexpected}" if unexpected else "",
                 f"mismatched {self.mismatched}" if self.mismatched else ""]
        raise ValueError(f"packed {self.what} do not fit: {'; '.join(p for p in parts if p)}; {self.fix}")


def _fill(module: nn.Module, prefix: str, slots: Sequence[str], problems: _PackedProblems) -> None:
    """Put a PackedBitLinear from `packed` into each ternary slot of `module` (in place of the
    float layer the skeleton was built with, whose shape it must have), then copy every
    remaining float parameter (the norms) from `packed[prefix + name]`."""
    for slot in slots:
        skeleton = module.get_submodule(slot)  # the float (or meta) nn.Linear the packed layer replaces
        want = skeleton.weight.shape  # [out, in]
        keys = _PACKED_KEYS + (("bias",) if skeleton.bias is not None else ())
        d = {k: problems.take(f"{prefix}{slot}.{k}") for k in keys}
        if any(v is None for v in d.values()):
            continue
        shape = [int(v) for v in d["shape"].tolist()]  # checked before unpacking a wrong matrix
        if shape != list(want):
            problems.mismatched.append(f"{prefix}{slot} is {shape}, expected {list(want)}")
            continue
        if "bias" in d and list(d["bias"].shape) != shape[:1]:
            problems.mismatched.append(f"{prefix}{slot}.bias is {list(d['bias'].shape)}, expected {shape[:1]}")
            continue
        if not all(bool(torch.isfinite(d[k]).all()) for k in ("gamma", "bias") if k in d):
            problems.mismatched.append(f"{prefix}{slot} has a non-finite gamma or bias")
            continue
        module.set_submodule(slot, PackedBitLinear.from_packed(d))
    stats = [(n, b) for n, b in module.named_buffers() if n.rpartition(".")[2] in FEATURE_STATS]
    for name, param in [*module.named_parameters(), *stats]:
        if any(name.startswith(f"{slot}.") for slot in slots):
            continue  # a slot whose packed layer was missing or mismatched; already reported
        value = problems.take(prefix + name)
        if value is None:
            continue
        if value.shape != param.shape or not bool(torch.isfinite(value).all()):
            problems.mismatched.append(f"{prefix}{name} is {list(value.shape)}"
                                       f"{'' if torch.isfinite(value).all() else ' non-finite'}, "
                                       f"expected {list(param.shape)} finite")
            continue
        with torch.no_grad():
            param.copy_(value)


def _finish(modules: nn.ModuleDict, problems: _PackedProblems) -> nn.ModuleDict:
    problems.raise_if_any()
    return modules.requires_grad_(False).eval()


def load_packed_heads(heads_cfg: HeadsConfig, layers: Sequence[int], teacher: TeacherWeights,
                      packed: dict[str, torch.Tensor]) -> nn.ModuleDict:
    """Inference heads of `heads_cfg.kind` at `layers` from a `packed_state` dict (e.g. the
    quantize stage's heads.packed.safetensors), keyed by str(layer) like every head set.

    Linear heads: float norm + packed [V, H] projection. Adapter heads: float norm, packed down
    [r, H] and up [H, r], and one frozen float LM head of the teacher shared by all of them.
    Raises ValueError naming every missing, unexpected or misshapen key.
    """
    shared = FrozenLMHead(teacher) if heads_cfg.kind == "adapter" else None
    problems = _PackedProblems(packed, "heads", f"load with the {heads_cfg.kind!r} heads config (rank "
                               f"{heads_cfg.rank}), the exit layers and the teacher the heads were quantized with")
    heads = nn.ModuleDict()
    for layer in check_layers(layers):
        if heads_cfg.kind == "linear":
            head: ExitHead = PackedLinearHead(layer, teacher)
        else:
            head = AdapterHead(layer, teacher, heads_cfg.rank, lm_head=shared)
        _fill(head, f"{layer}.", _TERNARY_SLOTS[heads_cfg.kind], problems)
        heads[str(layer)] = head
    return _finish(heads, problems)


def load_packed_gates(gates_cfg: GatesConfig, teacher: TeacherWeights,
                      packed: dict[str, torch.Tensor]) -> nn.ModuleDict:
    """Inference gates from a `packed_state` dict of ternary gates, one per layer the dict
    holds: the float norm, then the MLP with both linear maps packed."""
    try:
        layers = sorted({int(k.partition(".")[0]) for k in packed})
        if not layers:
            raise ValueError
    except ValueError:
        raise ValueError(f"packed gate keys must be '<layer>.<name>', got {sorted(packed)[:5]}; "
                         "pass the gates.packed.safetensors of a quantize artifact") from None
    problems = _PackedProblems(packed, "gates", f"load with the gates config (hidden_ratio {gates_cfg.hidden_ratio}) "
                               "and the teacher the gates were quantized with")
    gates = nn.ModuleDict()
    for layer in check_layers(layers):
        gate = ExitGate(teacher, gates_cfg.hidden_ratio, layer, state_features(packed, layer))
        _fill(gate, f"{layer}.", _TERNARY_SLOTS["gate"], problems)
        gates[str(layer)] = gate
    return _finish(gates, problems)
