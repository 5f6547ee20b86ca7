"""The checks `exitflow run` and every flow make before any work: the config, against itself,
its backbone's config and its corpus's schema (`pipeline.checks`), in about a second.

`exitflow run` calls `preflight_run` before Prefect is imported or a server starts, so a
wrong layer or text column costs a second, not the half minute of a server start and a model
load; flows call `preflight` on their config, so runs started from the UI fail as early.
Nothing here imports Prefect.
"""

from __future__ import annotations

from pipeline.checks import check_run
from pipeline.config import Config, load_config


def preflight(cfg: Config) -> Config:
    """Raise `pipeline.checks.PreflightError` listing every problem of `cfg`; return it unchanged."""
    check_run(cfg)
    return cfg


def preflight_run(config_path: str | None, overrides: list[str] | None, data_source: str | None = None) -> Config:
    """The config `exitflow run` will use, checked; `data_source` replaces data.source (as
    `run recalibrate --data-source` does)."""
    cfg = load_config(config_path, overrides or [])
    if data_source:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": str(data_source)})})
    return preflight(cfg)
