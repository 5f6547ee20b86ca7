"""Prefect flows: `<stage>_flow`. A flow validates the config, plans each stage's content
key (cheap), and runs the stage's task, which Prefect skips when the key is cached."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows import stages
from flows.tasks import extract_task, task_options
from pipeline.config import load_config
from stores.artifacts import ArtifactStore


def _setup(config_path: str | None, overrides: list[str] | None, root: str | None):
    cfg = load_config(config_path, overrides or [])
    store = ArtifactStore(root)
    return cfg, store


@flow(name="extract", log_prints=True)
def extract_flow(
    config_path: str | None = None,
    overrides: list[str] | None = None,
    root: str | None = None,
    split: str | None = None,
) -> str:
    """Extract one split's hidden states into a content-addressed zarr cache; returns its key."""
    cfg, store = _setup(config_path, overrides, root)
    plan, _, _ = stages.plan_extract(cfg, store, split)
    split = plan.extra["split"]
    get_run_logger().info("extract %s: key %s (%s)", split, plan.key,
                          "cached" if store.exists("extract", plan.key) else "to compute")
    return extract_task.with_options(**task_options(store, "extract", plan.key))(
        key=plan.key, config=cfg.model_dump(mode="json"), root=str(store.root), split=split
    )
