"""The one Prefect task that runs any stage, and the cache policy it is declared with.

Prefect's own input hashing is the wrong identity for this project (it includes the run id,
hashes a Path's string and not the file, and hashes tensors differently in two processes), so
the task caches on the stage's content key, which the flow plans first from the config, the
upstream keys and the code version. When the artifact a cached key points to was deleted, the
flow passes ``refresh_cache=True``. The task is named after its stage in every call, so the
Prefect UI shows ``extract``, ``teacher_topk``, ``train_heads``... as tasks of their own.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import CachePolicy
from prefect.context import FlowRunContext

from flows.stages import make_stage
from flows.stages.base import Plan, Stage, StageContext, run_stage
from pipeline.config import Config
from pipeline.progress import watch_progress
from reports.index import report_html_path, write_index
from reports.run import SUMMARY_MD
from reports.stage_summary import stage_markdown, stage_table
from stores.artifacts import ArtifactStore

log = logging.getLogger(__name__)


class ContentKey(CachePolicy):
    """Cache on the ``key`` argument of the task: the artifact's content key."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        key = inputs.get("key")
        return f"{task_ctx.task.name}-{key}" if key else None


CONTENT_KEY = ContentKey()

TASK_RESULTS = "task-results"
"""Where Prefect keeps each stage task's cached result (the artifact key) under the root, as
JSON: nothing in the artifact root is ever unpickled (Prefect's default serializer pickles).
On a remote root (a URL) they stay in its local mirror: a task that finds its cached key
still checks that the artifact exists there (``refresh_cache``)."""

_PLANNED: dict[str, Plan] = {}
"""Plans made by the flow in this process, handed to the task so it does not plan again (an
extract plan tokenizes the corpus). A task in another process plans again: same key."""


@task(name="stage", cache_policy=CONTENT_KEY, persist_result=True, result_serializer="json")
def stage_task(stage: str, params: dict, key: str, config: dict, root: str, inputs: dict[str, str | None]) -> str:
    ctx = StageContext(Config.model_validate(config), ArtifactStore(root))
    with watch_progress(UiProgress(stage)):
        produced = run_stage(make_stage(stage, **params), ctx, inputs, plan=_PLANNED.pop(key, None))
    if produced != key:
        raise RuntimeError(f"{stage} produced key {produced}, planned {key}: inputs changed during the run; run again")
    publish_stage_summary(ctx.store, stage, produced)
    return produced


def ui_key(*parts: str) -> str:
    """An artifact key Prefect accepts (lowercase letters, digits, dashes)."""
    return "-".join(parts).replace("_", "-").lower()


def publish_stage_summary(store: ArtifactStore, stage: str, key: str) -> None:
    """The stage's markdown summary and its table of key numbers, on the run page and (keyed by
    stage) on the Artifacts page, where each run adds a version."""
    manifest = store.manifest(stage, key)
    create_markdown_artifact(markdown=stage_markdown(store, manifest), key=ui_key(stage, "summary"),
                             description=f"{stage} {key[:12]}")
    rows = stage_table(store, manifest)
    if rows:
        create_table_artifact(table=rows, key=ui_key(stage, "table"), description=f"{stage} {key[:12]}: key numbers")


REPORT_URL_ENV = "EXITFLOW_REPORT_URL"
"""Base URL under which the artifact root is served over HTTP (`exitflow serve` sets it), so a
report link opens from the Prefect UI; unset, links are file:// URIs."""


def report_url(store: ArtifactStore, key: str) -> str:
    path = report_html_path(store, key).resolve()
    base = os.environ.get(REPORT_URL_ENV)
    if base:
        return base.rstrip("/") + "/" + path.relative_to(store.root.resolve()).as_posix()
    return path.as_uri()


def publish_report(store: ArtifactStore, key: str) -> None:
    """Refresh the index of reports, then put a link to this run's report and its summary on
    the run page (inside a flow run only)."""
    write_index(store)
    if FlowRunContext.get() is None:
        return
    summary = (report_html_path(store, key).parent / SUMMARY_MD).read_text()
    create_link_artifact(link=report_url(store, key), link_text=f"report {key[:12]}", key="report",
                         description="The run's HTML report: plots and tables of every stage it ran")
    create_markdown_artifact(markdown=summary, key="report-summary", description=f"report {key[:12]}")


class UiProgress:
    """Mirrors the stage's progress bars as Prefect progress artifacts on the run page: one per
    bar, updated at most every `every_s` seconds (and at 100 %)."""

    def __init__(self, stage: str, every_s: float = 2.0):
        self.stage, self.every_s = stage, every_s
        self._ids: dict[str, Any] = {}
        self._last: dict[str, float] = {}

    def __call__(self, desc: str, done: float, total: float | None) -> None:
        if not total:
            return
        percent = round(min(100.0, 100.0 * done / total), 1)
        now = time.monotonic()
        if desc in self._ids and percent < 100 and now - self._last[desc] < self.every_s:
            return
        self._last[desc] = now
        if desc not in self._ids:
            self._ids[desc] = create_progress_artifact(progress=percent, description=f"{self.stage}: {desc}")
        else:
            update_progress_artifact(self._ids[desc], progress=percent)


def submit(stage: Stage, ctx: StageContext, inputs: dict[str, str | None]) -> str:
    """Plan `stage` here, then run it as a Prefect task named after it (a cache hit when its
    artifact exists); returns the artifact key."""
    plan = stage.plan(ctx, inputs)
    _PLANNED[plan.key] = plan
    label = "-".join([stage.name, *map(str, stage.params.values()), plan.key[:12]])
    try:
        return stage_task.with_options(
            name=stage.name, task_run_name=label,
            result_storage=Path(ctx.store.root).resolve() / TASK_RESULTS,
            refresh_cache=not ctx.store.exists(stage.name, plan.key),
        )(stage=stage.name, params=stage.params, key=plan.key, config=ctx.cfg.model_dump(mode="json"),
          root=ctx.store.location, inputs=inputs)
    finally:
        _PLANNED.pop(plan.key, None)
