"""Scheduled recalibration: fresh data in, the deployed heads' thresholds re-fitted, and the
`current` calibration moved only when the new thresholds hold on held-out tokens.

The heads and gates stay those of the `current` calibration; only the data changes. The calib
and eval splits of the (new) data are extracted and calibrated through the same tasks as the
other flows, so unchanged data is a cache hit all the way and costs seconds. The outcome (a
drift table per head, level and predictor, the decision and its reason) is a content-addressed
artifact of stage ``recalibrate`` and, in the Prefect UI, a table and a markdown artifact.

Why one failing held-out check keeps the old thresholds: a deployment exits tokens on them
without looking back, so one head/level significantly below its target on held-out tokens is
reason enough to keep the thresholds in service and let a person look at the drift table.
"Significantly" is family-wise (`pipeline.recalibrate.judge_held_out`): a correct
recalibration is rejected with probability at most the calibration's delta, however many
thresholds are checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext

from flows.dag import Dag
from flows.stages.calibrate import CalibrateStage
from flows.stages.recalibrate import RecalibrateStage, load_outcome
from flows.stages.train_gates import TrainGatesStage
from flows.stages.train_heads import TrainHeadsStage
from flows.tasks import submit
from pipeline.config import CalibrateConfig, ConfigError, DataConfig, ExtractConfig, InputsConfig, ModelConfig
from pipeline.recalibrate import RecalibrationOutcome
from reports.recalibration import drift_rows_table, recalibration_markdown, unchanged_markdown
from stores.artifacts import ArtifactNotFound, ArtifactStore

UI_TABLE_KEY = "recalibration-drift"
UI_SUMMARY_KEY = "recalibration-decision"


class NothingToRecalibrate(ArtifactNotFound):
    """No deployed heads: neither a `current` calibration nor ``inputs.heads`` in the config."""


@dataclass(frozen=True)
class _Deployed:
    heads: str
    gates: str | None
    previous: str | None  # the calibration in service (`current`), None before the first one
    source: str


def _deployed(dag: Dag) -> _Deployed:
    """Heads and gates to recalibrate: those of the `current` calibration, else the config's
    ``inputs.heads``/``inputs.gates``."""
    store, cfg = dag.store, dag.cfg
    pointer = store.get_pointer("current")
    if pointer is not None:
        m = store.manifest(CalibrateStage.name, pointer["key"])
        deployed = _Deployed(m.inputs["heads"], m.inputs.get("gates"), m.key, f"current calibration {m.key[:12]}")
        if cfg.inputs.heads and not deployed.heads.startswith(cfg.inputs.heads):
            get_run_logger().warning("inputs.heads=%s is ignored: recalibration keeps the heads of the %s (%s)",
                                     cfg.inputs.heads, deployed.source, deployed.heads[:12])
        return deployed
    if cfg.inputs.heads:
        heads = store.resolve_input(cfg.inputs.heads, "heads", TrainHeadsStage.name).key
        gates = store.resolve_input(cfg.inputs.gates, "gates", TrainGatesStage.name).key if cfg.inputs.gates else None
        return _Deployed(heads, gates, None, "inputs.heads of the config")
    raise NothingToRecalibrate(
        f"nothing to recalibrate under {store.location}: no `current` calibration and no inputs.heads in the config; "
        "run the pipeline first (`exitflow run pipeline`, or the pipeline deployment; its calibration becomes the "
        "current one), or set inputs.heads to a heads artifact key"
    )


# -- the flow ----------------------------------------------------------------------------------
def _with_source(dag: Dag, data_source: str | None) -> Dag:
    if not data_source:
        return dag
    cfg = dag.cfg.model_copy(update={"data": dag.cfg.data.model_copy(update={"source": str(data_source)})})
    return Dag(cfg, dag.store)


def _promote(store: ArtifactStore, deployed: _Deployed, outcome: RecalibrationOutcome, rkey: str,
             **info: str) -> tuple[bool, str]:
    """Move `current` to the new calibration when the outcome says so and nobody moved it
    meanwhile (two runs at once must not silently undo each other)."""
    if not outcome.promote:
        return False, outcome.reason
    now = (store.get_pointer("current") or {}).get("key")
    if now != deployed.previous:
        return False, (f"the current calibration moved to {(now or 'nothing')[:12]} while this run compared against "
                       f"{(deployed.previous or 'none')[:12]}; left it there, run again to compare with it")
    store.set_pointer("current", CalibrateStage.name, outcome.calibration, reason="recalibrated",
                      previous=deployed.previous, recalibrate=rkey, heads=deployed.heads,
                      **({"gates": deployed.gates} if deployed.gates else {}), **info)
    return True, outcome.reason


def _publish_to_ui(rows: list[dict], reason: str, markdown: str) -> None:
    """The drift table and the decision on the Prefect UI's Artifacts page (inside a flow run).
    Two keys: artifacts sharing a key are versions of one artifact, and the UI shows the latest."""
    if FlowRunContext.get() is None:
        return
    if rows:
        create_table_artifact(table=rows, key=UI_TABLE_KEY, description=f"Threshold drift per head and level: {reason}")
    create_markdown_artifact(markdown=markdown, key=UI_SUMMARY_KEY, description="Recalibration decision")


def _not_ready(dag: Dag) -> str | None:
    """Why there is nothing to recalibrate yet, or None: a scheduled deployment runs before the
    first pipeline and before data arrives, and that is a state, not a failure."""
    source = dag.cfg.data.source
    if source.startswith((".", "/", "~")) and not Path(source).expanduser().exists():
        return (f"nothing to recalibrate yet: the data folder {source} does not exist; put new documents there "
                "(or point data_source at them) and the next run recalibrates on them")
    try:
        _deployed(dag)
    except NothingToRecalibrate as e:
        return str(e)
    return None


@flow(name="recalibrate", log_prints=True)
def recalibrate_flow(data_source: str | None = None, inputs: InputsConfig = InputsConfig(),
                     model: ModelConfig = ModelConfig(), data: DataConfig = DataConfig(),
                     extract: ExtractConfig = ExtractConfig(), calibrate: CalibrateConfig = CalibrateConfig(),
                     config_path: str | None = None, overrides: list[str] | None = None,
                     root: str | None = None) -> dict:
    """Re-fit the deployed heads' exit thresholds on fresh data and move the `current`
    calibration to them only if the thresholds meet their targets on the held-out split.
    Unchanged data: a cache hit, nothing moves. No `current` calibration or no data yet: the
    run completes and says so.

    Args:
        data_source: Folder or file of new documents; overrides data.source.
        inputs: Heads and gates to recalibrate when there is no `current` calibration yet.
        model: The frozen backbone (must be the one the heads were trained on).
        data: The corpus settings; its calib and eval splits are extracted.
        extract: How the hidden states are cached.
        calibrate: Entropy and gate thresholds per accuracy level.
        config_path: Optional YAML config file; form fields left at their defaults keep its values.
        overrides: Optional `section.key=value` settings applied last.
        root: Artifact root folder; default $EXITFLOW_HOME or ./.exitflow.
    """
    logger = get_run_logger()
    dag = _with_source(Dag.load(config_path, overrides, root, absent_data_ok=True, inputs=inputs, model=model,
                                data=data, extract=extract, calibrate=calibrate), data_source)
    store = dag.store
    waiting = _not_ready(dag)
    if waiting:
        logger.info(waiting)
        _publish_to_ui([], waiting, unchanged_markdown(waiting))
        return {"calibration": None, "previous": None, "promoted": False, "recalibrate": None, "skipped": True,
                "reason": waiting}
    deployed = _deployed(dag)
    logger.info("recalibrating heads %s, gates %s (from the %s) on %s", deployed.heads[:12],
                (deployed.gates or "-")[:12], deployed.source, dag.cfg.data.source)
    if not dag.has_split("eval"):
        raise ConfigError("recalibration checks the new thresholds on held-out tokens: give data.fractions an "
                          "eval share > 0 (e.g. data.fractions={train: 0.3, calib: 0.35, eval: 0.35}) "
                          "or set inputs.eval_cache")
    calib, ev = dag.extract("calib"), dag.extract("eval")
    new_key = dag.calibrate(calib, deployed.heads, deployed.gates, ev)
    result = {"calibration": new_key, "previous": deployed.previous, "promoted": False, "recalibrate": None}

    if new_key == deployed.previous:
        result["reason"] = (f"unchanged: calibration {new_key[:12]} is already the current one "
                            "(same data, heads and settings; cache hit), nothing to do")
        logger.info(result["reason"])
        _publish_to_ui([], result["reason"], unchanged_markdown(result["reason"]))
        return result

    rkey = submit(RecalibrateStage(), dag.ctx, {"calibration": new_key, "previous": deployed.previous})
    outcome = load_outcome(store, rkey)
    promoted, reason = _promote(store, deployed, outcome, rkey, calib_cache=calib, eval_cache=ev)
    (logger.info if promoted else logger.warning)("recalibrate: %s", reason)
    markdown = recalibration_markdown(outcome, overruled=None if reason == outcome.reason else reason)
    _publish_to_ui(drift_rows_table(outcome), reason, markdown)
    result.update(promoted=promoted, reason=reason, recalibrate=rkey)
    return result
