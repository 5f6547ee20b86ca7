"""The metrics of the evaluate stage: how good each head is on the eval split (beside the logit
lens it started from), whether the calibrated thresholds keep their promise there, what the
cascade saves, and how the gates rank tokens against the heads' own entropy; and, per head, the
curves a report draws (`pipeline.curves`: ROC points of -entropy and p_exit, agreement in
entropy bins), thinned so the manifest stays small.

Everything comes from ONE sequential no-grad pass over the eval source
(`pipeline.scoring.collect_exit_labels`): per block of rows the teacher's logits are computed
once, every head's logits are scored (top-1, entropy) and handed to `_DistributionSums` for the
metrics that need the whole distribution (top-5, NLL, KL, calibration error), and per batch the
logit lens and the gates are scored on the rows already in memory. The guarantees, the cascade
and the gate AUROCs are then `pipeline.calibrate.check_held_out`, `pipeline.cascade.
evaluate_cascade` and `pipeline.scoring.evaluate_gate_scores` on those labels, so "agrees",
"exits" and "held" mean exactly what they mean at calibration.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.calibrate import Calibration, HeldOutCheck, _kept, check_held_out, choose_deployed
from pipeline.cascade import evaluate_cascade
from pipeline.curves import EntropyBins, RocCurve, entropy_bins, roc_points
from pipeline.fit import module_device
from pipeline.losses import IGNORE_INDEX
from pipeline.scoring import (
    BlockLogits,
    ExitLabels,
    RowScores,
    auroc,
    collect_exit_labels,
    evaluate_gate_scores,
    head_layers,
    logit_lens,
    score_rows,
)
from pipeline.sources import BatchSource, batch_tensor, layer_key
from pipeline.teacher import TeacherWeights
from pipeline.thresholds import exit_mask

__all__ = ["ECE_BINS", "EVALUATE_CODE_VERSION", "FIXED_GATE_THRESHOLDS", "TOP_K", "CascadeOutcome",
           "DeployedOutcome", "EvaluationMetrics", "GateOperatingPoint", "GateOutcome", "HeadCurves", "HeadQuality", "LevelOutcome",
           "NonFiniteLogitsError", "evaluate_exits"]

EVALUATE_CODE_VERSION = "evaluate-4"
"""Bump when the metrics (or `EvaluationMetrics.to_dict`'s shape) change for the same inputs;
part of the evaluate stage's content key. 4: ``deployed``, gates that read their heads' confidence."""

TOP_K = 5
"""Top-k agreement: the final layer's top-1 is among the head's k most likely tokens."""
ECE_BINS = 15
"""Equal-width confidence bins of the expected calibration error (Guo et al. 2017 use 15)."""
FIXED_GATE_THRESHOLDS = (0.5, 0.7, 0.9)
"""p_exit thresholds at which every gate's operating point is reported, calibrated or not."""

LevelOutcome = HeldOutCheck
"""One calibrated threshold (predictor, head, level) on the eval tokens: exit rate, accuracy
reached, ``met`` and ``held``. It IS `check_held_out`'s row, so the two can never disagree."""


class NonFiniteLogitsError(FloatingPointError):
    """A head, the logit lens, the teacher or a gate gave non-finite values on eval rows; every
    metric after it would be meaningless, so evaluation stops and names where."""


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class HeadQuality:
    """One head (or the logit lens at its layer) on the eval tokens."""

    layer: int
    tokens: int
    agreement: float
    """Share of tokens whose top-1 is the final layer's top-1."""
    top5_agreement: float
    """Share of tokens whose final-layer top-1 is among the head's 5 most likely tokens."""
    accuracy: float
    """Share of tokens with a next token whose top-1 is that token (NaN: no such token)."""
    perplexity: float
    """exp(mean NLL of the true next token) over tokens that have one (NaN: none)."""
    kl_from_teacher: float
    """Mean KL(teacher || head) over the full vocabulary, in nats (0 for a head equal to it)."""
    ece: float
    """Expected calibration error of the head's top-1 probability as a forecast of "top-1 equals
    the final layer's top-1": 15 equal-width bins (lo, hi] on [0, 1], gaps weighted by bin size."""
    mean_entropy: float
    """Mean entropy of the head's distribution, in nats."""
    entropy_auroc: float
    """AUROC of -entropy for agreement (NaN if every token agrees or none does)."""


@dataclass(frozen=True)
class CascadeOutcome:
    """The calibrated cascade of one predictor at one level on the eval tokens: a token exits at
    the first head whose predictor passes its threshold, else runs to the final layer."""

    predictor: str
    level: float
    exit_rates: dict[int, float]
    """Share of tokens leaving at each head layer, and at the final layer (`num_layers`)."""
    avg_exit_layer: float
    compute_saved: float
    """1 - avg_exit_layer / num_layers: the share of decoder-layer compute not run (heads' own
    cost not counted)."""
    accuracy: float
    """Share of all tokens answered right (tokens reaching the final layer count as right)."""
    met: bool
    """accuracy >= level on the eval tokens."""
    n: int
    calib_accuracy: float
    calib_avg_exit_layer: float


@dataclass(frozen=True)
class GateOperatingPoint:
    """A gate at one threshold: exit when p_exit >= threshold."""

    kind: Literal["calibrated", "fixed"]
    level: float | None
    """The calibrated level the threshold came from (None for a fixed threshold)."""
    threshold: float | None
    """None: the calibration found no threshold for this level, so nothing exits."""
    n_exited: int
    exit_rate: float
    agreement: float | None
    """Share of exited tokens whose head top-1 is the final layer's (None: none exit)."""


@dataclass(frozen=True)
class GateOutcome:
    """One gate against its head's entropy (`pipeline.scoring.GateEval`) and its operating points."""

    layer: int
    agreement: float
    gate_auroc: float
    entropy_auroc: float
    tokens: int
    operating_points: list[GateOperatingPoint]
    """The calibrated thresholds (gate predictor, the calibration's method, level order), then
    `FIXED_GATE_THRESHOLDS`."""


@dataclass(frozen=True)
class DeployedOutcome:
    """One head at one level: the predictor the calibration deploys (`Calibration.deployed`) and
    what every predictor's certified threshold does on the eval tokens."""

    head: int
    level: float
    predictor: str
    exit_rates: dict[str, float]
    """Per predictor: the share of eval tokens its certified threshold lets exit."""
    exit_rate: float
    """The deployed predictor's exit rate on eval tokens."""
    accuracy: float | None
    """Accuracy of the tokens the deployed predictor lets exit (None: none exit)."""
    held: bool
    chosen_on: str
    """Whose exit rates chose it: ``eval`` or ``calib`` (the calibration's `deployed_on`)."""


@dataclass(frozen=True)
class HeadCurves:
    """What the report draws for one head on the eval tokens."""

    layer: int
    entropy_roc: RocCurve | None
    """ROC of -entropy (None when every token agrees or none does)."""
    gate_roc: RocCurve | None
    """ROC of the gate's p_exit (None without a gate at this layer, or with one class)."""
    entropy_bins: EntropyBins


@dataclass(frozen=True)
class EvaluationMetrics:
    """Everything the evaluate stage measures on the eval split, for the manifest and report."""

    tokens: int
    num_layers: int
    layers: list[int]
    reference: str
    """What the calibration counts as right (``final`` or ``true``); guarantees and cascade use it."""
    heads: dict[int, HeadQuality]
    lens: dict[int, HeadQuality]
    """The logit lens at each head's layer: the baseline the heads improve on."""
    guarantees: list[LevelOutcome]
    cascade: list[CascadeOutcome]
    gates: dict[int, GateOutcome] = field(default_factory=dict)
    """Empty when evaluated without gates."""
    curves: dict[int, HeadCurves] = field(default_factory=dict)
    """Per head: ROC curves of -entropy and p_exit, and agreement against entropy."""
    deployed: list[DeployedOutcome] = field(default_factory=list)
    """Per head and level, the deployed predictor on the eval tokens (head order, then level)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: layer keys as strings, NaN and infinities as None."""
        return _jsonable(self)


def _jsonable(x: Any) -> Any:
    if is_dataclass(x) and not isinstance(x, type):
        return {f.name: _jsonable(getattr(x, f.name)) for f in fields(x)}
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


# ----------------------------------------------------------------------------- one pass


def _exp(x: float) -> float:
    """exp that overflows to inf (shown as None) instead of raising: a perplexity past 1e308."""
    return math.exp(x) if x < 709.0 else float("inf")


def _check_finite(values: torch.Tensor, what: str, first_row: int) -> None:
    bad = ~torch.isfinite(values)  # [b, ...]
    if bool(bad.any()):
        row = first_row + int(bad.reshape(bad.shape[0], -1).any(-1).nonzero()[0, 0])
        raise NonFiniteLogitsError(
            f"{what} gave non-finite values on eval row {row} (the first); check the eval cache for overflow "
            "(re-extract in a wider dtype) and the weights for NaN (retrain or reload them)")


class _DistributionSums:
    """Running sums, per head layer, of the metrics that need full distributions; fed each block
    by `score_rows` (`on_logits`). Sums stay on the device (float64): a block syncs only for
    the finiteness checks."""

    def __init__(self, what: str):
        self.what = what
        self.offset = 0
        """Eval rows before the current batch, for error messages; advanced by the pass."""
        self.sums: dict[int, torch.Tensor] = {}  # [5] top-k hits, NLL sum, targets, KL sum, tokens
        self.bins: dict[int, torch.Tensor] = {}  # [3, ECE_BINS] tokens, confidence sum, agreements

    def __call__(self, block: BlockLogits) -> None:
        logits, layer = block.logits.float(), block.layer  # [b, V]
        where = self.offset + block.start
        _check_finite(logits, f"the {self.what} at layer {layer}", where)
        if block.teacher_logits is None:
            raise ValueError("distribution metrics need the teacher's logits; score without teacher_top1")
        _check_finite(block.teacher_logits, "the teacher (the cache's final states)", where)
        log_p = F.log_softmax(logits, dim=-1)  # [b, V]
        log_q = F.log_softmax(block.teacher_logits.float(), dim=-1)  # [b, V]
        t_top1 = block.teacher_top1  # [b]
        k = min(TOP_K, logits.shape[-1])
        hit_k = (logits.topk(k, dim=-1).indices == t_top1[:, None]).any(-1)  # [b]
        valid = block.targets != IGNORE_INDEX  # [b]
        nll = -log_p.gather(-1, block.targets.clamp_min(0)[:, None]).squeeze(-1)  # [b]
        kl = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)  # [b] KL(q || p)
        top1 = logits.argmax(-1)  # [b], as score_rows takes it
        conf = log_p.gather(-1, top1[:, None]).squeeze(-1).exp().double()  # [b] top-1 probability
        idx = ((conf * ECE_BINS).ceil().long() - 1).clamp(0, ECE_BINS - 1)  # [b] bin (lo, hi]
        bins = torch.zeros(3, ECE_BINS, dtype=torch.float64, device=logits.device)  # [3, bins]
        bins[0].index_add_(0, idx, torch.ones_like(conf))
        bins[1].index_add_(0, idx, conf)
        bins[2].index_add_(0, idx, (top1 == t_top1).double())
        parts = [hit_k.sum(), torch.where(valid, nll, 0.0).sum(), valid.sum(), kl.sum(), torch.tensor(valid.numel())]
        sums = torch.stack([x.to(logits.device, torch.float64) for x in parts])  # [5]
        self.sums[layer] = self.sums[layer] + sums if layer in self.sums else sums
        self.bins[layer] = self.bins[layer] + bins if layer in self.bins else bins

    def quality(self, labels: ExitLabels, layer: int) -> HeadQuality:
        """The head's metrics: the top-1 ones from its exit labels, the rest from the sums."""
        hit_k, nll, n_targets, kl, n = self.sums[layer].tolist()
        if int(n) != labels.correct[layer].size:
            raise RuntimeError(f"layer {layer}: {int(n)} tokens summed but {labels.correct[layer].size} labelled")
        count, conf, agree = self.bins[layer].cpu().numpy()  # each [bins]
        correct, entropy, valid = labels.correct[layer], labels.entropy[layer], labels.has_target
        return HeadQuality(
            layer=layer, tokens=int(correct.size), agreement=float(correct.mean()), top5_agreement=hit_k / n,
            accuracy=float(labels.correct_true[layer][valid].mean()) if valid.any() else float("nan"),
            perplexity=_exp(nll / n_targets) if n_targets else float("nan"), kl_from_teacher=kl / n,
            ece=float(np.abs(agree - conf).sum() / count.sum()), mean_entropy=float(entropy.mean()),
            entropy_auroc=auroc(correct, -entropy))


