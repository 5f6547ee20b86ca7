"""Prefect flows: `<stage>_flow`. A flow validates the config, plans each stage's content key
(cheap), and runs the stage's task, which Prefect skips when that key is cached. Upstream
stages run first and are cache hits when unchanged, so any flow can be started on its own
from the UI or the command line.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefect import flow, get_run_logger

from flows import stages
from flows.tasks import (
    calibrate_task,
    extract_task,
    task_options,
    train_gates_task,
    train_heads_online_task,
    train_heads_task,
)
from pipeline.config import Config, load_config
from stores.artifacts import ArtifactStore


@dataclass(frozen=True)
class _Ctx:
    cfg: Config
    store: ArtifactStore

    @property
    def cfg_json(self) -> dict:
        return self.cfg.model_dump(mode="json")

    @property
    def root(self) -> str:
        return str(self.store.root)


def _setup(config_path: str | None, overrides: list[str] | None, root: str | None) -> _Ctx:
    return _Ctx(load_config(config_path, overrides or []), ArtifactStore(root))


def _extract(ctx: _Ctx, split: str) -> str:
    """The cache of one split: an explicit ``inputs.<split>_cache``, else extract (or hit)."""
    if getattr(ctx.cfg.inputs, f"{split}_cache"):
        return stages.resolve_cache(ctx.cfg, ctx.store, split)
    plan, _, _ = stages.plan_extract(ctx.cfg, ctx.store, split)
    get_run_logger().info("extract %s: key %s (%s)", split, plan.key,
                          "cached" if ctx.store.exists("extract", plan.key) else "to compute")
    return extract_task.with_options(**task_options(ctx.store, "extract", plan.key))(
        key=plan.key, config=ctx.cfg_json, root=ctx.root, split=split)


def _has_split(ctx: _Ctx, split: str) -> bool:
    return ctx.cfg.data.fractions.get(split, 0) > 0 or bool(getattr(ctx.cfg.inputs, f"{split}_cache"))


def _heads(ctx: _Ctx, train_key: str | None, eval_key: str | None) -> str:
    if ctx.cfg.inputs.heads:
        return ctx.store.resolve(ctx.cfg.inputs.heads, "train_heads").key
    if ctx.cfg.heads.mode == "online":
        plan, _, _ = stages.plan_train_heads_online(ctx.cfg, ctx.store, eval_key)
        return train_heads_online_task.with_options(**task_options(ctx.store, "train_heads", plan.key))(
            key=plan.key, config=ctx.cfg_json, root=ctx.root, eval_key=eval_key)
    plan = stages.plan_train_heads(ctx.cfg, ctx.store, train_key, eval_key)
    return train_heads_task.with_options(**task_options(ctx.store, "train_heads", plan.key))(
        key=plan.key, config=ctx.cfg_json, root=ctx.root, cache_key=train_key, eval_key=eval_key)


def _gates(ctx: _Ctx, train_key: str, heads_key: str, eval_key: str | None) -> str:
    if ctx.cfg.inputs.gates:
        return ctx.store.resolve(ctx.cfg.inputs.gates, "train_gates").key
    plan = stages.plan_train_gates(ctx.cfg, ctx.store, train_key, heads_key, eval_key)
    return train_gates_task.with_options(**task_options(ctx.store, "train_gates", plan.key))(
        key=plan.key, config=ctx.cfg_json, root=ctx.root, cache_key=train_key, heads_key=heads_key, eval_key=eval_key)


def _calibrate(ctx: _Ctx, calib_key: str, heads_key: str, gates_key: str | None, eval_key: str | None) -> str:
    plan = stages.plan_calibrate(ctx.cfg, ctx.store, calib_key, heads_key, gates_key, eval_key)
    return calibrate_task.with_options(**task_options(ctx.store, "calibrate", plan.key))(
        key=plan.key, config=ctx.cfg_json, root=ctx.root, calib_key=calib_key, heads_key=heads_key,
        gates_key=gates_key, eval_key=eval_key)


@flow(name="extract", log_prints=True)
def extract_flow(config_path: str | None = None, overrides: list[str] | None = None, root: str | None = None,
                 split: str | None = None) -> str:
    """Extract one split's hidden states into a content-addressed zarr cache; returns its key."""
    ctx = _setup(config_path, overrides, root)
    return _extract(ctx, split or ctx.cfg.extract.split)


@flow(name="train_heads", log_prints=True)
def train_heads_flow(config_path: str | None = None, overrides: list[str] | None = None,
                     root: str | None = None) -> dict[str, str]:
    """Train early-exit heads from the train cache (extracted first if missing), or with the
    backbone running every step (``heads.mode: online``), and evaluate them against the logit
    lens on the eval cache."""
    ctx = _setup(config_path, overrides, root)
    train = _extract(ctx, "train") if ctx.cfg.heads.mode == "offline" else None  # online: no train cache
    ev = _extract(ctx, "eval") if _has_split(ctx, "eval") else None
    return {"train_cache": train, "eval_cache": ev, "heads": _heads(ctx, train, ev)}


@flow(name="train_gates", log_prints=True)
def train_gates_flow(config_path: str | None = None, overrides: list[str] | None = None,
                     root: str | None = None) -> dict[str, str]:
    """Train one exit gate per head (heads trained first if missing)."""
    ctx = _setup(config_path, overrides, root)
    train = _extract(ctx, "train")
    ev = _extract(ctx, "eval") if _has_split(ctx, "eval") else None
    heads = _heads(ctx, train, ev)
    return {"train_cache": train, "eval_cache": ev, "heads": heads, "gates": _gates(ctx, train, heads, ev)}


@flow(name="calibrate", log_prints=True)
def calibrate_flow(config_path: str | None = None, overrides: list[str] | None = None,
                   root: str | None = None) -> dict[str, str]:
    """Entropy and gate thresholds per head and accuracy level, with a Learn-then-Test
    guarantee, checked on the eval split."""
    ctx = _setup(config_path, overrides, root)
    train = _extract(ctx, "train")
    ev = _extract(ctx, "eval") if _has_split(ctx, "eval") else None
    calib = _extract(ctx, "calib")
    heads = _heads(ctx, train, ev)
    gates = _gates(ctx, train, heads, ev)
    return {"train_cache": train, "eval_cache": ev, "calib_cache": calib, "heads": heads, "gates": gates,
            "calibration": _calibrate(ctx, calib, heads, gates, ev)}


@flow(name="pipeline", log_prints=True)
def pipeline_flow(config_path: str | None = None, overrides: list[str] | None = None,
                  root: str | None = None) -> dict[str, str]:
    """Every implemented stage, in DAG order; unchanged stages are cache hits."""
    keys = calibrate_flow(config_path=config_path, overrides=overrides, root=root)
    store = ArtifactStore(root)
    store.set_pointer("latest", "calibrate", keys["calibration"], **{k: v for k, v in keys.items() if v})
    if store.get_pointer("current") is None:  # the first calibration is what a deployment starts from
        store.set_pointer("current", "calibrate", keys["calibration"], reason="first calibration")
    return keys


def run_flow(name: str, **kwargs) -> dict[str, str] | str:
    return FLOWS[name](**kwargs)


FLOWS = {"extract": extract_flow, "train_heads": train_heads_flow, "train_gates": train_gates_flow,
         "calibrate": calibrate_flow, "all": pipeline_flow}
