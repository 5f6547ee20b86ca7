"""No-grad passes that measure heads and gates on a source: per-token exit labels (for gate
training and calibration), per-head quality, the logit-lens baseline, and gates against the
head's own entropy.

Every pass reads the source in order with full-vocabulary logits, in blocks of
`SCORE_BLOCK_ROWS` so memory stays bounded whatever the batch size. Labels, evaluation and the
per-epoch probe of head training all go through `score_rows`, so "agrees with the final layer"
means one thing everywhere.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from pipeline.progress import ProgressBar

from pipeline.config import HeadsConfig
from pipeline.fit import module_device
from pipeline.gates import confidence_features, gate_exit_probabilities
from pipeline.heads import build_heads
from pipeline.losses import IGNORE_INDEX
from pipeline.sources import BatchSource, batch_tensor, check_layers, layer_key
from pipeline.teacher import TeacherWeights

SCORE_BLOCK_ROWS = 256
"""Rows scored at once with full-vocabulary logits: bounds memory at a few [256, V] float32
tensors whatever the batch size."""


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class RowScores:
    """One head on a batch of rows, each array [n]."""

    correct: np.ndarray
    """bool: the head's top-1 equals the final layer's top-1."""
    correct_true: np.ndarray
    """bool: the head's top-1 is the true next token (never where there is none)."""
    entropy: np.ndarray
    """float32: entropy of the head's distribution, in nats."""
    features: np.ndarray | None = None
    """float32 [n, 4]: `pipeline.gates.confidence_features` (what confidence-reading gates take)."""


@dataclass(frozen=True)
class ExitLabels:
    """Per-token exit labels of every head over the first rows of a source, read in order:
    what gates train on and what calibration thresholds. Arrays are [N]; dicts are keyed by
    head layer."""

    row: np.ndarray | None
    """int64 global row index of each token (None when the pass did not read rows)."""
    has_target: np.ndarray
    """bool: the token has a next token (``correct_true`` is meaningful)."""
    correct: dict[int, np.ndarray]
    """bool per head: top-1 == the final layer's top-1."""
    correct_true: dict[int, np.ndarray]
    """bool per head: top-1 == the true next token."""
    entropy: dict[int, np.ndarray]
    """float32 per head: entropy of the head's distribution, in nats."""
    features: dict[int, np.ndarray] | None = None
    """float32 [N, 4] per head: `pipeline.gates.confidence_features` of its logits (the previous
    labelled head's top-1 gives ``changed``); None where a caller built labels without them."""

    @property
    def layers(self) -> list[int]:
        return sorted(self.correct)

    @property
    def num_tokens(self) -> int:
        return int(self.has_target.size)

    def correct_for(self, reference: Literal["final", "true"]) -> dict[int, np.ndarray]:
        """Per head, right against the final layer's top-1 (``final``) or the true token (``true``)."""
        if reference not in ("final", "true"):
            raise ValueError(f"reference {reference!r} is unknown; use 'final' or 'true'")
        return self.correct if reference == "final" else self.correct_true


@dataclass(frozen=True)
class HeadEval:
    layer: int
    agreement: float
    """Share of tokens whose top-1 equals the final layer's top-1."""
    accuracy: float
    """Share of tokens with a next token whose top-1 is that token."""
    mean_entropy: float
    """Mean entropy of the head's distribution, in nats."""
    tokens: int
    entropy_auroc: float
    """AUROC of -entropy as a predictor of agreement (NaN if every token agrees or none does)."""


@dataclass(frozen=True)
class GateEval:
    """One gate on a source: how well its p_exit predicts "the head agrees with the final
    layer", beside the head's own -entropy on the same tokens (the baseline a gate must beat)."""

    layer: int
    agreement: float
    """Share of tokens whose head agrees with the final layer (the positive class's base rate)."""
    gate_auroc: float
    """AUROC of p_exit for agreement (NaN if every token agrees or none does)."""
    entropy_auroc: float
    """AUROC of the head's -entropy for agreement (NaN likewise)."""
    tokens: int