class _SideScores:
    """Per batch, on the rows the pass already holds (`on_batch`): the logit lens through the
    same `score_rows`, and the gates' p_exit. So the eval source is read once."""

    def __init__(self, teacher: TeacherWeights, layers: list[int], gates: nn.ModuleDict | None,
                 lens_sums: _DistributionSums, head_sums: _DistributionSums, device: torch.device):
        self.lens, self.layers, self.device = logit_lens(teacher, layers).to(device), layers, device
        self.teacher, self.gates, self.lens_sums, self.head_sums = teacher.to(device), gates, lens_sums, head_sums
        self.lens_rows: list[dict[int, RowScores]] = []
        self.probs: dict[int, list[np.ndarray]] = {layer: [] for layer in head_layers(gates)} if gates else {}

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray], scores: dict[int, RowScores]) -> None:
        n = len(batch["targets"])
        self.lens_rows.append(score_rows(self.lens, self.teacher, batch, self.layers, self.device,
                                         on_logits=self.lens_sums)[0])
        for layer, parts in self.probs.items():
            gate = self.gates[str(layer)]  # type: ignore[index]
            feats = None if scores[layer].features is None else torch.from_numpy(scores[layer].features)  # [n, 4]
            p = gate.exit_probability(batch_tensor(batch[layer_key(layer)], module_device(gate)), feats)  # [n]
            _check_finite(p, f"the gate at layer {layer}", self.head_sums.offset)
            parts.append(p.float().cpu().numpy())
        self.head_sums.offset += n
        self.lens_sums.offset += n

    def lens_labels(self, has_target: np.ndarray) -> ExitLabels:
        def joined(name: str) -> dict[int, np.ndarray]:
            return {layer: np.concatenate([getattr(s[layer], name) for s in self.lens_rows]) for layer in self.layers}

        return ExitLabels(row=None, has_target=has_target, correct=joined("correct"),
                          correct_true=joined("correct_true"), entropy=joined("entropy"))

    def gate_probs(self) -> dict[int, np.ndarray] | None:
        return {layer: np.concatenate(parts) for layer, parts in self.probs.items()} if self.gates else None


