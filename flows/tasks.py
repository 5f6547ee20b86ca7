"""Prefect tasks: each is a few lines around one stage function in :mod:`flows.stages`.

Caching is declared once, here. Prefect's own input hashing is the wrong identity for this
project (it includes the run id, hashes a Path's string and not the file, and hashes tensors
differently in two processes), so every task caches on the stage's content key, which the
flow computes first from the config, the upstream keys and the code version. When the
artifact a cached key points to was deleted, the flow passes ``refresh_cache=True``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import CachePolicy

from flows import stages
from pipeline.config import Config
from stores.artifacts import ArtifactStore


class ContentKey(CachePolicy):
    """Cache on the ``key`` argument of the task: the artifact's content key."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        key = inputs.get("key")
        return f"{task_ctx.task.name}-{key}" if key else None


CONTENT_KEY = ContentKey()


def task_options(store: ArtifactStore, stage: str, key: str) -> dict:
    """Per-call options: results next to the artifacts, refresh when the artifact is gone."""
    return {
        "result_storage": Path(store.root).resolve() / "prefect-results",
        "refresh_cache": not store.exists(stage, key),
    }


@task(name="extract", cache_policy=CONTENT_KEY, persist_result=True, task_run_name="extract-{split}-{key:.12}")
def extract_task(key: str, config: dict, root: str, split: str) -> str:
    store = ArtifactStore(root)
    return _checked(key, stages.run_extract(Config.model_validate(config), store, split))


@task(name="train_heads", cache_policy=CONTENT_KEY, persist_result=True, task_run_name="train_heads-{key:.12}")
def train_heads_task(key: str, config: dict, root: str, cache_key: str, eval_key: str | None) -> str:
    return _checked(key, stages.run_train_heads(Config.model_validate(config), ArtifactStore(root), cache_key, eval_key))


@task(name="train_gates", cache_policy=CONTENT_KEY, persist_result=True, task_run_name="train_gates-{key:.12}")
def train_gates_task(key: str, config: dict, root: str, cache_key: str, heads_key: str, eval_key: str | None) -> str:
    return _checked(key, stages.run_train_gates(Config.model_validate(config), ArtifactStore(root), cache_key,
                                                heads_key, eval_key))


@task(name="calibrate", cache_policy=CONTENT_KEY, persist_result=True, task_run_name="calibrate-{key:.12}")
def calibrate_task(key: str, config: dict, root: str, calib_key: str, heads_key: str, gates_key: str | None,
                   eval_key: str | None) -> str:
    return _checked(key, stages.run_calibrate(Config.model_validate(config), ArtifactStore(root), calib_key,
                                              heads_key, gates_key, eval_key))


def _checked(planned: str, produced: str) -> str:
    if produced != planned:
        raise RuntimeError(f"stage produced key {produced}, planned {planned}: inputs changed during the run; run again")
    return produced


@task(name="train_heads_online", cache_policy=CONTENT_KEY, persist_result=True,
      task_run_name="train_heads_online-{key:.12}")
def train_heads_online_task(key: str, config: dict, root: str, eval_key: str | None) -> str:
    return _checked(key, stages.run_train_heads_online(Config.model_validate(config), ArtifactStore(root), eval_key))
