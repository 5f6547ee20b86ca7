"""Losses and metrics for exit heads: distillation to the final layer, cross-entropy to the
true token, their cheap per-row top-k version, and per-layer weights.

All losses compute in float32 whatever the input dtype: the cache is float16/bfloat16 and a
softmax over ~50k logits in half precision loses the tail.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from pipeline.config import HeadsConfig
from pipeline.heads import ExitHead

logger = logging.getLogger(__name__)

IGNORE_INDEX = -1
"""Target id of positions without a next token (sequence ends); ignored by cross-entropy."""


def kl_distill(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               student_log_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows of KL(teacher || student) at temperature T, times T^2.

    `teacher_logits` [n, k] with k <= the student's columns: the teacher is spread over the
    first k columns only (the candidate loss puts each row's teacher top-k first), so the
    teacher-side work is [n, k], not [n, V].

    The T^2 factor keeps gradient magnitudes comparable across temperatures (Hinton et al.),
    so changing T does not silently change the effective learning rate. Teacher entries with
    zero probability (e.g. -inf logits) contribute 0, not NaN. `student_log_weight` ([V] or
    [n, V]) is added to the tempered student logits: the log importance weight of sampled
    columns, each standing in for several tokens of the student's partition function.
    """
    t = float(temperature)
    z = student_logits.float() / t  # [n, V]
    log_s = F.log_softmax(z if student_log_weight is None else z + student_log_weight, dim=-1)  # [n, V]
    k = teacher_logits.shape[-1]  # the teacher may cover only the first k columns (the rest: no mass)
    log_t = F.log_softmax(teacher_logits.float() / t, dim=-1)  # [n, k]
    p_t = log_t.exp()  # [n, k]
    kl = torch.where(p_t > 0, p_t * (log_t - log_s[:, :k]), 0.0).sum(dim=-1)  # [n]
    return kl.mean() * (t * t)


def cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor,
                  log_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over rows whose target is not -1 (sequence ends have no next token).

    Divides by the number of valid rows clamped to 1, so a batch without any valid target
    gives 0 (with a graph) instead of NaN, and no host sync is needed to check for that.
    `log_weight` ([V] or [n, V]) is added to the logits, as in `kl_distill`.
    """
    logits = student_logits.float() if log_weight is None else student_logits.float() + log_weight
    total = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    n_valid = (targets != IGNORE_INDEX).sum().clamp_min(1)
    return total / n_valid


def head_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, targets: torch.Tensor | None, cfg: HeadsConfig,
    student_log_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The configured head objective: `kl` to the final layer, `ce` to the true token, or
    `mix` = (1 - ce_weight) * kl + ce_weight * ce. Works on full-vocabulary logits and on
    candidate-subset logits alike (then targets are positions in the subset, and
    `student_log_weight` the log importance weight of each column, see `kl_distill`)."""
    w = student_log_weight
    if cfg.loss == "kl":
        return kl_distill(student_logits, teacher_logits, cfg.temperature, w)
    if cfg.loss == "ce":
        return cross_entropy(student_logits, targets, w)
    kl = kl_distill(student_logits, teacher_logits, cfg.temperature, w)
    return (1.0 - cfg.ce_weight) * kl + cfg.ce_weight * cross_entropy(student_logits, targets, w)


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
class TopkCandidates:
    """The per-row candidate sets of one batch, built once and shared by every head.

    Row i is scored on the columns ``[its teacher top-k | its target | the shared negatives]``
    (the target column only when the loss has a CE term). Columns that would score a token
    twice in one row (a negative that is also among the row's top-k or its target; a target
    column whose target is already in the top-k or absent) are invalid: the student's logit
    there is masked to -inf, so every token counts once in the row's partition function.
    """

    row_ids: torch.Tensor
    """[n, k] or [n, k + 1] long: each row's teacher top-k ids, then its target (0 where unused)."""
    negatives: torch.Tensor
    """[m] long: sampled token ids, distinct, shared by the rows (see `build`)."""
    valid: torch.Tensor
    """[n, c] bool, c = row_ids.shape[1] + m: the columns that are real, distinct candidates."""
    teacher_logits: torch.Tensor
    """[n, k] float32: the teacher's full-softmax log-probabilities on the top-k columns, the
    first k; it has no mass on the other columns (negatives, a target outside the top-k)."""
    target_pos: torch.Tensor
    """[n] long: column of each row's target, -1 where there is none (or it is not a candidate)."""
    log_weight: torch.Tensor
    """[c] float32: log importance weight of each column in the student's partition function,
    0 for the row's own columns and -log(inclusion probability) for each negative: log(V / m)
    for m uniform draws (see `topk_distill_loss`)."""

    @classmethod
    def build(cls, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, targets: torch.Tensor, vocab_size: int,
              negatives: int, *, with_target: bool, generator: torch.Generator | None = None,
              inclusion: torch.Tensor | None = None) -> "TopkCandidates":
        """Candidates from the teacher's top-k of each row: ids [n, k] (distinct per row) and
        their log-probabilities under the full softmax [n, k], targets [n] (-1: none).
        `with_target` adds a column for a target outside the row's top-k (CE needs the true
        token among the candidates). Cost O(V + n (k + m)); no [n, V].

        Negatives: `negatives` distinct ids, drawn uniformly or, with `inclusion` [V] (pi =
        `inclusion_probabilities(negative_proposal(...), negatives)`, computed once per run),
        so that token v is among them with probability pi_v; it then weighs 1 / pi_v in the
        student's partition function."""
        n, k = topk_ids.shape
        if topk_logprobs.shape != (n, k) or targets.shape != (n,):
            raise ValueError(
                f"topk_ids {tuple(topk_ids.shape)}, topk_logprobs {tuple(topk_logprobs.shape)} and targets "
                f"{tuple(targets.shape)} disagree; pass [n, k], [n, k] and [n] for the same rows"
            )
        device = topk_ids.device
        ids, targets = topk_ids.long(), targets.long().to(device)
        if inclusion is None:
            m = min(int(negatives), vocab_size)
            neg = torch.randperm(vocab_size, generator=generator, device=device)[:m]  # [m]
            neg_log_weight = torch.full((m,), math.log(vocab_size / m) if m else 0.0, device=device)  # [m]
        else:
            neg, neg_log_weight = _draw_negatives(inclusion.to(device), int(negatives), generator)  # [m], [m]
            m = int(neg.shape[0])
        # a negative is invalid in the rows where it is also a top-k id (or the target, when that
        # is a candidate): look each row's ids up in a token -> negative-column table,
        # O(V + n k), no [n, m, k] comparison
        column = torch.full((vocab_size + 1,), m, dtype=torch.long, device=device)  # [V + 1]; m = "not a negative"
        column[neg] = torch.arange(m, device=device)
        taken = ids  # [n, k]
        if with_target:
            no_target = torch.full_like(targets, vocab_size)  # -> the table's "not a negative" slot
            taken = torch.cat([ids, torch.where(targets >= 0, targets, no_target)[:, None]], dim=1)  # [n, k + 1]
        clash = column[taken]  # [n, k(+1)] negative column of each taken token, m if none
        neg_valid = torch.ones(n, m + 1, dtype=torch.bool, device=device)
        neg_valid = neg_valid.scatter_(1, clash, False)[:, :m]  # [n, m]
        hit = ids == targets[:, None]  # [n, k]
        in_topk = hit.any(dim=1)  # [n]
        target_pos = torch.where(in_topk, hit.int().argmax(dim=1), torch.full_like(targets, IGNORE_INDEX))  # [n]
        parts_ids, parts_valid = [ids], [torch.ones(n, k, dtype=torch.bool, device=device)]
        if with_target:
            extra = (targets != IGNORE_INDEX) & ~in_topk  # [n] rows whose target needs its own column
            parts_ids.append(torch.where(extra, targets, 0)[:, None])  # [n, 1]
            parts_valid.append(extra[:, None])
            target_pos = torch.where(extra, torch.full_like(targets, k), target_pos)  # [n]
        row_ids = torch.cat(parts_ids, dim=1)  # [n, k(+1)]
        valid = torch.cat(parts_valid + [neg_valid], dim=1)  # [n, c]
        teacher_logits = topk_logprobs.float().to(device)  # [n, k]
        # a negative drawn with probability pi stands for 1 / pi tokens outside the row's own
        # columns (Horvitz-Thompson), so the sampled partition function is an unbiased
        # estimate of the student's full one
        log_weight = torch.cat([torch.zeros(row_ids.shape[1], device=device), neg_log_weight.float()])  # [c]
        return cls(row_ids=row_ids, negatives=neg, valid=valid, teacher_logits=teacher_logits, target_pos=target_pos,
                   log_weight=log_weight)


