"""Scheduled recalibration: fresh data in, the deployed heads' thresholds re-fitted, and the
`current` calibration moved only when the new thresholds hold on held-out tokens.

The heads and gates stay those of the `current` calibration; only the data changes. The calib
and eval splits of the (new) data are extracted and calibrated through the same tasks as the
other flows, so unchanged data is a cache hit all the way and costs seconds. The outcome (a
drift table per head, level and predictor, the decision and its reason) is a content-addressed
artifact of stage ``recalibrate`` and, in the Prefect UI, a table and a markdown artifact.

Why all held-out checks must pass: a deployment exits tokens on these thresholds without
looking back, so one head/level falling below its target on held-out tokens is reason enough
to keep the thresholds that are in service and let a person look at the drift table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from prefect import flow, get_run_logger, task
from prefect.context import FlowRunContext

from flows.dag import _Ctx, _calibrate, _extract, _has_split, _setup
from flows.tasks import CONTENT_KEY, _checked, task_options
from pipeline.config import ConfigError
from stores.artifacts import ArtifactNotFound, ArtifactStore, Manifest, content_key, write_json_atomic

RECALIBRATE_CODE_VERSION = "recalibrate-1"
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


# -- what is in service ------------------------------------------------------------------------
def _deployed(ctx: _Ctx) -> _Deployed:
    """Heads and gates to recalibrate: those of the `current` calibration, else the config's
    ``inputs.heads``/``inputs.gates``."""
    store, cfg = ctx.store, ctx.cfg
    pointer = store.get_pointer("current")
    if pointer is not None:
        m = store.manifest("calibrate", pointer["key"])
        deployed = _Deployed(m.inputs["heads"], m.inputs.get("gates"), m.key, f"current calibration {m.key[:12]}")
        if cfg.inputs.heads and not deployed.heads.startswith(cfg.inputs.heads):
            get_run_logger().warning("inputs.heads=%s is ignored: recalibration keeps the heads of the %s (%s)",
                                     cfg.inputs.heads, deployed.source, deployed.heads[:12])
        return deployed
    if cfg.inputs.heads:
        heads = store.resolve(cfg.inputs.heads, "train_heads").key
        gates = store.resolve(cfg.inputs.gates, "train_gates").key if cfg.inputs.gates else None
        return _Deployed(heads, gates, None, "inputs.heads of the config")
    raise NothingToRecalibrate(
        f"nothing to recalibrate under {store.root}: no `current` calibration and no inputs.heads in the config; "
        "run `exitflow run all` first (its calibration becomes the current one), or set inputs.heads=<key>"
    )


# -- the stage: compare, decide, save ----------------------------------------------------------
def plan_recalibrate(new_key: str, previous_key: str | None) -> tuple[str, dict[str, str]]:
    inputs = {"calibration": new_key, **({"previous": previous_key} if previous_key else {})}
    return content_key("recalibrate", RECALIBRATE_CODE_VERSION, {}, inputs), inputs


def run_recalibrate(store: ArtifactStore, new_key: str, previous_key: str | None) -> str:
    """Drift of the new calibration against the one in service and whether to promote it:
    ``drift.json`` and ``drift.md`` under a key over both calibrations and the code version."""
    key, inputs = plan_recalibrate(new_key, previous_key)
    if store.exists("recalibrate", key):
        return key
    new = _load_calibration(store, new_key)
    old = _load_calibration(store, previous_key) if previous_key else None
    if "held_out" not in new:
        raise ValueError(f"calibration {new_key[:12]} has no held-out check; calibrate with an eval split")
    rows = _drift_rows(old, new)
    failures = [r for r in new["held_out"] if not r["held"]]
    promote = not failures
    reason = _reason(new_key, previous_key, failures)
    outcome = {"calibration": new_key, "previous": previous_key, "promote": promote, "reason": reason,
               "failures": failures, "drift": rows, "held_out": new["held_out"]}
    staging = store.staging("recalibrate", key)
    write_json_atomic(staging / "drift.json", outcome)
    (staging / "drift.md").write_text(_markdown(outcome))
    metrics = {"promote": promote, "failed": len(failures), "checked": len(new["held_out"]), "rows": len(rows)}
    store.publish(Manifest(stage="recalibrate", key=key, config={}, inputs=inputs,
                           code_version=RECALIBRATE_CODE_VERSION, metrics=metrics, extra={"reason": reason}))
    return key


@task(name="recalibrate", cache_policy=CONTENT_KEY, persist_result=True, task_run_name="recalibrate-{key:.12}")
def recalibrate_task(key: str, root: str, new_key: str, previous_key: str | None) -> str:
    return _checked(key, run_recalibrate(ArtifactStore(root), new_key, previous_key))


def _load_calibration(store: ArtifactStore, key: str) -> dict:
    store.manifest("calibrate", key)  # a clear error when it is gone
    return json.loads((store.path("calibrate", key) / "calibration.json").read_text())


def _drift_rows(old: dict | None, new: dict) -> list[dict]:
    """`drift_table` per predictor and head of the deployed (chosen) thresholds, joined with
    the new thresholds' held-out result."""
    from pipeline.calibrate import chosen, drift_table

    held = {(r["predictor"], int(r["layer"]), float(r["level"])): r for r in new.get("held_out", [])}
    predictors = [p for p in ("entropy", "gate") if any(p in e for e in new["heads"].values())]
    rows = []
    for predictor in predictors:
        after = chosen(new, predictor)
        before = chosen(old, predictor) if old else {}
        for layer in sorted(set(after) | set(before)):
            for row in drift_table(before.get(layer, []), after.get(layer, [])):
                h = held.get((predictor, layer, float(row["level"])), {})
                rows.append({"predictor": predictor, "layer": layer, **row,
                             "held_out_accuracy": h.get("accuracy"), "held_out_exit_rate": h.get("exit_rate"),
                             "held_out_met": h.get("met"), "held_out_held": h.get("held")})
    return rows


