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
    produced = stages.run_extract(Config.model_validate(config), store, split)
    if produced != key:
        raise RuntimeError(f"extract produced key {produced}, planned {key}: inputs changed during the run; run again")
    return produced
