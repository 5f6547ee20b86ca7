"""Losses and metrics for exit heads: distillation to the final layer, cross-entropy to the
true token, their cheap candidate-subset versions, and per-layer weights.

All losses compute in float32 whatever the input dtype: the cache is float16/bfloat16 and a
softmax over ~50k logits in half precision loses the tail.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from pipeline.config import HeadsConfig
from pipeline.heads import ExitHead

logger = logging.getLogger(__name__)

IGNORE_INDEX = -1
"""Target id of positions without a next token (sequence ends); ignored by cross-entropy."""


def kl_distill(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over rows of KL(teacher || student) at temperature T, times T^2.

    The T^2 factor keeps gradient magnitudes comparable across temperatures (Hinton et al.),
    so changing T does not silently change the effective learning rate. Teacher entries with
    zero probability (e.g. -inf logits) contribute 0, not NaN.
    """
    t = float(temperature)
    log_s = F.log_softmax(student_logits.float() / t, dim=-1)  # [n, V]
    log_t = F.log_softmax(teacher_logits.float() / t, dim=-1)  # [n, V]
    p_t = log_t.exp()  # [n, V]
    kl = torch.where(p_t > 0, p_t * (log_t - log_s), 0.0).sum(dim=-1)  # [n]
    return kl.mean() * (t * t)


def cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over rows whose target is not -1 (sequence ends have no next token).

    Divides by the number of valid rows clamped to 1, so a batch without any valid target
    gives 0 (with a graph) instead of NaN, and no host sync is needed to check for that.
    """
    total = F.cross_entropy(student_logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    n_valid = (targets != IGNORE_INDEX).sum().clamp_min(1)
    return total / n_valid


def head_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, targets: torch.Tensor | None, cfg: HeadsConfig
) -> torch.Tensor:
    """The configured head objective: `kl` to the final layer, `ce` to the true token, or
    `mix` = (1 - ce_weight) * kl + ce_weight * ce. Works on full-vocabulary logits and on
    candidate-subset logits alike (then targets are positions in the subset)."""
    if cfg.loss == "kl":
        return kl_distill(student_logits, teacher_logits, cfg.temperature)
    if cfg.loss == "ce":
        return cross_entropy(student_logits, targets)
    kl = kl_distill(student_logits, teacher_logits, cfg.temperature)
    return (1.0 - cfg.ce_weight) * kl + cfg.ce_weight * cross_entropy(student_logits, targets)


def layer_weights(
    layers: Sequence[int],
    num_layers: int,
    scheme: Literal["uniform", "proportional"],
    normalize: bool = True,
) -> list[float]:
    """Per-head loss weights.

    `proportional` follows the layer-proportional early-exit weighting w_i = (i+1)/L, where i
    is the 0-based index of a decoder layer and L the backbone depth. Our exit layers are
    1-based (layer l is the output of the l-th decoder layer, i = l-1), so w = l/L: the share
    of the backbone a head has seen. Deeper heads can get closer to the teacher, so they are
    asked to.

    Normalisation (default): weights are rescaled to mean 1 across the given heads, so
    `sum(w_k * loss_k) / K` is on the scale of the uniform mean and `grad_clip` and the
    learning rate mean the same under both schemes; only the relative emphasis changes.
    `normalize=False` returns the raw l/L. Note: heads have disjoint parameters, so with Adam
    (scale-invariant per parameter) these weights act mostly through the global grad-norm clip.
    """
    layers = [int(layer) for layer in layers]
    bad = [layer for layer in layers if not 1 <= layer <= num_layers]
    if bad:
        raise ValueError(f"exit layers {bad} are outside 1..{num_layers} (1-based decoder layers of the backbone)")
    if scheme == "uniform":
        return [1.0] * len(layers)
    if scheme != "proportional":
        raise ValueError(f"unknown layer weight scheme {scheme!r}; use 'uniform' or 'proportional'")
    raw = [layer / num_layers for layer in layers]
    if not normalize or not raw:
        return raw
    mean = sum(raw) / len(raw)
    return [w / mean for w in raw]


@dataclass
class Candidates:
    """The vocabulary subset one batch is scored on, shared by every head of that batch."""

    idx: torch.Tensor  # [k] long, sorted unique token ids
    teacher_logits: torch.Tensor  # [n, k] teacher logits on idx
    target_pos: torch.Tensor  # [n] long, position of each row's target in idx, -1 if absent

    @classmethod
    def from_teacher_logits(
        cls,
        teacher_logits: torch.Tensor,
        targets: torch.Tensor,
        topk: int,
        negatives: int,
        generator: torch.Generator | None = None,
    ) -> "Candidates":
        """Build the batch's candidates from full teacher logits [n, V], computed once per
        batch (they are needed anyway to find the teacher's top-k)."""
        vocab_size = teacher_logits.shape[-1]
        top = teacher_logits.topk(min(topk, vocab_size), dim=-1).indices  # [n, topk]
        idx = sample_candidates(top, targets, vocab_size, negatives, generator)  # [k]
        return cls(idx=idx, teacher_logits=teacher_logits.index_select(1, idx), target_pos=locate_targets(idx, targets))


def sample_candidates(
    teacher_topk_idx: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    negatives: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sorted unique union of the batch's teacher top-k [n, topk], its true targets [n] (-1
    skipped) and `negatives` uniformly drawn ids (with replacement, so a few may collide).

    The union over the batch is used by every row: a row is scored on its own top-k plus the
    others', which covers more of its mass than its own top-k alone.
    """
    device = teacher_topk_idx.device
    neg = torch.randint(0, vocab_size, (negatives,), generator=generator, device=device)  # [negatives]
    parts = [teacher_topk_idx.reshape(-1), targets[targets != IGNORE_INDEX].to(device), neg]
    return torch.unique(torch.cat(parts).long())  # [k] sorted


def locate_targets(cand_idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Position of each target id [n] in cand_idx [k] (unique ids, any order); -1 where the
    target is -1 or not a candidate. O(n log k), no [n, k] comparison matrix."""
    if cand_idx.numel() == 0:
        return torch.full_like(targets, IGNORE_INDEX)  # [n]
    sorted_idx, order = cand_idx.sort()  # [k], [k]
    pos = torch.searchsorted(sorted_idx, targets).clamp_max(sorted_idx.numel() - 1)  # [n]
    found = (sorted_idx[pos] == targets) & (targets != IGNORE_INDEX)  # [n]
    return torch.where(found, order[pos], torch.full_like(targets, IGNORE_INDEX))  # [n]


def efficient_head_loss(
    head: ExitHead,
    feats: torch.Tensor,
    cand_idx: torch.Tensor,
    teacher_logits_sub: torch.Tensor,
    targets: torch.Tensor,
    cfg: HeadsConfig,
    target_pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """The head loss on a candidate subset S of the vocabulary; never builds [n, V].

    feats [n, H] (from `head.features`), cand_idx [k], teacher_logits_sub [n, k], targets [n]
    (token ids; or pass `target_pos` from `Candidates` to skip locating them again).

    Approximation: student and teacher are both renormalised over S, and the loss is
    KL(p_teacher|S || p_student|S) (and CE = -log p_student|S(target) when the target is in S).
    It is zero exactly when the student's logits on S equal the teacher's up to a per-row
    constant, and it differs from the full KL only through the teacher mass outside S. That
    mass is small because S holds the teacher's top-k: an LM's next-token distribution is
    peaked. Measured on SmolLM2-135M over the Python reference: a row's own top-64 holds 89 %
    of the teacher's probability on average (median 93 %); the union over a 1024-token batch
    of top-64 ids, targets and 1024 negatives (~6,800 ids, 14 % of the vocabulary, ~7x less
    projection work) covers 97.5 % on average (10th percentile 93.5 %), and the logit lens's
    subset KL is within 1 % of its full KL at layers 6, 12 and 24.
    What S cannot see is the student's own tail: a token outside S may gain student mass
    unpenalised in that step. The uniform negatives are a fresh random slice of the tail every
    step, which is what keeps the student's tail down over training. A log-Q (importance)
    correction, each negative standing in for (V - |positives|) / negatives tokens, would let
    the subset partition functions estimate the full ones and shrink the remaining bias, at
    the price of variance and of telling negatives from positives; it is not applied, so the
    loss is a plain function of S that equals the full loss exactly when S is the whole
    vocabulary. Subset CE is a lower bound of full CE (the subset partition is smaller).
    """
    n, k = feats.shape[0], cand_idx.numel()
    if teacher_logits_sub.shape != (n, k):
        raise ValueError(
            f"teacher_logits_sub has shape {tuple(teacher_logits_sub.shape)}, expected [{n}, {k}] "
            "(the teacher's logits gathered at cand_idx for the same rows as feats)"
        )
    student_sub = head.project(feats, cand_idx)  # [n, k]
    pos = locate_targets(cand_idx, targets) if target_pos is None else target_pos  # [n]
    return head_loss(student_sub, teacher_logits_sub, pos, cfg)


def topk_agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """Share of rows whose argmax (top-1) agrees with the teacher's: the quantity an exit must
    preserve for greedy decoding to be unchanged."""
    if student_logits.shape[0] == 0:
        raise ValueError("topk_agreement got an empty batch; pass at least one row")
    agree = student_logits.argmax(dim=-1) == teacher_logits.argmax(dim=-1)  # [n]
    return agree.float().mean().item()


def head_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Natural-log entropy of softmax(logits) per row, [n, V] -> [n].

    A confidence signal for calibration and the entropy baseline of gates; computed from
    log_softmax so large logits do not overflow, and 0 * log 0 counts as 0.
    """
    log_p = F.log_softmax(logits.float(), dim=-1)  # [n, V]
    p = log_p.exp()  # [n, V]
    return -torch.where(p > 0, p * log_p, 0.0).sum(dim=-1)  # [n]