PROPOSAL_UNIFORM_SHARE = 0.25
"""Share of the negative proposal spread evenly over the vocabulary, so that no token has a
zero (or tiny) inclusion probability: a token the teacher never ranks can still be one the
student favours, and its importance weight 1 / pi stays bounded (at most 4 V / negatives)."""


def negative_proposal(token_mass: torch.Tensor, power: float = 0.5) -> torch.Tensor:
    """The distribution negatives are drawn from: [V] teacher probability mass per token
    (summed over rows, e.g. from the top-k) -> [V] probabilities

        Q = (1 - u) * mass^power / sum(mass^power) + u / V,   u = PROPOSAL_UNIFORM_SHARE

    Why not uniform: the tokens the student wrongly favours are mostly the frequent ones. On
    SmolLM2-135M over the Python reference, after 48 steps of the efficient loss with uniform
    negatives, 60 % of the student's mass sat on the 512 tokens with the most teacher mass, and
    69 % of its wrong top-1s were among them; a uniform draw of 256 of 49,152 tokens hits one
    of those 512 about 3 times a step, so the partition function is estimated with a large
    variance, and top-1 agreement trailed the full loss by 5.8 points. Sampling proportionally
    to the frequency (sqrt-flattened, as word2vec flattens with 3/4, so the long tail keeps
    some share) puts most draws where the student's mass is. `power` 1 follows the teacher's
    marginal, 0 is uniform.
    """
    mass = token_mass.double().clamp_min(0)  # [V]
    vocab = mass.shape[0]
    uniform = torch.full_like(mass, 1.0 / vocab)  # [V]
    if not torch.isfinite(mass).all():
        raise ValueError("the token mass for the negative proposal is not finite; recompute the teacher top-k")
    shaped = mass.pow(power)  # [V]
    total = shaped.sum()
    if total <= 0:
        return uniform.float()
    return ((1 - PROPOSAL_UNIFORM_SHARE) * shaped / total + PROPOSAL_UNIFORM_SHARE * uniform).float()  # [V]


def inclusion_probabilities(proposal: torch.Tensor, size: int) -> torch.Tensor:
    """[V] probabilities -> [V] inclusion probabilities pi of a sample of `size` distinct
    tokens drawn in proportion to them: pi = min(1, c * Q), c set so that sum(pi) = size.
    Tokens whose share would exceed 1 are taken every time (pi = 1, weight 1) and the rest of
    the sample is spread over the others, so the most frequent tokens are always scored."""
    q = proposal.double()  # [V]
    vocab = q.shape[0]
    if size >= vocab:
        return torch.ones_like(q)
    certain = torch.zeros(vocab, dtype=torch.bool, device=q.device)  # [V]
    while True:
        scale = (size - int(certain.sum())) / q[~certain].sum().clamp_min(1e-300)
        pi = torch.where(certain, 1.0, q * scale)  # [V]
        over = (pi > 1) & ~certain
        if not over.any():
            return pi.clamp_max(1.0)
        certain |= over


