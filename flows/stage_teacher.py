"""The teacher_topk stage: the final layer's top-k per cached token, computed once per cache.

Content key: the cache's key (which already names the model, data, split and the teacher
weights stored beside the cache), k and the code version. Planning opens nothing heavy, so a
hit answers at once. Like `run_extract`, the work goes into the store's staging folder and is
published only when the pass finished.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from flows.stages import Plan, cache_path, teacher_path
from pipeline.config import Config
from stores.artifacts import ArtifactNotFound, ArtifactStore, Manifest, content_key

log = logging.getLogger(__name__)

STAGE = "teacher_topk"


def plan_teacher_topk(cfg: Config, store: ArtifactStore, cache_key: str) -> Plan:
    """Key of the top-k of cache `cache_key` at k = cfg.heads.topk."""
    from pipeline.teacher import TEACHER_TOPK_CODE_VERSION

    config = {"k": int(cfg.heads.topk)}
    inputs = {"cache": cache_key}
    key = content_key(STAGE, TEACHER_TOPK_CODE_VERSION, config, inputs)
    return Plan(STAGE, key, config, inputs, TEACHER_TOPK_CODE_VERSION)


def run_teacher_topk(cfg: Config, store: ArtifactStore, cache_key: str, progress: bool = True) -> str:
    """Compute and publish the teacher's top-k of a cache; a no-op when it already exists."""
    from pipeline.backbone import resolve_device
    from pipeline.teacher import TeacherWeights
    from pipeline.teacher import compute_teacher_topk
    from stores.cache import CacheReader, load_tensors
    from stores.teacher_store import create_teacher_topk, flush_teacher_topk

    plan = plan_teacher_topk(cfg, store, cache_key)
    if store.exists(STAGE, plan.key):
        log.info("teacher_topk: hit %s (cache %s, k=%d)", plan.key[:12], cache_key[:12], plan.config["k"])
        return plan.key
    if not store.exists("extract", cache_key):
        raise ArtifactNotFound(f"no extract cache with key {cache_key} under {store.root}; "
                               "run `exitflow run extract` for the split first")
    reader = CacheReader(cache_path(store, cache_key))
    teacher = TeacherWeights.from_dict(load_tensors(teacher_path(store, cache_key)))
    k = plan.config["k"]
    if k > teacher.vocab_size:
        raise ValueError(f"heads.topk={k} exceeds the teacher's vocabulary of {teacher.vocab_size}; lower heads.topk")
    device = resolve_device(cfg.model.device)

    staging = store.staging(STAGE, plan.key)
    ids, logprobs = create_teacher_topk(staging, reader.num_tokens, k)
    t0 = time.perf_counter()
    compute_teacher_topk(teacher, reader, k, ids, logprobs, progress=progress, device=device)
    seconds = time.perf_counter() - t0
    flush_teacher_topk(ids, logprobs)
    mass = np.exp(logprobs.astype(np.float64)).sum(axis=1)  # [N] teacher probability inside each row's top-k
    manifest = Manifest(
        stage=STAGE, key=plan.key, config=plan.config, inputs=plan.inputs, code_version=plan.code_version,
        metrics={
            "tokens": reader.num_tokens,
            "k": k,
            "seconds": round(seconds, 2),
            "tokens_per_s": round(reader.num_tokens / max(seconds, 1e-9), 1),
            "topk_mass_mean": round(float(mass.mean()), 4),
            "topk_mass_p10": round(float(np.percentile(mass, 10)), 4),
        },
        extra={"device": str(device), "vocab_size": teacher.vocab_size, "split": reader.attrs.get("split")},
    )
    del ids, logprobs  # close the memory maps before the folder is renamed
    path = store.publish(manifest)
    log.info("teacher_topk: wrote %s (%d tokens, k=%d, %.0f tokens/s) to %s", plan.key[:12], reader.num_tokens, k,
             manifest.metrics["tokens_per_s"], path)
    return plan.key


def teacher_topk_path(store: ArtifactStore, key: str) -> Path:
    return store.path(STAGE, key)


def open_stage_teacher_topk(store: ArtifactStore, key: str, mmap: bool = True):
    """The published top-k of artifact `key` as a `pipeline.teacher.TeacherTopK`."""
    from stores.teacher_store import open_teacher_topk

    if not store.exists(STAGE, key):
        raise ArtifactNotFound(f"no teacher_topk artifact with key {key} under {store.root}; run the stage first")
    return open_teacher_topk(teacher_topk_path(store, key), mmap=mmap)
