"""The teacher's top-k: per token, the final layer's k most likely next tokens and their
log-probabilities under the full softmax.

Why precompute it: on small backbones the teacher's full-vocabulary logits cost more than
anything else in an efficient training step (SmolLM2-135M, 1024 rows: ~1.2 s for the [n, V]
teacher logits against ~0.05 s per head on its per-row candidates), and they are the same
every epoch. One no-grad pass over the cache's ``final`` states stores k ids (int32) and k
log-probabilities (float32) per token, 512 bytes at k = 64; training then reads them by row
and never computes the teacher's full logits. Online training (`OnlineSource`) computes the
same thing per batch with `topk_of_batch`, so both paths share the math.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

TEACHER_TOPK_CODE_VERSION = "teacher-topk-1"
"""Bump when the stored top-k changes for the same cache and k; part of the stage's content key."""

DEFAULT_NORM_EPS = 1e-5
"""RMSNorm epsilon of Llama-family final norms (SmolLM2 uses 1e-5)."""


def project_vocab(
    feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, vocab_idx: torch.Tensor | None
) -> torch.Tensor:
    """The one vocabulary projection every head and the teacher share.

    Selecting rows of the weight before the matmul is what makes subset scoring cheap:
    n*k*H multiply-adds instead of n*V*H, and no [n, V] tensor.
    """
    if vocab_idx is not None:
        weight = weight.index_select(0, vocab_idx)  # [k, H]
        bias = None if bias is None else bias.index_select(0, vocab_idx)  # [k]
    return F.linear(feats, weight, bias)  # [n, V] or [n, k]