def _draw_negatives(pi: torch.Tensor, size: int, generator: torch.Generator | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly min(size, V) distinct ids, token v with probability pi [V] (from
    `inclusion_probabilities(proposal, size)`; systematic sampling in a random order: the cumulative pi of a shuffled vocabulary, hit at
    u, u + 1, ..., u + size - 1 for one uniform u; a token's stretch is at most 1 long, so it
    is hit at most once, and with probability pi) -> ids [m] and log importance weights
    -log pi [m]. A fixed size keeps every batch's tensors the same shape (a varying one cost
    a fifth of the step in fresh allocations on CPU)."""
    vocab = pi.shape[0]
    size = min(int(size), vocab)
    if size <= 0:
        return pi.new_zeros(0, dtype=torch.long), pi.new_zeros(0, dtype=torch.float)
    total = float(pi.sum())
    if abs(total - size) > 1e-3 * size:
        raise ValueError(f"the inclusion probabilities sum to {total:.3f}, not the {size} negatives asked for; "
                         f"compute them with inclusion_probabilities(proposal, {size})")
    order = torch.randperm(vocab, generator=generator, device=pi.device)  # [V]
    edges = torch.cumsum(pi[order], dim=0)  # [V] float64
    start = torch.rand(1, generator=generator, device=pi.device, dtype=torch.float64)  # [1]
    points = start + torch.arange(size, device=pi.device, dtype=torch.float64)  # [m]
    picked = torch.searchsorted(edges, points, right=True).clamp_max(vocab - 1)  # [m]
    ids = order[picked]  # [m]
    if torch.unique(ids).numel() != size:  # only from float rounding at a stretch's edge
        ids = torch.unique(ids)
    return ids, (-pi[ids].log()).float()  # [m], [m]


def topk_distill_loss(head: ExitHead, feats: torch.Tensor, cand: TopkCandidates, cfg: HeadsConfig) -> torch.Tensor:
    """The head loss on each row's own candidate set; never scores the batch-wide union, never
    builds [n, V] (student or teacher).

    feats [n, H] (from `head.features`). Student logits: the row's top-k (and target) through
    `head.project_rows` (a gathered [n, k, H] weight, n*k*H multiply-adds) and the shared
    negatives through `head.project` ([n, m]); duplicate columns masked to -inf. Then the
    configured `head_loss` on those [n, c] columns, with the teacher's top-k log-probs as its
    logits (so temperature and the kl / ce / mix choice mean what they mean on the full
    vocabulary).

    Approximation, row by row, with T_i its teacher top-k and C_i its candidate set:
    - the teacher is its full softmax restricted to T_i and renormalised, p(t) / p(T_i); its
      mass outside T_i (the tail) is treated as 0. On SmolLM2-135M over the Python reference
      a row's top-16 holds ~81 % of the teacher's probability on average (top-64: ~90 %), so
      the loss still sees the shape of the head of the distribution, not just its argmax;
    - the student's partition function is estimated, not truncated: its own columns count
      once, and each valid negative, drawn with probability pi, counts 1 / pi times
      (`TopkCandidates.log_weight`, a Horvitz-Thompson estimate, unbiased for Z though log Z
      is then biased low). Without that weight the loss only asks the teacher's tokens to
      beat the sampled ones, and a token that is neither gains student mass unpenalised:
      measured on SmolLM2 (16k tokens, 4 adapters, 256 uniform negatives), 48 steps without
      it drove layers 12 / 18 *below* the logit lens (mean agreement 0.140 vs 0.202 with it;
      lens 0.137);
    - so the loss approximates KL(p(.|T_i) || q) with q the student's full softmax: minimal
      when q puts all its mass on T_i in the teacher's proportions, i.e. the teacher's tail
      is pushed down like the rest. That sharpening does not hurt the top-1 the exits need:
      the full loss with the teacher cut to its top-64 (exact student softmax) reached 0.271
      mean agreement against 0.260 for the untruncated one (48 steps, as below);
    - a wrong token the student favours is penalised only when a negative hits it (the full
      loss pushes it down every step), so the variance of the estimate is what separates
      this loss from the full one. Drawing negatives from `negative_proposal` (where the
      student's mass is) rather than uniformly is what closes the gap (see
      benchmarks/results/train.md).
    Compared with scoring every row on the union of the batch's top-k (~5,600 ids for 1024
    rows and k = 64), a row no longer sees the other rows' top-k ids, and the cost drops from
    n*|union|*H to n*(k + m)*H. With k = V and no negatives the loss equals the
    full-vocabulary loss exactly (tested).
    """
    n = feats.shape[0]
    if cand.row_ids.shape[0] != n:
        raise ValueError(
            f"feats has {n} rows but the candidates {cand.row_ids.shape[0]}; build TopkCandidates from the "
            "same batch rows as feats"
        )
    student = torch.cat([head.project_rows(feats, cand.row_ids), head.project(feats, cand.negatives)], dim=1)  # [n, c]
    student = student.masked_fill(~cand.valid, float("-inf"))  # [n, c] each token once per row
    return head_loss(student, cand.teacher_logits, cand.target_pos, cfg, student_log_weight=cand.log_weight)


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
    return softmax_entropy(logits)[1]


def softmax_entropy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(logits) [n, V] in float32 and its natural-log entropy [n] (see `head_entropy`),
    for callers that need the probabilities too."""
    log_p = F.log_softmax(logits.float(), dim=-1)  # [n, V]
    p = log_p.exp()  # [n, V]
    return p, -torch.where(p > 0, p * log_p, 0.0).sum(dim=-1)
