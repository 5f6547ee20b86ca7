"""Trained exit heads and gates retrained as ternary (BitNet b1.58) networks.

Every linear map of a trained head or gate becomes a `pipeline.ternary.BitLinear` started from
its trained float weights (`BitLinear.from_linear`, so before any rounding it computes exactly
what the float layer did), then retrains with the loss it was trained with plus λ_q times the
quantization loss: heads with `pipeline.train_heads.HeadObjective` (the efficient top-k loss,
the probe), gates with `pipeline.train_gates.GateLabels` (the joint cascade loss, labelled by
the *ternary* heads, whose errors are what a gate must now predict). The epoch loop, schedule,
checkpoints and resume are `pipeline.fit`'s.

Quantization can be phased in (`QuantizeConfig.quant_warmup_steps`): over the first steps each
ternary layer's output moves linearly from its float value to its quantized one,
y = a * BitLinear(x) + (1 - a) * F.linear(x, W), a = step / warm-up steps. The blend is of
outputs rather than of weights and activations separately (an extra cross term the two
would give, a (1 - a) (W~ - W)(x~ - x), is second order in the rounding); it needs only the
layer's float path, which `BitLinear.forward(quantize=False)` provides.

The ternary heads expose the `ExitHead` interface (`features` / `project` / `project_rows`),
so scoring, calibration and evaluation use them unchanged; the ternary gates are `ExitGate`s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from pipeline.config import GatesConfig, HeadsConfig, QuantizeConfig
from pipeline.fit import CheckpointIO, FitTask, fit_epochs, module_device, rng_devices, throughput
from pipeline.gates import ExitGate, state_features
from pipeline.heads import AdapterHead, ExitHead, FrozenLMHead, LinearHead, _project_rows, heads_state_dict
from pipeline.scoring import head_layers
from pipeline.sources import BatchSource, check_layers, layer_key
from pipeline.teacher import TeacherTopK, TeacherWeights, project_vocab
from pipeline.ternary import BitLinear, activation_quant, fake_weight, quantization_loss
from pipeline.train_gates import GateEpochMetrics, GatesResult, gate_epoch_metrics, label_gate_rows
from pipeline.train_heads import EpochMetrics, head_epoch_metrics, prepare_head_objective

logger = logging.getLogger(__name__)

QUANTIZE_CODE_VERSION = "quantize-3"
"""Bump when ternary retraining results change for the same inputs; part of the stage's content
key and of its checkpoints' signature. 3: ternary gates keep their float gate's confidence features."""


# ----------------------------------------------------------------------------- modules


class PhasedBitLinear(BitLinear):
    """A BitLinear whose output can be blended with its float value: `mix` 1 is the ternary
    layer, 0 the float one. Only training moves `mix` (quantization warm-up); it is not state,
    so a saved layer is a plain BitLinear's parameters."""

    mix: float = 1.0

    def forward(self, x: torch.Tensor, *, quantize: bool = True) -> torch.Tensor:
        if not quantize or self.mix <= 0.0:
            return super().forward(x, quantize=False)  # [..., out]
        if self.mix >= 1.0:
            return super().forward(x)  # [..., out]
        return self.mix * super().forward(x) + (1.0 - self.mix) * super().forward(x, quantize=False)


def set_quant_mix(module: nn.Module, mix: float) -> None:
    """Set the float -> ternary blend of every phased layer in `module` (1: fully ternary)."""
    for m in module.modules():
        if isinstance(m, PhasedBitLinear):
            m.mix = float(mix)