# ----------------------------------------------------------------------------- curves


def _curves(labels: ExitLabels, gate_probs: dict[int, np.ndarray] | None) -> dict[int, HeadCurves]:
    """Per head, on all eval tokens against the final layer (as `entropy_auroc` and `gate_auroc`)."""
    out = {}
    for layer in labels.layers:
        agrees, entropy = labels.correct[layer], labels.entropy[layer]
        gate = gate_probs.get(layer) if gate_probs is not None else None
        out[layer] = HeadCurves(
            layer=layer, entropy_roc=roc_points(agrees, -entropy.astype(np.float64)),
            gate_roc=None if gate is None else roc_points(agrees, gate),
            entropy_bins=entropy_bins(entropy, agrees, labels.correct_true[layer], labels.has_target))
    return out


# ----------------------------------------------------------------------------- the stage's metrics


def _check_inputs(layers: list[int], calibration: Calibration, gates: nn.ModuleDict | None, num_layers: int) -> None:
    problems = []
    if sorted(calibration.layers) != layers:
        problems.append(f"the calibration is for layers {sorted(calibration.layers)} but the heads are at layers "
                        f"{layers}; pass the calibration fitted on these heads (the calibrate artifact built from "
                        "the same train_heads artifact)")
    if calibration.final_layer != num_layers:
        problems.append(f"the calibration's final layer is {calibration.final_layer} but num_layers={num_layers}; "
                        "pass the backbone's layer count the calibration was fitted with")
    if layers and layers[-1] >= num_layers:
        problems.append(f"head layers {layers} must lie below num_layers={num_layers}")
    if gates is not None and not set(head_layers(gates)) <= set(layers):
        problems.append(f"gates at layers {head_layers(gates)} but heads only at {layers}; pass the heads the "
                        "gates were trained on")
    if "gate" in calibration.predictors and gates is None:
        problems.append("the calibration has gate thresholds but no gates were given; pass gates=")
    if problems:
        raise ValueError("cannot evaluate: " + "; ".join(problems))