# ----------------------------------------------------------------------------- pieces


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of `scores` for binary `labels`; NaN when one class is absent (undefined then,
    and 0.5 would read as "no signal")."""
    labels = np.asarray(labels, dtype=bool)
    if labels.size == 0 or labels.all() or not labels.any():
        return float("nan")
    from sklearn.metrics import roc_auc_score  # sklearn takes ~1 s to import; only AUROC needs it

    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


def head_layers(heads: nn.ModuleDict) -> list[int]:
    """The exit layers of a `ModuleDict` of heads or gates (keyed by str(layer)), sorted."""
    return sorted(int(key) for key in heads.keys())


@dataclass(frozen=True)
class BlockLogits:
    """One head's full-vocabulary logits on one block of rows, exactly as `score_rows` scored
    them, handed to an `on_logits` callback: metrics that need the whole distribution (top-5,
    KL, calibration error; `pipeline.evaluate`) ride on the same pass instead of running the
    heads a second time."""

    layer: int
    start: int
    """Index of the block's first row within the batch."""
    logits: torch.Tensor  # [b, V] the head's logits
    teacher_logits: torch.Tensor | None  # [b, V]; None when the caller passed `teacher_top1`
    teacher_top1: torch.Tensor  # [b] int64
    targets: torch.Tensor  # [b] int64, IGNORE_INDEX where there is no next token


OnLogits = Callable[[BlockLogits], None]


@torch.no_grad()
def score_rows(heads: nn.ModuleDict, teacher: TeacherWeights, batch: dict[str, np.ndarray], layers: Sequence[int],
               device: torch.device, teacher_top1: np.ndarray | None = None, on_logits: OnLogits | None = None
               ) -> tuple[dict[int, RowScores], np.ndarray]:
    """Full-vocabulary top-1 and entropy of every head on a batch, against the teacher's top-1
    (from the batch's final states, or `teacher_top1` [n] when given) and the true next token.
    Returns the scores per layer and `has_target` [n]. `teacher` must be on `device`.

    Blocks are the outer loop so the teacher's logits of a block are computed once and shared
    by every head (and by `on_logits`, which sees each head's logits of each block)."""
    targets = batch_tensor(batch["targets"].astype(np.int64), device)  # [n]
    n, blk = targets.shape[0], SCORE_BLOCK_ROWS
    given = None if teacher_top1 is None else batch_tensor(np.asarray(teacher_top1).astype(np.int64), device)  # [n]
    top1: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    features: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    t_top1_parts = []
    for a in range(0, n, blk):
        t_logits = None
        if given is None:
            t_logits = teacher.logits(batch_tensor(batch["final"][a : a + blk], device))  # [b, V]
        t_top1 = given[a : a + blk] if given is not None else t_logits.argmax(-1)  # [b]
        t_top1_parts.append(t_top1)
        prev = None
        for layer in layers:
            logits = heads[str(layer)](batch_tensor(batch[layer_key(layer)][a : a + blk], device))  # [b, V]
            top1[layer].append(logits.argmax(-1))  # [b]
            features[layer].append(confidence_features(logits, prev))  # [b, 4] entropy first
            prev = top1[layer][-1]
            if on_logits is not None:
                on_logits(BlockLogits(layer=layer, start=a, logits=logits, teacher_logits=t_logits,
                                      teacher_top1=t_top1, targets=targets[a : a + blk]))
    t_top1_all = torch.cat(t_top1_parts)  # [n]
    scores: dict[int, RowScores] = {}
    for layer in layers:
        top1_t = torch.cat(top1[layer])  # [n]
        feats = torch.cat(features[layer]).float().cpu().numpy()  # [n, 4]
        scores[layer] = RowScores(
            correct=(top1_t == t_top1_all).cpu().numpy(),
            correct_true=(top1_t == targets).cpu().numpy(),  # never true where targets == -1
            entropy=np.ascontiguousarray(feats[:, 0]),
            features=feats,
        )
    return scores, (targets != IGNORE_INDEX).cpu().numpy()