def _reason(new_key: str, previous_key: str | None, failures: list[dict]) -> str:
    kept = f"kept the current calibration {previous_key[:12]}" if previous_key else "no current calibration set"
    if failures:
        what = "; ".join(f"head {r['layer']} {r['predictor']} level {r['level']:g}: held-out accuracy "
                         f"{r['accuracy']:.4f} < target {r['level']:g} ({r['n_exited']} of {r['n']} tokens exit)"
                         for r in failures)
        return f"{len(failures)} held-out check(s) failed ({what}); {kept}"
    first = "" if previous_key else " (the first current calibration)"
    return f"every threshold held its target on held-out tokens; calibration {new_key[:12]} promoted{first}"


def _fmt(x) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "**no**"
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def _markdown(outcome: dict) -> str:
    prev = outcome["previous"]
    lines = [
        "# Recalibration",
        "",
        f"- new calibration: `{outcome['calibration']}`",
        f"- previous (current): `{prev}`" if prev else "- previous: none",
        f"- decision: **{'promoted' if outcome['promote'] else 'kept the previous'}**",
        f"- reason: {outcome['reason']}",
        "",
        "Threshold in score units (entropy: nats, exit when below; gate: exit probability, exit when above);",
        "shift = new - old. Exit rate and accuracy on calib tokens; held-out: the new threshold on eval tokens;",
        "held: the held-out accuracy is not significantly below the level (one-sided binomial test, p > 0.05).",
        "",
        "| predictor | head | level | old thr | new thr | shift | old exit | new exit | Δ exit | old acc | new acc "
        "| Δ acc | held-out acc | held |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in outcome["drift"]:
        cells = [r["predictor"], r["layer"], f"{r['level']:g}", r["old_threshold"], r["new_threshold"], r["shift"],
                 r["old_exit_rate"], r["new_exit_rate"], r["exit_rate_change"], r["old_accuracy"], r["new_accuracy"],
                 r["accuracy_change"], r["held_out_accuracy"], r["held_out_held"]]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


# -- the flow ----------------------------------------------------------------------------------
def _with_source(ctx: _Ctx, data_source: str | None) -> _Ctx:
    if not data_source:
        return ctx
    cfg = ctx.cfg.model_copy(update={"data": ctx.cfg.data.model_copy(update={"source": str(data_source)})})
    return _Ctx(cfg, ctx.store)


def _promote(store: ArtifactStore, deployed: _Deployed, outcome: dict, rkey: str, **info: str) -> tuple[bool, str]:
    """Move `current` to the new calibration when the outcome says so and nobody moved it
    meanwhile (two runs at once must not silently undo each other)."""
    if not outcome["promote"]:
        return False, outcome["reason"]
    now = (store.get_pointer("current") or {}).get("key")
    if now != deployed.previous:
        return False, (f"the current calibration moved to {(now or 'nothing')[:12]} while this run compared against "
                       f"{(deployed.previous or 'none')[:12]}; left it there, run again to compare with it")
    store.set_pointer("current", "calibrate", outcome["calibration"], reason="recalibrated",
                      previous=deployed.previous, recalibrate=rkey, heads=deployed.heads,
                      **({"gates": deployed.gates} if deployed.gates else {}), **info)
    return True, outcome["reason"]


def _publish_to_ui(rows: list[dict], reason: str, markdown: str) -> None:
    """The drift table and the decision on the Prefect UI's Artifacts page (inside a flow run).
    Two keys: artifacts sharing a key are versions of one artifact, and the UI shows the latest."""
    if FlowRunContext.get() is None:
        return
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    if rows:
        table = [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
        create_table_artifact(table=table, key=UI_TABLE_KEY,
                              description=f"Threshold drift per head and level: {reason}")
    create_markdown_artifact(markdown=markdown, key=UI_SUMMARY_KEY, description="Recalibration decision")


@flow(name="recalibrate", log_prints=True)
def recalibrate_flow(config_path: str | None = None, overrides: list[str] | None = None, root: str | None = None,
                     data_source: str | None = None) -> dict:
    """Re-fit the deployed heads' exit thresholds on fresh data (``data_source`` overrides
    ``data.source``) and move the `current` calibration to them only if every threshold meets
    its target on the held-out split. Unchanged data: a cache hit, nothing moves."""
    logger = get_run_logger()
    ctx = _with_source(_setup(config_path, overrides, root), data_source)
    store = ctx.store
    deployed = _deployed(ctx)
    logger.info("recalibrating heads %s, gates %s (from the %s) on %s", deployed.heads[:12],
                (deployed.gates or "-")[:12], deployed.source, ctx.cfg.data.source)
    if not _has_split(ctx, "eval"):
        raise ConfigError("recalibration checks the new thresholds on held-out tokens: give data.fractions an "
                          "eval share > 0 (e.g. --set 'data.fractions={train: 0.8, calib: 0.1, eval: 0.1}') "
                          "or set inputs.eval_cache")
    calib = _extract(ctx, "calib")
    ev = _extract(ctx, "eval")
    new_key = _calibrate(ctx, calib, deployed.heads, deployed.gates, ev)
    result = {"calibration": new_key, "previous": deployed.previous, "promoted": False, "recalibrate": None}

    if new_key == deployed.previous:
        result["reason"] = (f"unchanged: calibration {new_key[:12]} is already the current one "
                            "(same data, heads and settings; cache hit), nothing to do")
        logger.info(result["reason"])
        _publish_to_ui([], result["reason"], f"# Recalibration\n\n{result['reason']}\n")
        return result

    rkey, _ = plan_recalibrate(new_key, deployed.previous)
    rkey = recalibrate_task.with_options(**task_options(store, "recalibrate", rkey))(
        key=rkey, root=ctx.root, new_key=new_key, previous_key=deployed.previous)
    folder = store.path("recalibrate", rkey)
    outcome = json.loads((folder / "drift.json").read_text())
    promoted, reason = _promote(store, deployed, outcome, rkey, calib_cache=calib, eval_cache=ev)
    (logger.info if promoted else logger.warning)("recalibrate: %s", reason)
    markdown = (folder / "drift.md").read_text()
    if reason != outcome["reason"]:
        markdown = f"**Not promoted:** {reason}\n\n{markdown}"
    _publish_to_ui(outcome["drift"], reason, markdown)
    result.update(promoted=promoted, reason=reason, recalibrate=rkey)
    return result