def _cascades(calibration: Calibration, labels: ExitLabels, gate_probs: dict[int, np.ndarray] | None,
              num_layers: int) -> list[CascadeOutcome]:
    """Each predictor's chosen cascade on the eval tokens, on the tokens and reference that
    `check_held_out` uses."""
    keep = _kept(labels, calibration.reference)  # [N]
    right = labels.correct_for(calibration.reference)  # type: ignore[arg-type]
    correct = {layer: right[layer][keep].astype(bool) for layer in calibration.layers}
    out = []
    for predictor in calibration.predictors:
        by_layer = gate_probs if predictor == "gate" else labels.entropy
        scores = {layer: by_layer[layer][keep] for layer in calibration.layers}  # type: ignore[index]
        fitted = calibration.chosen_cascade(predictor)
        for fit, check in zip(fitted, evaluate_cascade(scores, correct, fitted, num_layers)):
            out.append(CascadeOutcome(
                predictor=predictor, level=check.level, exit_rates=check.exit_rates,
                avg_exit_layer=check.avg_exit_layer, compute_saved=1.0 - check.avg_exit_layer / num_layers,
                accuracy=check.accuracy, met=check.met, n=check.n, calib_accuracy=fit.accuracy,
                calib_avg_exit_layer=fit.avg_exit_layer))
    return out


