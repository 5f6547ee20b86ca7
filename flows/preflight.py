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


def preflight(cfg: Config, absent_data_ok: bool = False) -> Config:
    """Raise `pipeline.checks.PreflightError` listing every problem of `cfg`; return it unchanged.
    `absent_data_ok`: a data folder that does not exist yet is left to the flow (recalibration
    completes saying there is nothing to do)."""
    check_run(cfg, absent_data_ok)
    return cfg


def preflight_run(config_path: str | None, overrides: list[str] | None, stage: str,
                  data_source: str | None = None) -> Config:
    """The config `exitflow run STAGE` will use, checked; `data_source` replaces data.source (as
    `run recalibrate --data-source` does)."""
    cfg = load_config(config_path, overrides or [])
    if data_source:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": str(data_source)})})
    return preflight(cfg, absent_data_ok=stage == "recalibrate")
