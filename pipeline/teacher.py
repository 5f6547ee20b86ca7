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
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from pipeline.progress import ProgressBar

from pipeline.norm import FinalNorm, FinalNormSpec, NormKind, check_norm_fields

logger = logging.getLogger(__name__)

TEACHER_TOPK_CODE_VERSION = "teacher-topk-1"
"""Bump when the stored top-k changes for the same cache and k; part of the stage's content key."""

DEFAULT_NORM_EPS = 1e-5
"""Epsilon of a TeacherWeights built without one (Llama-family RMSNorm; SmolLM2 uses 1e-5).
Teachers read from a backbone or a cache always carry the backbone's own."""

TEACHER_STATE_VERSION = "2"
"""Version of `TeacherWeights.to_state`; version 2 added the final norm's full description."""
_META_VERSION = "exitflow.teacher_version"
_META_KIND, _META_EPS, _META_OFFSET = "final_norm.kind", "final_norm.eps", "final_norm.weight_offset"


class TeacherStateError(ValueError):
    """Saved teacher weights are incomplete or from an older version; the message says to re-extract."""


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


def _f32(t: torch.Tensor) -> torch.Tensor:
    """A detached float32 copy-or-view, on the tensor's own device."""
    return t.detach().to(torch.float32).contiguous()