def _operating_point(kind: Literal["calibrated", "fixed"], level: float | None, threshold: float | None,
                     probs: np.ndarray, agrees: np.ndarray) -> GateOperatingPoint:
    m = exit_mask(probs, threshold, higher_is_confident=True)  # [N]
    k = int(m.sum())
    return GateOperatingPoint(kind=kind, level=level, threshold=threshold, n_exited=k, exit_rate=k / m.size,
                              agreement=float(agrees[m].mean()) if k else None)


def _gate_outcomes(calibration: Calibration, labels: ExitLabels,
                   gate_probs: dict[int, np.ndarray]) -> dict[int, GateOutcome]:
    """Per gate: AUROC against its head's entropy, and exit rate and agreement of the exited
    tokens (against the final layer, on all tokens) at its calibrated and fixed thresholds."""
    chosen = calibration.chosen("gate") if "gate" in calibration.predictors else {}
    out = {}
    for layer, ev in evaluate_gate_scores(labels, gate_probs).items():
        p, agrees = gate_probs[layer], labels.correct[layer]
        points = [_operating_point("calibrated", r.level, r.threshold, p, agrees) for r in chosen.get(layer, [])]
        points += [_operating_point("fixed", None, t, p, agrees) for t in FIXED_GATE_THRESHOLDS]
        out[layer] = GateOutcome(**asdict(ev), operating_points=points)
    return out


def _deployed(calibration: Calibration, guarantees: list[HeldOutCheck]) -> list[DeployedOutcome]:
    """The calibration's deployed predictor per head and level, with every predictor's exit rate
    on these eval tokens. A calibration written before deployments existed gets them chosen
    here, by the same rule, on these tokens."""
    if calibration.deployed is None:
        calibration = choose_deployed(calibration.with_held_out(guarantees))
    rows = {(r.predictor, r.head, round(r.level, 9)): r for r in guarantees}
    out = []
    for d in calibration.deployed or []:
        mine = {p: rows.get((p, d.head, round(d.level, 9))) for p in d.exit_rates}
        this = mine.get(d.predictor)
        out.append(DeployedOutcome(
            head=d.head, level=d.level, predictor=d.predictor,
            exit_rates={p: (r.exit_rate if r is not None else float("nan")) for p, r in mine.items()},
            exit_rate=this.exit_rate if this is not None else float("nan"),
            accuracy=this.accuracy if this is not None else None, held=bool(this.held) if this is not None else True,
            chosen_on=calibration.deployed_on or "eval"))
    return out


def evaluate_exits(heads: nn.ModuleDict, teacher: TeacherWeights, source: BatchSource, calibration: Calibration, *,
                   gates: nn.ModuleDict | None = None, num_layers: int, max_tokens: int | None = None,
                   batch_rows: int = 2048, progress: bool = False) -> EvaluationMetrics:
    """The evaluate stage's metrics for one head set on the eval source (its first `max_tokens`
    rows, in order), from one no-grad pass: per-head quality beside the logit lens, every
    calibrated threshold on these tokens (`check_held_out`), the calibrated cascade per
    predictor (`evaluate_cascade`; final layer = `num_layers`), the gates against entropy, and
    per head the curves a report draws (ROC of -entropy and p_exit, agreement against entropy).

    Raises `ValueError` when the calibration, gates or `num_layers` do not fit the heads, and
    `NonFiniteLogitsError` at the first non-finite logit or p_exit.
    """
    layers = head_layers(heads)
    _check_inputs(layers, calibration, gates, num_layers)
    device = module_device(heads)
    head_sums, lens_sums = _DistributionSums("head"), _DistributionSums("logit lens")
    side = _SideScores(teacher, layers, gates, lens_sums, head_sums, device)
    labels = collect_exit_labels(heads, teacher, source, max_tokens=max_tokens, batch_rows=batch_rows,
                                 progress=progress, on_batch=side, on_logits=head_sums)
    lens_labels = side.lens_labels(labels.has_target)
    gate_probs = side.gate_probs()
    guarantees = check_held_out(calibration, labels, gate_probs)
    return EvaluationMetrics(
        tokens=labels.num_tokens, num_layers=num_layers, layers=layers, reference=calibration.reference,
        heads={layer: head_sums.quality(labels, layer) for layer in layers},
        lens={layer: lens_sums.quality(lens_labels, layer) for layer in layers},
        guarantees=guarantees,
        cascade=_cascades(calibration, labels, gate_probs, num_layers),
        gates=_gate_outcomes(calibration, labels, gate_probs) if gate_probs is not None else {},
        curves=_curves(labels, gate_probs),
        deployed=_deployed(calibration, guarantees),
    )
