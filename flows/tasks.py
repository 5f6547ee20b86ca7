"""The one Prefect task that runs any stage, and the cache policy it is declared with.

Prefect's own input hashing is the wrong identity for this project (it includes the run id,
hashes a Path's string and not the file, and hashes tensors differently in two processes), so
the task caches on the stage's content key, which the flow plans first from the config, the
upstream keys and the code version. When the artifact a cached key points to was deleted, the
flow passes ``refresh_cache=True``. The task is named after its stage in every call, so the
Prefect UI shows ``extract``, ``teacher_topk``, ``train_heads``... as tasks of their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import CachePolicy

from flows.stages import make_stage
from flows.stages.base import Plan, Stage, StageContext, run_stage
from pipeline.config import Config
from stores.artifacts import ArtifactStore


class ContentKey(CachePolicy):
    """Cache on the ``key`` argument of the task: the artifact's content key."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        key = inputs.get("key")
        return f"{task_ctx.task.name}-{key}" if key else None


CONTENT_KEY = ContentKey()

_PLANNED: dict[str, Plan] = {}
"""Plans made by the flow in this process, handed to the task so it does not plan again (an
extract plan tokenizes the corpus). A task in another process plans again: same key."""


@task(name="stage", cache_policy=CONTENT_KEY, persist_result=True)
def stage_task(stage: str, params: dict, key: str, config: dict, root: str, inputs: dict[str, str | None]) -> str:
    ctx = StageContext(Config.model_validate(config), ArtifactStore(root))
    produced = run_stage(make_stage(stage, **params), ctx, inputs, plan=_PLANNED.pop(key, None))
    if produced != key:
        raise RuntimeError(f"{stage} produced key {produced}, planned {key}: inputs changed during the run; run again")
    return produced


def submit(stage: Stage, ctx: StageContext, inputs: dict[str, str | None]) -> str:
    """Plan `stage` here, then run it as a Prefect task named after it (a cache hit when its
    artifact exists); returns the artifact key."""
    plan = stage.plan(ctx, inputs)
    _PLANNED[plan.key] = plan
    label = "-".join([stage.name, *map(str, stage.params.values()), plan.key[:12]])
    try:
        return stage_task.with_options(
            name=stage.name, task_run_name=label,
            result_storage=Path(ctx.store.root).resolve() / "prefect-results",
            refresh_cache=not ctx.store.exists(stage.name, plan.key),
        )(stage=stage.name, params=stage.params, key=plan.key, config=ctx.cfg.model_dump(mode="json"),
          root=str(ctx.store.root), inputs=inputs)
    finally:
        _PLANNED.pop(plan.key, None)