@dataclass(frozen=True, eq=False)
class TeacherWeights:
    """The frozen pieces of the backbone that turn a state into logits: its final norm, exactly
    as the backbone defines it, and its LM head.

    The cache stores the final-norm state `f` (norm already applied), so the teacher is just
    `f @ lm_head.T (+ bias)`. The norm is what heads, the logit lens and gates apply to an
    intermediate state: kind ("rms" or "layer"), gain `final_norm` (used as
    `norm_weight_offset + final_norm`, 1 for Gemma), optional bias, eps. The defaults describe
    a Llama-style RMSNorm, so `TeacherWeights(lm_head=..., final_norm=...)` still means one.
    """

    lm_head: torch.Tensor  # [V, H] float32
    final_norm: torch.Tensor  # [H] float32, the norm's weight
    lm_head_bias: torch.Tensor | None = None  # [V] float32
    norm_eps: float = DEFAULT_NORM_EPS
    final_norm_bias: torch.Tensor | None = None  # [H] float32
    norm_kind: NormKind = "rms"
    norm_weight_offset: float = 0.0

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
        problems += check_norm_fields(self.norm_kind, self.final_norm, self.final_norm_bias, self.norm_eps,
                                      self.norm_weight_offset)
        if problems:
            raise ValueError("invalid teacher weights: " + "; ".join(problems))

    @classmethod
    def from_norm(cls, norm: FinalNormSpec, lm_head: torch.Tensor,
                  lm_head_bias: torch.Tensor | None = None) -> "TeacherWeights":
        """From a norm read off a backbone (`pipeline.norm.describe_norm`) and its LM head, as
        float32 CPU copies that share nothing with the backbone."""

        def own(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().to("cpu", torch.float32, copy=True).contiguous()

        return cls(lm_head=own(lm_head), final_norm=own(norm.weight), lm_head_bias=own(lm_head_bias),
                   norm_eps=float(norm.eps), final_norm_bias=own(norm.bias), norm_kind=norm.kind,
                   norm_weight_offset=float(norm.weight_offset))

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor], norm_eps: float = DEFAULT_NORM_EPS) -> "TeacherWeights":
        """An RMSNorm teacher from plain tensors ("lm_head.weight", "final_norm.weight", optional
        "lm_head.bias"), as detached float32 copies: for hand-built teachers in tests. A saved
        teacher is read with `from_state`, which also restores the norm's kind and offset."""
        missing = [k for k in ("lm_head.weight", "final_norm.weight") if k not in d]
        if missing:
            raise KeyError(f"teacher weights lack {missing}; the extract stage must save the LM head and final norm")
        bias = d.get("lm_head.bias")
        return cls(
            lm_head=_f32(d["lm_head.weight"]),
            final_norm=_f32(d["final_norm.weight"]),
            lm_head_bias=None if bias is None else _f32(bias),
            norm_eps=norm_eps,
        )

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Tensors and string metadata for one safetensors file: "lm_head.weight",
        "final_norm.weight", optional "final_norm.bias" and "lm_head.bias"; metadata holds the
        norm's kind, eps and weight offset (`repr` of floats: `from_state` reads them back
        bit-exactly) and a format version. Inverse: `from_state`."""
        tensors = {"lm_head.weight": self.lm_head, "final_norm.weight": self.final_norm}
        if self.final_norm_bias is not None:
            tensors["final_norm.bias"] = self.final_norm_bias
        if self.lm_head_bias is not None:
            tensors["lm_head.bias"] = self.lm_head_bias
        tensors = {k: _f32(v).cpu() for k, v in tensors.items()}
        metadata = {_META_VERSION: TEACHER_STATE_VERSION, _META_KIND: self.norm_kind,
                    _META_EPS: repr(float(self.norm_eps)), _META_OFFSET: repr(float(self.norm_weight_offset))}
        return tensors, metadata

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> "TeacherWeights":
        """Inverse of `to_state`. Refuses teacher weights saved without the norm's description:
        rebuilding them as an RMSNorm would silently give every LayerNorm backbone wrong heads."""
        metadata = dict(metadata or {})
        lacking = [k for k in (_META_VERSION, _META_KIND, _META_EPS, _META_OFFSET) if k not in metadata]
        if lacking:
            raise TeacherStateError(
                f"the saved teacher weights have no final-norm description (metadata lacks {lacking}): the cache was "
                "made by an older exitflow version; re-run the extract stage to rebuild it"
            )
        if metadata[_META_VERSION] != TEACHER_STATE_VERSION:
            raise TeacherStateError(
                f"saved teacher weights are format {metadata[_META_VERSION]!r} but this exitflow reads "
                f"{TEACHER_STATE_VERSION!r}; re-run the extract stage to rebuild the cache"
            )
        missing = [k for k in ("lm_head.weight", "final_norm.weight") if k not in tensors]
        if missing:
            raise TeacherStateError(f"saved teacher weights lack {missing}; re-run the extract stage")
        try:
            eps, offset = float(metadata[_META_EPS]), float(metadata[_META_OFFSET])
        except ValueError as e:
            raise TeacherStateError(f"saved teacher metadata {metadata} has a non-numeric eps or offset ({e}); "
                                    "re-run the extract stage") from e
        opt = {k: None if tensors.get(k) is None else _f32(tensors[k]) for k in ("lm_head.bias", "final_norm.bias")}
        return cls(lm_head=_f32(tensors["lm_head.weight"]), final_norm=_f32(tensors["final_norm.weight"]),
                   lm_head_bias=opt["lm_head.bias"], norm_eps=eps, final_norm_bias=opt["final_norm.bias"],
                   norm_kind=metadata[_META_KIND], norm_weight_offset=offset)  # type: ignore[arg-type]

    @property
    def vocab_size(self) -> int:
        return self.lm_head.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.lm_head.shape[1]

    @property
    def norm(self) -> FinalNormSpec:
        """The final norm's description (shares this teacher's tensors)."""
        return FinalNormSpec(self.norm_kind, self.final_norm, self.final_norm_bias, self.norm_eps,
                             self.norm_weight_offset)

    def norm_module(self) -> FinalNorm:
        """A fresh, trainable float32 copy of the final norm: what each head and gate starts from."""
        return self.norm.module().to(self.final_norm.device)

    def apply_norm(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm, frozen, in float32: h [n, H] (any float dtype) -> [n, H] float32."""
        return self.norm.apply(h)  # [n, H]

    def to(self, device: torch.device | str) -> "TeacherWeights":
        """A copy on `device`; move once before training rather than per batch."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(self, lm_head=self.lm_head.to(device), final_norm=self.final_norm.to(device),
                       lm_head_bias=move(self.lm_head_bias), final_norm_bias=move(self.final_norm_bias))

    def logits(self, final_state: torch.Tensor, vocab_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher logits from cached final-norm states; compute once per batch and share
        across heads. final_state [n, H] -> [n, V] (or [n, k] for a vocab subset)."""
        if final_state.device != self.lm_head.device:
            raise ValueError(
                f"final_state is on {final_state.device} but the teacher on {self.lm_head.device}; "
                "move the teacher once with teacher.to(device)"
            )
        return project_vocab(final_state.to(torch.float32), self.lm_head, self.lm_head_bias, vocab_idx)

    def lens_logits(self, h: torch.Tensor, vocab_idx: torch.Tensor | None = None) -> torch.Tensor:
        """The logit lens: the backbone's own final norm and LM head on an intermediate state.
        h [n, H] -> [n, V] (or [n, k])."""
        return self.logits(self.apply_norm(h), vocab_idx)  # [n, V]


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
                         device: str | torch.device | None = None, start_batch: int = 0,
                         on_batch: Callable[[int], None] | None = None) -> None:
    """Fill out_ids [num_tokens, k] int32 and out_logprobs [num_tokens, k] float32 (row-indexed,
    usually np.memmaps the caller opened) with the teacher's top-k of every row of `source`
    (a `BatchSource` with ``final`` and ``row``): one sequential no-grad pass.

    Resumable: the pass starts at batch `start_batch` (the rows before it are already filled)
    and calls ``on_batch(batches_done)`` after each batch's rows are written, where the caller
    makes them durable and records how far it got.

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
    seen = min(n, start_batch * batch_rows)
    t0 = time.perf_counter()
    bar = ProgressBar(total=n, initial=seen, unit="tok", unit_scale=True, desc="teacher top-k", disable=not progress,
                      dynamic_ncols=True)
    batches = source.iter_batches(["final", "row"], batch_rows, shuffle=False, start_batch=start_batch)
    try:
        for done, batch in enumerate(batches, start=start_batch + 1):
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
            if on_batch is not None:
                on_batch(done)
    finally:
        batches.close()
        bar.close()
    if seen != n:
        raise ValueError(f"the source yielded {seen} rows but says num_tokens={n}; its batches must cover every row once")
    seconds = time.perf_counter() - t0
    logger.info("teacher top-%d of %d tokens in %.1f s (%.0f tokens/s)", k, n, seconds, n / max(seconds, 1e-9))