@dataclass(frozen=True, eq=False)
class TeacherWeights:
    """The frozen pieces of the backbone that turn a cached final state into logits.

    The cache stores the final-norm state `f` (norm already applied), so the teacher is just
    `f @ lm_head.T (+ bias)`; `final_norm` is kept to initialise the heads' own norms.
    """

    lm_head: torch.Tensor  # [V, H] float32
    final_norm: torch.Tensor  # [H] float32
    lm_head_bias: torch.Tensor | None = None  # [V] float32
    norm_eps: float = DEFAULT_NORM_EPS

    def __post_init__(self) -> None:
        problems = []
        if self.lm_head.ndim != 2:
            problems.append(f"lm_head has shape {tuple(self.lm_head.shape)}; expected [vocab, hidden]")
        elif self.final_norm.shape != (self.lm_head.shape[1],):
            problems.append(
                f"final_norm has shape {tuple(self.final_norm.shape)}; expected [{self.lm_head.shape[1]}] "
                "(the LM head's hidden size)"
            )
        bias, vocab = self.lm_head_bias, self.lm_head.shape[0]
        if bias is not None and self.lm_head.ndim == 2 and bias.shape != (vocab,):
            problems.append(f"lm_head_bias has shape {tuple(bias.shape)}; expected [{vocab}]")
        if problems:
            raise ValueError("invalid teacher weights: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor], norm_eps: float = DEFAULT_NORM_EPS) -> "TeacherWeights":
        """Build from the cache's teacher tensors ("lm_head.weight", "final_norm.weight",
        optional "lm_head.bias"), as detached float32 copies so training never touches them."""
        missing = [k for k in ("lm_head.weight", "final_norm.weight") if k not in d]
        if missing:
            raise KeyError(f"teacher weights lack {missing}; the extract stage must save the LM head and final norm")

        def f32(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(torch.float32).contiguous()

        bias = d.get("lm_head.bias")
        return cls(
            lm_head=f32(d["lm_head.weight"]),
            final_norm=f32(d["final_norm.weight"]),
            lm_head_bias=None if bias is None else f32(bias),
            norm_eps=norm_eps,
        )

    @property
    def vocab_size(self) -> int:
        return self.lm_head.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.lm_head.shape[1]

    def to(self, device: torch.device | str) -> "TeacherWeights":
        """A copy on `device`; move once before training rather than per batch."""
        return replace(
            self,
            lm_head=self.lm_head.to(device),
            final_norm=self.final_norm.to(device),
            lm_head_bias=None if self.lm_head_bias is None else self.lm_head_bias.to(device),
        )

    def logits(self, final_state: torch.Tensor, vocab_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher logits from cached final-norm states; compute once per batch and share
        across heads. final_state [n, H] -> [n, V] (or [n, k] for a vocab subset)."""
        if final_state.device != self.lm_head.device:
            raise ValueError(
                f"final_state is on {final_state.device} but the teacher on {self.lm_head.device}; "
                "move the teacher once with teacher.to(device)"
            )
        return project_vocab(final_state.to(torch.float32), self.lm_head, self.lm_head_bias, vocab_idx)


TOPK_BLOCK_ROWS = 1024
"""Rows whose full-vocabulary logits exist at once: a [1024, V] float32 block is 200 MB for
SmolLM2. Smaller blocks were slower on a 2-core CPU (the [b, H] x [H, V] matmul loses
efficiency: 1.3 s per 1024 rows in blocks of 128 vs 1.0 s in one block)."""


@dataclass(frozen=True, eq=False)
class TeacherTopK:
    """The teacher's top-k of every row of a source, indexed by the source's global row index.

    Arrays may be np.memmaps (the stored artifact) or in memory; rows are sorted by
    decreasing probability, so ``ids[:, 0]`` is the teacher's top-1 and ``ids[:, :j]`` its
    top-j for any j <= k.
    """

    ids: np.ndarray
    """[num_tokens, k] int32 token ids."""
    logprobs: np.ndarray
    """[num_tokens, k] float32 log-probabilities under the full softmax (not renormalised)."""

    def __post_init__(self) -> None:
        problems = []
        if self.ids.ndim != 2 or self.ids.dtype != np.int32:
            problems.append(f"ids is {self.ids.dtype} {self.ids.shape}; expected int32 [num_tokens, k]")
        if self.logprobs.ndim != 2 or self.logprobs.dtype != np.float32:
            problems.append(f"logprobs is {self.logprobs.dtype} {self.logprobs.shape}; expected float32 [num_tokens, k]")
        if not problems and self.ids.shape != self.logprobs.shape:
            problems.append(f"ids {self.ids.shape} and logprobs {self.logprobs.shape} differ in shape")
        if problems:
            raise ValueError("invalid teacher top-k: " + "; ".join(problems) + "; recompute it with compute_teacher_topk")

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    def rows(self, rows: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The first `k` (default all) ids [b, k] and log-probs [b, k] of the given rows."""
        k = self.k if k is None else int(k)
        if not 0 < k <= self.k:
            raise ValueError(f"asked for the top-{k} but {self.k} were stored; recompute the teacher top-k with k >= {k}")
        rows = np.asarray(rows, dtype=np.int64)
        return np.asarray(self.ids[rows, :k]), np.asarray(self.logprobs[rows, :k])  # [b, k], [b, k]


@torch.no_grad()
def topk_of_batch(teacher: TeacherWeights, final: torch.Tensor, k: int,
                  block_rows: int = TOPK_BLOCK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k of final states [n, H]: ids [n, k] long and their full-softmax
    log-probabilities [n, k] float32, sorted by decreasing probability.

    The one implementation of the teacher's top-k: the precompute pass and online training
    both call it. Full logits exist only `block_rows` rows at a time.
    """
    vocab = teacher.vocab_size
    if not 0 < k <= vocab:
        raise ValueError(f"k={k} must be in 1..{vocab} (the teacher's vocabulary); lower heads.topk")
    ids, logprobs = [], []
    for a in range(0, final.shape[0], block_rows):
        logits = teacher.logits(final[a : a + block_rows])  # [b, V]
        values, idx = logits.topk(k, dim=-1)  # [b, k], [b, k] sorted
        # log-sum-exp in place on the block (no longer needed after topk): torch.logsumexp
        # allocates [b, V] temporaries and took 2x as long here
        top = values[:, :1]  # [b, 1], the row max
        lse = logits.sub_(top).exp_().sum(dim=-1, keepdim=True).log_() + top  # [b, 1]
        logprobs.append(values - lse)  # [b, k]
        ids.append(idx)
    if not ids:
        empty = torch.empty(0, k, device=final.device)
        return empty.long(), empty
    return torch.cat(ids), torch.cat(logprobs)  # [n, k], [n, k]


def compute_teacher_topk(teacher: TeacherWeights, source, k: int, out_ids: np.ndarray, out_logprobs: np.ndarray,
                         batch_rows: int = 2048, progress: bool = True,
                         device: str | torch.device | None = None) -> None:
    """Fill out_ids [num_tokens, k] int32 and out_logprobs [num_tokens, k] float32 (row-indexed,
    usually np.memmaps the caller opened) with the teacher's top-k of every row of `source`
    (a `BatchSource` with ``final`` and ``row``): one sequential no-grad pass.

    Raises FloatingPointError naming the first bad row if a log-probability is not finite
    (the cache's final states hold NaN/inf), so a broken teacher never reaches training.
    """
    n = int(source.num_tokens)
    for name, arr, dtype in (("out_ids", out_ids, np.int32), ("out_logprobs", out_logprobs, np.float32)):
        if arr.shape != (n, k) or arr.dtype != dtype:
            raise ValueError(f"{name} is {arr.dtype} {arr.shape}; expected {np.dtype(dtype)} [{n}, {k}] "
                             "(one row per source row, k columns)")
    device = torch.device(device) if device is not None else teacher.lm_head.device
    teacher = teacher.to(device) if teacher.lm_head.device != device else teacher
    seen = 0
    t0 = time.perf_counter()
    bar = tqdm(total=n, unit="tok", unit_scale=True, desc="teacher top-k", disable=not progress, dynamic_ncols=True)
    batches = source.iter_batches(["final", "row"], batch_rows, shuffle=False)
    try:
        for batch in batches:
            rows = np.asarray(batch["row"], dtype=np.int64)  # [b]
            final = torch.from_numpy(np.ascontiguousarray(batch["final"])).to(device)  # [b, H]
            ids, logprobs = topk_of_batch(teacher, final, k)  # [b, k], [b, k]
            logprobs = logprobs.cpu().numpy()
            bad = ~np.isfinite(logprobs).all(axis=1)  # [b]
            if bad.any():
                raise FloatingPointError(
                    f"teacher log-probabilities are not finite at row {int(rows[bad][0])} ({int(bad.sum())} rows in "
                    "this batch): the cache's final states hold NaN/inf. Re-extract the cache (e.g. with "
                    "extract.storage_dtype=bfloat16, or the backbone in float32)."
                )
            out_ids[rows] = ids.to(torch.int32).cpu().numpy()
            out_logprobs[rows] = logprobs
            seen += len(rows)
            bar.update(len(rows))
    finally:
        batches.close()
        bar.close()
    if seen != n:
        raise ValueError(f"the source yielded {seen} rows but says num_tokens={n}; its batches must cover every row once")
    seconds = time.perf_counter() - t0
    logger.info("teacher top-%d of %d tokens in %.1f s (%.0f tokens/s)", k, n, seconds, n / max(seconds, 1e-9))
