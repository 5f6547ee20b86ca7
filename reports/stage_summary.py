"""One stage's result for the Prefect UI: a short markdown summary and a table, per manifest.
The flow publishes them (`create_markdown_artifact`, `create_table_artifact`); this module
only writes text and rows, with the same column names as the HTML report.

`stage_table` returns a list of dicts, every row with the same keys in reading order: the
Prefect UI takes a table's columns from the first row's keys, in their order.
"""

from __future__ import annotations

from collections.abc import Callable

from reports.format import (
    Rows,
    human_bytes,
    layer_sorted,
    level,
    markdown_table,
    num,
    pct,
    short,
    times,
)
from reports.index import index_rows, report_html_path
from reports.recalibration import drift_rows, recalibration_markdown
from reports.run import load_calibration_payload, load_drift_payload
from reports.summary import headline_lines
from reports.tables import (
    cache_rows,
    cascade_rows,
    decode_rows,
    exit_rate_rows,
    deployed_rows,
    gate_rows,
    guarantee_checks,
    head_rows,
    payload_bytes,
    ternary_rows,
    threshold_rows,
    topk_rows,
)
from stores.artifacts import ArtifactStore, Manifest


def stage_table(store: ArtifactStore, manifest: Manifest) -> Rows:
    """The stage's main table: extract: the cache; teacher_topk: k and mass; train_heads and
    evaluate: agreement per head vs the logit lens; train_gates: AUROCs; calibrate: thresholds
    per head and level; quantize: float vs ternary per head; recalibrate: the drift rows;
    report: its row of the index. Empty for an unknown stage."""
    m = manifest
    if m.stage == "extract":
        return cache_rows({m.extra.get("split", m.config.get("split", "cache")): m})
    if m.stage == "teacher_topk":
        return topk_rows(m)
    if m.stage == "train_heads":
        return head_rows(m.metrics)
    if m.stage == "train_gates":
        return gate_rows(m.metrics)
    if m.stage == "calibrate":
        return threshold_rows(load_calibration_payload(store, m.key))
    if m.stage == "evaluate":
        return head_rows(None, m.metrics)
    if m.stage == "quantize":
        return ternary_rows(m.metrics)
    if m.stage == "recalibrate":
        return drift_rows(load_drift_payload(store, m.key))
    if m.stage == "report":
        return index_rows(store, [m])
    return []


def stage_markdown(store: ArtifactStore, manifest: Manifest) -> str:
    """A few lines and tables a person reads in the UI about one stage's artifact."""
    writer = _WRITERS.get(manifest.stage)
    title = f"### {manifest.stage} `{short(manifest.key)}`\n\n"
    if writer is None:
        return title + "No summary for this stage.\n"
    return title + writer(store, manifest).rstrip() + "\n"


def _table(title: str, rows: Rows, note: str = "") -> str:
    if not rows:
        return ""
    return f"\n**{title}**" + (f" ({note})" if note else "") + "\n\n" + markdown_table(rows) + "\n"


def _extract(store: ArtifactStore, m: Manifest) -> str:
    mt = m.metrics
    source = m.extra.get("source") or {}
    return (f"{m.extra.get('split', '?')} split of {source.get('data', '?')} through {source.get('model', '?')}: "
            f"{num(mt.get('tokens'))} tokens ({num(m.extra.get('num_documents'))} documents), layers "
            f"{', '.join(map(str, m.config.get('layers', [])))}, hidden {mt.get('hidden_size')}, stored as "
            f"{m.config.get('storage_dtype')}, {human_bytes(payload_bytes(m))} on disk, "
            f"{num(mt.get('tokens_per_s'), 0)} tokens/s.\n" + _table("Cache", stage_table(store, m)))


def _topk(store: ArtifactStore, m: Manifest) -> str:
    mt = m.metrics
    return (f"The final layer's top-{mt.get('k')} of {num(mt.get('tokens'))} tokens hold {pct(mt.get('topk_mass_mean'))} "
            f"of its probability on average (10th percentile {pct(mt.get('topk_mass_p10'))}).\n")