class TernaryLinearHead(ExitHead):
    """Norm + a ternary V x H projection (`BitLinear`, norm=False: the backbone's final norm,
    float, already normalises its input). Per-row and subset scoring gather rows of the
    fake-quantized weight, so the efficient loss trains exactly the weights the full
    projection uses (gamma stays the whole matrix's absmean)."""

    def __init__(self, layer: int, teacher: TeacherWeights, *, hadamard: bool = False,
                 weight: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        super().__init__(layer, teacher)
        weight, bias = (teacher.lm_head, teacher.lm_head_bias) if weight is None else (weight, bias)
        self.proj = PhasedBitLinear.from_linear(weight, bias, hadamard=hadamard)  # [V, H] latent

    @classmethod
    def from_head(cls, head: LinearHead, teacher: TeacherWeights, *, hadamard: bool = False) -> TernaryLinearHead:
        out = cls(head.layer, teacher, hadamard=hadamard, weight=head.weight, bias=head.bias)
        out.norm.load_state_dict(head.norm.state_dict())
        return out

    def _scores(self, feats: torch.Tensor, score: Callable[..., torch.Tensor]) -> torch.Tensor:
        """score(x, weight, bias) on the quantized input and weight, blended with the float
        ones while quantization phases in."""
        p = self.proj
        x = p._prepare(feats)  # [n, H] rotated when hadamard: the basis the weight lives in
        quant = score(activation_quant(x), fake_weight(p.weight), p.bias) if p.mix > 0 else None
        if p.mix >= 1.0:
            return quant
        flt = score(x, p.weight, p.bias)
        return flt if quant is None else p.mix * quant + (1.0 - p.mix) * flt

    def project(self, feats: torch.Tensor, vocab_idx: torch.Tensor | None = None) -> torch.Tensor:
        return self._scores(feats, lambda x, w, b: project_vocab(x, w, b, vocab_idx))  # [n, V] or [n, k]

    def project_rows(self, feats: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self._scores(feats, lambda x, w, b: _project_rows(x, w, b, ids))  # [n, k]


class TernaryAdapterHead(AdapterHead):
    """An adapter head whose low-rank map (down, up) is ternary. The shared LM head stays the
    backbone's frozen float matrix: it is the backbone's own, shipped with it, so a ternary copy
    would add a matrix per model instead of saving one per exit."""

    def __init__(self, layer: int, teacher: TeacherWeights, rank: int, *, hadamard: bool = False,
                 lm_head: FrozenLMHead | None = None, down: torch.Tensor | None = None,
                 up: torch.Tensor | None = None):
        super().__init__(layer, teacher, rank, lm_head=lm_head)
        self.down = PhasedBitLinear.from_linear(self.down.weight if down is None else down, hadamard=hadamard)
        self.up = PhasedBitLinear.from_linear(self.up.weight if up is None else up, hadamard=hadamard)

    @classmethod
    def from_head(cls, head: AdapterHead, teacher: TeacherWeights, *, hadamard: bool = False,
                  lm_head: FrozenLMHead | None = None) -> TernaryAdapterHead:
        out = cls(head.layer, teacher, head.down.weight.shape[0], hadamard=hadamard, lm_head=lm_head,
                  down=head.down.weight, up=head.up.weight)
        out.norm.load_state_dict(head.norm.state_dict())
        return out


class TernaryExitGate(ExitGate):
    """An exit gate whose two linear layers are ternary; its norm (H numbers) and, with
    confidence features, their read-out (k x (width + 1) numbers, k <= 4) stay float."""

    def __init__(self, teacher: TeacherWeights, hidden_ratio: int = 4, layer: int | None = None, *,
                 hadamard: bool = False, features: str = "hidden"):
        super().__init__(teacher, hidden_ratio, layer, features=features)
        for i in (0, 2):
            self.mlp[i] = PhasedBitLinear.from_linear(self.mlp[i].weight, self.mlp[i].bias, hadamard=hadamard)

    @classmethod
    def from_gate(cls, gate: ExitGate, teacher: TeacherWeights, *, hadamard: bool = False) -> TernaryExitGate:
        width = gate.mlp[0].weight.shape[0]
        out = cls(teacher, max(1, teacher.hidden_size // width), gate.layer, hadamard=hadamard,
                  features=getattr(gate, "features", "hidden"))
        if out.mlp[0].weight.shape != gate.mlp[0].weight.shape:
            raise ValueError(f"gate {gate.layer} has width {width}, which no hidden_ratio gives for hidden size "
                             f"{teacher.hidden_size}; pass gates built by pipeline.gates.build_gates on this teacher")
        out.norm.load_state_dict(gate.norm.state_dict())
        if out.num_features:  # the trained confidence read-out and its feature statistics, as they are
            for name in ("confidence", "direct"):
                getattr(out, name).load_state_dict(getattr(gate, name).state_dict())
            out.set_feature_stats(gate.feature_mean, gate.feature_std)
        for i in (0, 2):
            out.mlp[i] = PhasedBitLinear.from_linear(gate.mlp[i].weight, gate.mlp[i].bias, hadamard=hadamard)
        return out


# ----------------------------------------------------------------------------- build, save, load


def build_ternary_heads(float_heads: nn.ModuleDict, cfg: QuantizeConfig, teacher: TeacherWeights) -> nn.ModuleDict:
    """One ternary head per trained head, keyed alike, started from its trained weights.
    Ternary adapter heads share one frozen float LM head, as the float ones do."""
    shared = FrozenLMHead(teacher)
    heads = nn.ModuleDict()
    for key, head in float_heads.items():
        if isinstance(head, LinearHead):
            heads[key] = TernaryLinearHead.from_head(head, teacher, hadamard=cfg.hadamard)
        elif isinstance(head, AdapterHead):
            heads[key] = TernaryAdapterHead.from_head(head, teacher, hadamard=cfg.hadamard, lm_head=shared)
        else:
            raise TypeError(f"head {key} is a {type(head).__name__}; build_ternary_heads takes the LinearHead or "
                            "AdapterHead modules that pipeline.heads.load_heads returns")
    return heads


def ternary_heads_state(heads: nn.ModuleDict) -> dict[str, torch.Tensor]:
    """Flat `"<layer>.<param>"` state (latent float weights, CPU) of ternary heads; no shared
    LM head. `pipeline.ternary.pack_bitlinear` gives the 2-bit form of each BitLinear."""
    return {k: v.detach().cpu().clone() for k, v in heads_state_dict(heads).items()}


def _load_grouped(modules: nn.ModuleDict, state: dict[str, torch.Tensor], what: str, fix: str) -> nn.ModuleDict:
    grouped: dict[str, dict[str, torch.Tensor]] = {key: {} for key in modules}
    unknown = sorted({k.partition(".")[0] for k in state} - set(modules))
    if unknown:
        raise ValueError(f"saved ternary {what} hold layers {unknown} beyond the requested {list(modules)}; {fix}")
    for k, v in state.items():
        layer, _, name = k.partition(".")
        grouped[layer][name] = v
    for key, module in modules.items():
        try:
            module.load_state_dict(grouped[key], strict=True)
        except RuntimeError as e:
            raise ValueError(f"saved state of ternary {what[:-1]} {key} does not fit: {e}; {fix}") from e
    return modules


def load_ternary_heads(heads_cfg: HeadsConfig, layers: Sequence[int], teacher: TeacherWeights, qcfg: QuantizeConfig,
                       state: dict[str, torch.Tensor]) -> nn.ModuleDict:
    """Inverse of `ternary_heads_state`: ternary heads of `heads_cfg.kind` with the saved state."""
    shared = FrozenLMHead(teacher) if heads_cfg.kind == "adapter" else None
    heads = nn.ModuleDict()
    for layer in check_layers(layers):
        if heads_cfg.kind == "linear":
            heads[str(layer)] = TernaryLinearHead(layer, teacher, hadamard=qcfg.hadamard)
        else:
            heads[str(layer)] = TernaryAdapterHead(layer, teacher, heads_cfg.rank, hadamard=qcfg.hadamard,
                                                   lm_head=shared)
    return _load_grouped(heads, state, "heads", "load with the heads and quantize configs they were trained with")


def build_ternary_gates(float_gates: nn.ModuleDict, qcfg: QuantizeConfig, teacher: TeacherWeights) -> nn.ModuleDict:
    """One ternary gate per trained gate, keyed alike, started from its trained weights."""
    return nn.ModuleDict({key: TernaryExitGate.from_gate(gate, teacher, hadamard=qcfg.hadamard)
                          for key, gate in float_gates.items()})


def load_ternary_gates(gates_cfg: GatesConfig, qcfg: QuantizeConfig, teacher: TeacherWeights,
                       state: dict[str, torch.Tensor]) -> nn.ModuleDict:
    """Inverse of `pipeline.gates.gates_state_dict` for ternary gates."""
    layers = sorted({int(k.partition(".")[0]) for k in state})
    gates = nn.ModuleDict({str(layer): TernaryExitGate(teacher, gates_cfg.hidden_ratio, layer, hadamard=qcfg.hadamard,
                                                       features=state_features(state, layer))
                           for layer in layers})
    return _load_grouped(gates, state, "gates", "load with the gates and quantize configs they were trained with")


# ----------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TernaryHeadEpoch(EpochMetrics):
    quant_loss: dict[int, float]
    """Per head layer, after the epoch: its quantization loss (MSE between latent and ternary
    weights, summed over its BitLinears), unweighted by λ_q: the curve of the weights settling
    onto the ternary grid."""


@dataclass(frozen=True)
class TernaryGateEpoch(GateEpochMetrics):
    quant_loss: dict[int, float]
    """Per gate layer, after the epoch: its quantization loss, unweighted by λ_q."""


@dataclass(frozen=True)
class QuantizeResult:
    state: dict[str, torch.Tensor]
    """`ternary_heads_state` of the retrained heads; rebuild with `load_ternary_heads`."""
    epochs: list[TernaryHeadEpoch]
    """Every epoch, including those done before a resume."""
    steps: int
    tokens_per_s: float
    resumed_from_epoch: int
    float_agreement: dict[int, float]
    """Per head layer, probe agreement of the trained float heads: what quantization may cost."""
    initial_agreement: dict[int, float]
    """The same probe, the ternary heads before retraining (the float weights rounded)."""


class _Clock(nn.Module):
    """Steps taken, saved in the checkpoint's module state so the quantization warm-up resumes
    where it was (a Python int in the extra state: reading it costs no device sync)."""

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    def tick(self, warmup: int) -> float:
        """The float -> ternary blend of the step about to run, and count it."""
        mix = 1.0 if warmup <= 0 else min(1.0, self.steps / warmup)
        self.steps += 1
        return mix

    def get_extra_state(self) -> int:
        return self.steps

    def set_extra_state(self, state: int) -> None:
        self.steps = int(state)


def _phased(module: nn.Module, clock: _Clock, warmup: int, run: Callable[[], Any]) -> Any:
    """Run one training step at this step's blend; everything else sees the ternary layers."""
    set_quant_mix(module, clock.tick(warmup))
    try:
        return run()
    finally:
        set_quant_mix(module, 1.0)


@torch.no_grad()
def _quant_losses(modules: nn.ModuleDict) -> dict[int, float]:
    return {int(key): float(quantization_loss(m)) for key, m in modules.items()}


def _digest(module: nn.Module) -> str:
    """sha256 of a module's state: a checkpoint must come from retraining the same weights."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def quantize_heads(cfg: QuantizeConfig, heads_cfg: HeadsConfig, float_heads: nn.ModuleDict, layers: Sequence[int],
                   num_layers: int, teacher: TeacherWeights, source: BatchSource, *,
                   checkpoints: CheckpointIO | None = None, progress: bool = True, device: str | torch.device = "cpu",
                   teacher_topk: TeacherTopK | None = None) -> QuantizeResult:
    """Retrain the trained heads at `layers` as ternary heads: the loss of `train_heads` for
    `heads_cfg` (full or efficient, the same probe) plus `cfg.quant_weight` times each head's
    quantization loss, on `cfg`'s schedule. Resumable per epoch through `checkpoints`."""
    layers = check_layers(layers)
    missing = sorted(set(layers) - set(head_layers(float_heads)))
    if missing:
        raise ValueError(f"no trained heads for layers {missing} (heads exist for {head_layers(float_heads)}); "
                         "quantize the layers the heads were trained for")
    device = torch.device(device)
    float_heads = nn.ModuleDict({str(layer): float_heads[str(layer)] for layer in layers})  # a view, no copy
    with torch.random.fork_rng(devices=rng_devices(device)):
        torch.manual_seed(cfg.seed)
        heads = build_ternary_heads(float_heads, cfg, teacher).to(device)
        clock = _Clock()
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        objective = prepare_head_objective(heads_cfg, layers, num_layers, teacher, source, generator, device,
                                           teacher_topk)
        set_quant_mix(heads, 0.0)  # from_linear: exactly the float heads before rounding
        float_agreement = objective.probe_metrics(heads)["agreement"]
        set_quant_mix(heads, 1.0)
        initial_agreement = objective.probe_metrics(heads)["agreement"]
        logger.info("quantize: probe agreement float %s, ternary before retraining %s", float_agreement,
                    initial_agreement)
        extra = (lambda head: cfg.quant_weight * quantization_loss(head)) if cfg.quant_weight > 0 else None
        task = FitTask(
            stage="quantize", code_version=QUANTIZE_CODE_VERSION, module=nn.ModuleDict({"heads": heads, "clock": clock}),
            names=objective.names, part_names=[f"ternary head {layer}" for layer in layers],
            step=lambda batch: _phased(heads, clock, cfg.quant_warmup_steps,
                                       lambda: objective.step(heads, batch, extra)),
            end_epoch=lambda: {**objective.probe_metrics(heads), "quant_loss": _quant_losses(heads)},
            generator=generator,
            signature={**objective.signature(num_layers, source.num_tokens), "quantize": cfg.model_dump(mode="json"),
                       "float_heads_sha256": _digest(float_heads), "code_version": QUANTIZE_CODE_VERSION},
        )
        fit = fit_epochs(task, cfg, source, checkpoints, progress, device)

    epochs = [TernaryHeadEpoch(**{f.name: getattr(m, f.name) for f in dataclasses.fields(m)},
                               quant_loss=dict(r["quant_loss"]))
              for m, r in zip(head_epoch_metrics(fit.history), fit.history)]
    return QuantizeResult(state=ternary_heads_state(heads), epochs=epochs, steps=fit.steps,
                          tokens_per_s=throughput(fit.history), resumed_from_epoch=fit.resumed_from_epoch,
                          float_agreement=float_agreement, initial_agreement=initial_agreement)


def quantize_gates(cfg: QuantizeConfig, gates_cfg: GatesConfig, float_gates: nn.ModuleDict,
                   ternary_heads: nn.ModuleDict, layers: Sequence[int], num_layers: int, teacher: TeacherWeights,
                   source: BatchSource, *, checkpoints: CheckpointIO | None = None, progress: bool = True,
                   device: str | torch.device | None = None) -> GatesResult:
    """Retrain the trained gates at `layers` as ternary gates on labels of the ternary heads:
    loss = bce + decision (`gate_loss` with `gates_cfg`'s sampling and threshold)
           + `cfg.routing_weight` * routing + `cfg.quant_weight` * quantization.
    Labels, held-out rows and AUROC as in `train_gates` (at most `gates_cfg.max_tokens` labelled
    rows). The result's epochs are `TernaryGateEpoch`s; its state loads with `load_ternary_gates`."""
    layers = check_layers(layers)
    missing = sorted(set(layers) - set(head_layers(float_gates)))
    if missing:
        raise ValueError(f"no trained gates for layers {missing} (gates exist for {head_layers(float_gates)}); "
                         "quantize the layers the gates were trained for")
    device = torch.device(device) if device is not None else module_device(ternary_heads)
    loss_cfg = gates_cfg.model_copy(update={"routing_weight": cfg.routing_weight})  # λ_r inside gate_loss
    labels = label_gate_rows(ternary_heads, layers, teacher, source, batch_rows=cfg.batch_tokens,
                             max_label_tokens=gates_cfg.max_tokens, progress=progress)
    float_gates = nn.ModuleDict({str(layer): float_gates[str(layer)] for layer in layers})  # a view, no copy
    with torch.random.fork_rng(devices=rng_devices(device)):
        torch.manual_seed(cfg.seed)
        gates = build_ternary_gates(float_gates, cfg, teacher).to(device)
        clock = _Clock()
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        extra = (lambda: cfg.quant_weight * quantization_loss(gates)) if cfg.quant_weight > 0 else None
        task = FitTask(
            stage="quantize", code_version=QUANTIZE_CODE_VERSION, module=nn.ModuleDict({"gates": gates, "clock": clock}),
            names=[layer_key(layer) for layer in layers] + ["row"],
            part_names=["ternary gates " + ",".join(map(str, layers))],
            step=lambda batch: _phased(gates, clock, cfg.quant_warmup_steps,
                                       lambda: labels.step(gates, batch, loss_cfg, num_layers, generator, device,
                                                           extra)),
            end_epoch=lambda: {"auroc": labels.gate_auroc(gates, device), "quant_loss": _quant_losses(gates)},
            generator=generator,
            signature={"quantize": cfg.model_dump(mode="json"), "gates_config": gates_cfg.model_dump(mode="json"),
                       "layers": layers, "num_layers": int(num_layers), "hidden_size": teacher.hidden_size,
                       "num_tokens": int(source.num_tokens), "labels_sha256": labels.sha256,
                       "float_gates_sha256": _digest(float_gates), "code_version": QUANTIZE_CODE_VERSION},
        )
        fit = fit_epochs(task, cfg, source, checkpoints, progress, device)

    gate_auroc, entropy_auroc = labels.gate_auroc(gates, device), labels.entropy_auroc()
    logger.info("ternary gates: held-out AUROC of p_exit %s vs -entropy %s", gate_auroc, entropy_auroc)
    epochs = [TernaryGateEpoch(**{f.name: getattr(m, f.name) for f in dataclasses.fields(m)},
                               quant_loss=dict(r["quant_loss"]))
              for m, r in zip(gate_epoch_metrics(fit.history), fit.history)]
    state = {k: v.detach().cpu().clone() for k, v in gates.state_dict().items()}
    return GatesResult(state=state, epochs=epochs, steps=fit.steps, auroc=gate_auroc, entropy_auroc=entropy_auroc,
                       heldout_rows=labels.held.n, resumed_from_epoch=fit.resumed_from_epoch)