OnBatch = Callable[[dict[str, np.ndarray], dict[int, RowScores]], None]


def _label_pass(heads: nn.ModuleDict, teacher: TeacherWeights, source: BatchSource, *, max_tokens: int | None,
                batch_rows: int, with_rows: bool, on_batch: OnBatch | None = None,
                on_logits: OnLogits | None = None, progress: bool = False, desc: str = "score") -> ExitLabels:
    """One sequential no-grad pass over the first `max_tokens` rows: per token and head,
    whether the head's top-1 matches the teacher / the true token, and its entropy."""
    if max_tokens is not None and max_tokens <= 0:
        raise ValueError(f"max_tokens={max_tokens} must be positive or None")
    layers = head_layers(heads)
    device = module_device(heads)
    teacher = teacher.to(device)
    names = [layer_key(layer) for layer in layers] + ["final", "targets"] + (["row"] if with_rows else [])
    limit = source.num_tokens if max_tokens is None else min(max_tokens, source.num_tokens)
    rows: list[np.ndarray] = []
    has_target: list[np.ndarray] = []
    per_layer: dict[int, list[RowScores]] = defaultdict(list)
    seen = 0
    was_training = heads.training
    heads.eval()
    bar = ProgressBar(total=limit, unit="tok", unit_scale=True, desc=desc, disable=not progress, dynamic_ncols=True)
    batches = source.iter_batches(names, batch_rows, shuffle=False)
    try:
        for batch in batches:
            take = min(len(batch["targets"]), limit - seen)
            if take < len(batch["targets"]):
                batch = {k: v[:take] for k, v in batch.items()}
            scores, valid = score_rows(heads, teacher, batch, layers, device, on_logits=on_logits)
            if with_rows:
                rows.append(batch["row"].astype(np.int64))
            has_target.append(valid)
            for layer, s in scores.items():
                per_layer[layer].append(s)
            if on_batch is not None:
                on_batch(batch, scores)
            seen += take
            bar.update(take)
            if seen >= limit:
                break
    finally:
        batches.close()
        bar.close()
        heads.train(was_training)
    if not seen:
        raise ValueError("the source yielded no rows to score; check that the split was extracted")

    def joined(field: str) -> dict[int, np.ndarray]:
        return {layer: np.concatenate([getattr(s, field) for s in per_layer[layer]]) for layer in layers}

    return ExitLabels(row=np.concatenate(rows) if with_rows else None, has_target=np.concatenate(has_target),
                      correct=joined("correct"), correct_true=joined("correct_true"), entropy=joined("entropy"),
                      features=joined("features"))


# ----------------------------------------------------------------------------- public passes


def collect_exit_labels(heads: nn.ModuleDict, teacher: TeacherWeights, source: BatchSource, *,
                        max_tokens: int | None = None, batch_rows: int = 2048, progress: bool = False,
                        on_batch: OnBatch | None = None, on_logits: OnLogits | None = None) -> ExitLabels:
    """Per-token exit labels of every head from one no-grad pass over the first `max_tokens`
    rows, in order, for gate training and calibration. Needs the source's ``row``.
    `on_batch(batch, scores)` sees each batch with its scores (gate training keeps a held-out
    slice of hidden states that way, without a second read); `on_logits` sees every head's
    full logits per block (evaluation's distribution metrics, same reason)."""
    return _label_pass(heads, teacher, source, max_tokens=max_tokens, batch_rows=batch_rows, with_rows=True,
                       on_batch=on_batch, on_logits=on_logits, progress=progress, desc="exit labels")