def _heads(store: ArtifactStore, m: Manifest) -> str:
    mt, cfg = m.metrics, m.config
    epochs = mt.get("epochs", [])
    loss = " → ".join(num(e.get("loss"), 3) for e in epochs)
    text = (f"{cfg.get('kind')} heads at layers {cfg.get('layers')}, loss {cfg.get('loss')}, {len(epochs)} epochs, "
            f"{mt.get('steps')} steps at {num(mt.get('tokens_per_s'), 0)} tokens/s; loss per epoch {loss}.\n")
    return text + _table("Agreement with the final layer", head_rows(mt), "eval tokens; logit lens: the baseline")


def _gates(store: ArtifactStore, m: Manifest) -> str:
    mt = m.metrics
    text = f"{len(mt.get('epochs', []))} epochs, {mt.get('steps')} steps.\n"
    return text + _table("Gates against the heads' entropy", gate_rows(mt), "AUROC for \"the head agrees\"")


def _calibrate(store: ArtifactStore, m: Manifest) -> str:
    cal = load_calibration_payload(store, m.key)
    text = (f"{cal.method} thresholds (δ = {cal.delta:g}) for heads {cal.layers} on {cal.n:,} tokens at levels "
            f"{', '.join(level(x) for x in cal.levels)}.")
    checks = guarantee_checks(None, cal)
    if checks:
        text += f" Held on eval tokens: {sum(bool(c['held']) for c in checks)} of {len(checks)}."
    return (text + "\n" + _table("Thresholds", threshold_rows(cal), "entropy: exit below; gate: exit above")
            + _table("Exit rate per head and level", exit_rate_rows(cal), "calibration tokens")
            + _table("Deployed predictor per head and level", deployed_rows(None, cal),
                     f"each predictor's exit rate on {cal.deployed_on} tokens; the higher one is deployed")
            + _table("Cascade", cascade_rows(None, cal), "calibration tokens"))


def _evaluate(store: ArtifactStore, m: Manifest) -> str:
    mt = m.metrics
    checks = guarantee_checks(mt, None)
    text = (f"{num(mt.get('tokens'))} eval tokens; guarantees held: {sum(bool(c['held']) for c in checks)} of "
            f"{len(checks)}.\n")
    text += _table("Agreement with the final layer", head_rows(None, mt), "logit lens: the baseline")
    text += _table("Cascade", cascade_rows(mt, None), "eval tokens")
    decode = mt.get("decode")
    if decode:
        best = next((s for s in decode.get("settings", []) if s["name"] == decode.get("best")), None)
        text += (f"\nDecoding: greedy {num(decode.get('greedy_tokens_per_s'), 1)} tokens/s; best self-speculative "
                 + (f"{best['name']} at {times(best['speedup'])}." if best else "none drafted with identical output.")
                 + "\n" + _table("Decoding", decode_rows(decode)))
    return text


def _quantize(store: ArtifactStore, m: Manifest) -> str:
    mt = m.metrics
    per = layer_sorted(mt.get("eval", {}))
    change = [e["ternary_agreement"] - e["float_agreement"] for _, e in per
              if e.get("ternary_agreement") is not None and e.get("float_agreement") is not None]
    text = (f"Ternary {mt.get('kind')} heads, {mt.get('steps')} steps; agreement vs float "
            + (f"{100 * sum(change) / len(change):+.1f} pt on average." if change else "not measured.") + "\n")
    return text + _table("Ternary vs float", ternary_rows(mt), "eval tokens")


def _recalibrate(store: ArtifactStore, m: Manifest) -> str:
    return recalibration_markdown(load_drift_payload(store, m.key))


def _report(store: ArtifactStore, m: Manifest) -> str:
    lines = "\n".join(f"- {line}" for line in headline_lines(m.metrics))
    return f"Report of {', '.join(m.inputs)}: `{report_html_path(store, m.key)}`\n\n{lines}\n"


_WRITERS: dict[str, Callable[[ArtifactStore, Manifest], str]] = {
    "extract": _extract, "teacher_topk": _topk, "train_heads": _heads, "train_gates": _gates,
    "calibrate": _calibrate, "evaluate": _evaluate, "quantize": _quantize, "recalibrate": _recalibrate,
    "report": _report,
}
