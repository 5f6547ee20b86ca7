"""teacher_topk: the final layer's top-k next tokens and log-probabilities per cached token,
computed once per train cache and read by every efficient-loss training run on it.

Content key: the cache's key (which names the model, data, split and the teacher stored
beside the cache), k and the code version. The files are filled in the staging folder and
published only when the pass finished; an interrupted pass resumes after its last durable
batch (``progress.json`` in the staging folder, removed before publishing).
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import numpy as np

from flows.stages.base import Built, Plan, Stage, StageContext
from flows.stages.extract import load_teacher, open_cache
from pipeline.backbone import resolve_device
from pipeline.teacher import TEACHER_TOPK_CODE_VERSION, TeacherTopK, compute_teacher_topk
from stores.artifacts import ArtifactNotFound, ArtifactStore
from stores.teacher_store import finish_teacher_topk, open_teacher_topk, record_topk_progress, resume_teacher_topk

log = logging.getLogger(__name__)

TOPK_BATCH_ROWS = 2048
"""Rows per batch of the top-k pass, and the unit it resumes in after an interruption."""


class TeacherTopkStage(Stage):
    name = "teacher_topk"
    code_version = TEACHER_TOPK_CODE_VERSION
    inputs = ("cache",)

    def plan(self, ctx: StageContext, inputs: dict[str, str]) -> Plan:
        return self.make_plan({"k": int(ctx.cfg.heads.topk)}, {"cache": inputs["cache"]})

    def build(self, ctx: StageContext, plan: Plan, staging: Path) -> Built:
        cache_key = plan.inputs["cache"]
        reader = open_cache(ctx.store, cache_key)
        teacher = load_teacher(ctx.store, cache_key)
        k = plan.config["k"]
        if k > teacher.vocab_size:
            raise ValueError(f"heads.topk={k} exceeds the teacher's vocabulary of {teacher.vocab_size}; lower heads.topk")
        device = resolve_device(ctx.cfg.model.device)
        ids, logprobs, start = resume_teacher_topk(staging, reader.num_tokens, k, TOPK_BATCH_ROWS)
        if start:
            log.info("teacher_topk: resuming after %d batches of %d rows", start, TOPK_BATCH_ROWS)
        t0 = time.perf_counter()
        compute_teacher_topk(teacher, reader, k, ids, logprobs, batch_rows=TOPK_BATCH_ROWS, progress=ctx.progress,
                             device=device, start_batch=start,
                             on_batch=functools.partial(record_topk_progress, staging, ids, logprobs,
                                                        batch_rows=TOPK_BATCH_ROWS))
        seconds = time.perf_counter() - t0
        finish_teacher_topk(staging, ids, logprobs)
        mass = np.exp(logprobs.astype(np.float64)).sum(axis=1)  # [N] teacher probability inside each row's top-k
        del ids, logprobs  # close the memory maps before the folder is renamed
        log.info("teacher_topk: %d tokens, k=%d, %.0f tokens/s", reader.num_tokens, k, reader.num_tokens / max(seconds, 1e-9))
        return Built(
            metrics={"tokens": reader.num_tokens, "k": k, "seconds": round(seconds, 2), "resumed_from_batch": start,
                     "tokens_per_s": round(reader.num_tokens / max(seconds, 1e-9), 1),
                     "topk_mass_mean": round(float(mass.mean()), 4),
                     "topk_mass_p10": round(float(np.percentile(mass, 10)), 4)},
            extra={"device": str(device), "vocab_size": teacher.vocab_size, "split": reader.attrs.get("split")},
        )


def open_topk(store: ArtifactStore, key: str, mmap: bool = True) -> TeacherTopK:
    """The published top-k of artifact `key`."""
    if not store.exists(TeacherTopkStage.name, key):
        raise ArtifactNotFound(f"no teacher_topk artifact with key {key} under {store.location}; "
                               "run the teacher_topk stage first (its deployment, or `exitflow run teacher_topk`)")
    return open_teacher_topk(store.path(TeacherTopkStage.name, key), mmap=mmap)