def evaluate_heads(heads: nn.ModuleDict, teacher: TeacherWeights, source: BatchSource, *,
                   max_tokens: int | None = None, batch_rows: int = 2048,
                   progress: bool = False) -> dict[int, HeadEval]:
    """Per-head quality on a source (the eval split; the logit lens for the baseline): a
    sequential no-grad pass with full-vocabulary logits over the first `max_tokens` rows."""
    labels = _label_pass(heads, teacher, source, max_tokens=max_tokens, batch_rows=batch_rows, with_rows=False,
                         progress=progress, desc="evaluate heads")
    valid = labels.has_target
    out = {}
    for layer in labels.layers:
        correct, entropy = labels.correct[layer], labels.entropy[layer]
        out[layer] = HeadEval(
            layer=layer,
            agreement=float(correct.mean()),
            accuracy=float(labels.correct_true[layer][valid].mean()) if valid.any() else float("nan"),
            mean_entropy=float(entropy.mean()),
            tokens=int(correct.size),
            entropy_auroc=auroc(correct, -entropy),
        )
    return out


def logit_lens(teacher: TeacherWeights, layers: Sequence[int]) -> nn.ModuleDict:
    """The untrained baseline: per layer, exactly the backbone's final norm + LM head.

    A fresh adapter head is that (its up-projection starts at zero, so features = norm(h) + 0),
    which keeps one code path for scoring baselines and trained heads. Frozen; built under a
    forked RNG so asking for a baseline does not move the caller's random stream.
    """
    cfg = HeadsConfig(kind="adapter", rank=1)
    with torch.random.fork_rng(devices=[]):
        heads = build_heads(cfg, check_layers(layers), teacher)
    heads.requires_grad_(False)
    return heads.eval()


def evaluate_gate_scores(labels: ExitLabels, exit_probs: Mapping[int, np.ndarray]) -> dict[int, GateEval]:
    """Per gate layer: AUROC of p_exit (`exit_probs`, the gates' scores on the same rows as
    `labels`) and of the head's -entropy for "the head agrees with the final layer"."""
    out = {}
    for layer in sorted(int(k) for k in exit_probs):
        if layer not in labels.correct:
            raise ValueError(f"gate layer {layer} has no head labels (labelled heads: {labels.layers}); "
                             "score the heads the gates were trained on")
        y, p = labels.correct[layer], np.asarray(exit_probs[layer])
        if p.shape != y.shape:
            raise ValueError(f"gate {layer} scored {p.shape[0]} tokens but its head {y.shape[0]}; score both on "
                             "the same rows (the same source and max_tokens)")
        out[layer] = GateEval(layer=layer, agreement=float(y.mean()), gate_auroc=auroc(y, p),
                              entropy_auroc=auroc(y, -labels.entropy[layer]), tokens=int(y.size))
    return out


def evaluate_gates(heads: nn.ModuleDict, gates: nn.ModuleDict, teacher: TeacherWeights, source: BatchSource, *,
                   max_tokens: int | None = None, batch_rows: int = 2048,
                   progress: bool = False) -> dict[int, GateEval]:
    """Each gate's AUROC against its head's entropy on a source (the eval split): labels from
    `collect_exit_labels`, p_exit from `gate_exit_probabilities`, over the same first rows."""
    missing = sorted(set(head_layers(gates)) - set(head_layers(heads)))
    if missing:
        raise ValueError(f"no heads for gate layers {missing} (heads exist for {head_layers(heads)}); "
                         "pass the heads the gates were trained on")
    heads = nn.ModuleDict({str(layer): heads[str(layer)] for layer in head_layers(gates)})  # a view, no copy
    labels = collect_exit_labels(heads, teacher, source, max_tokens=max_tokens, batch_rows=batch_rows,
                                 progress=progress)
    probs = gate_exit_probabilities(gates, source, max_tokens=max_tokens, batch_rows=batch_rows,
                                    features=labels.features)
    return evaluate_gate_scores(labels, probs)
