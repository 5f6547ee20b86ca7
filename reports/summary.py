"""A run's key numbers as plain JSON (``metrics.json``), its headline (the report artifact's
manifest metrics, which the index lists), and the markdown summary (``summary.md``): the same
sections as the HTML page, tables without the plots."""

from __future__ import annotations

from pipeline.calibrate import Calibration
from reports.format import (
    Section,
    layer_sorted,
    level,
    markdown_table,
    pct,
    points,
    short,
    times,
)
from reports.run import RunArtifacts
from reports.tables import guarantee_checks, payload_bytes

DEFAULT_LEVEL = 0.9
"""The level whose cascade the headline quotes when the evaluation names no draft level."""


def key_metrics(run: RunArtifacts, sections: list[Section]) -> dict:
    """The numbers a person compares between runs, per part of the run, as plain JSON (floats,
    ints, strings, lists, dicts; layer keys as strings)."""
    out: dict = {"inputs": {n: m.key for n, m in run.manifests.items()}, "model": run.model_name,
                 "data": run.data, "sections": [s.id for s in sections]}
    caches = {n.removesuffix("_cache"): m for n, m in run.manifests.items() if n.endswith("_cache")}
    if caches:
        out["caches"] = {name: {"key": m.key, "tokens": m.metrics.get("tokens"), "layers": m.config.get("layers"),
                                "hidden_size": m.metrics.get("hidden_size"), "storage_dtype": m.config.get("storage_dtype"),
                                "documents": m.extra.get("num_documents"), "bytes": payload_bytes(m)}
                         for name, m in caches.items()}
    heads = _heads(run)
    if heads:
        out["heads"] = heads
    gates = _gates(run)
    if gates:
        out["gates"] = gates
    cal = run.calibrations.get("calibration")
    if cal is not None:
        out["calibration"] = {"method": cal.method, "levels": cal.levels, "delta": cal.delta, "reference": cal.reference,
                              "tokens": cal.n, "thresholds": {p: {str(layer): [r.threshold for r in rs]
                                                                  for layer, rs in cal.chosen(p).items()}
                                                              for p in cal.predictors}}
    evaluation = run.metrics("evaluation")
    cascade = _cascade(evaluation, cal)
    if cascade:
        out["cascade"] = cascade
    checks = guarantee_checks(evaluation, cal)
    if checks:
        out["guarantees"] = {"held": sum(bool(c["held"]) for c in checks), "checked": len(checks)}
    q = run.metrics("quantized")
    if q and q.get("eval"):
        out["ternary"] = {str(layer): {k: e.get(k) for k in ("float_agreement", "ternary_agreement",
                                                             "float_gate_auroc", "ternary_gate_auroc")}
                          for layer, e in layer_sorted(q["eval"])}
    decode = {label: _decode(m["decode"]) for label, m in (("float", evaluation),
                                                           ("ternary", run.metrics("ternary_evaluation")))
              if m and m.get("decode")}
    if decode:
        out["decode"] = decode
    if run.drift is not None:
        out["recalibration"] = {"promote": run.drift.promote, "reason": run.drift.reason,
                                "failed": len(run.drift.failures), "checked": run.drift.checked}
    return out


def headline(metrics: dict, draft_level: float | None = None) -> dict:
    """A few numbers of `key_metrics` for the report's manifest and the index: agreement per
    head beside the logit lens, the cascade's compute saved at one level, guarantees held, the
    best decoding speed-up, ternary's change in agreement, and the recalibration decision."""
    out: dict = {"sections": metrics["sections"], "model": metrics["model"]}
    if "heads" in metrics:
        out["agreement"] = {k: h["agreement"] for k, h in metrics["heads"].items()}
        out["lens_agreement"] = {k: h.get("logit_lens") for k, h in metrics["heads"].items()}
    chosen = _at_level(metrics.get("cascade", []), draft_level)
    if chosen:
        out["compute_saved"] = chosen["compute_saved"]
        out["compute_saved_at"] = {"predictor": chosen["predictor"], "level": chosen["level"]}
    if "guarantees" in metrics:
        out["guarantees_held"], out["guarantees_checked"] = metrics["guarantees"]["held"], metrics["guarantees"]["checked"]
    if "float" in metrics.get("decode", {}):
        out["decode_speedup"] = metrics["decode"]["float"]["speedup"]
    if "ternary" in metrics:
        changes = [e["ternary_agreement"] - e["float_agreement"] for e in metrics["ternary"].values()
                   if e.get("ternary_agreement") is not None and e.get("float_agreement") is not None]
        if changes:
            out["ternary_agreement_change"] = sum(changes) / len(changes)
    if "recalibration" in metrics:
        out["promoted"] = metrics["recalibration"]["promote"]
    return out


def headline_lines(head: dict) -> list[str]:
    """The headline as short sentences (the top of the page and of summary.md)."""
    lines = []
    if head.get("agreement"):
        agree = ", ".join(f"{k}: {pct(v)}" for k, v in layer_sorted(head["agreement"]))
        lens = ", ".join(f"{k}: {pct(v)}" for k, v in layer_sorted(head.get("lens_agreement") or {}))
        lines.append(f"Heads agree with the final layer on {agree} of eval tokens (logit lens {lens}).")
    if "compute_saved" in head:
        at = head["compute_saved_at"]
        lines.append(f"The {at['predictor']} cascade at level {level(at['level'])} saves {pct(head['compute_saved'])} "
                     "of layer compute.")
    if "guarantees_checked" in head:
        lines.append(f"Guarantees held on eval tokens: {head['guarantees_held']} of {head['guarantees_checked']}.")
    if "decode_speedup" in head:
        lines.append(f"Best self-speculative decoding: {times(head['decode_speedup'])} greedy's speed.")
    if "ternary_agreement_change" in head:
        lines.append(f"Ternary heads: {points(head['ternary_agreement_change'])} agreement vs float, on average.")
    if "promoted" in head:
        lines.append("Recalibration: " + ("promoted." if head["promoted"] else "kept the calibration in service."))
    return lines


def render_markdown(run: RunArtifacts, sections: list[Section], head: dict) -> str:
    """summary.md: the headline, then each section's text, notes and tables."""
    lines = [f"# exitflow report: {run.model_name}", "",
             f"Data: {run.data or 'unknown'}. Inputs: " + ", ".join(f"{n} `{short(m.key)}`"
                                                                    for n, m in run.manifests.items()) + ".", ""]
    lines += [f"- {line}" for line in headline_lines(head)]
    for s in sections:
        lines += ["", f"## {s.title}", ""]
        lines += [*s.text, ""] if s.text else []
        lines += [f"> **Note:** {n}" for n in s.notes]
        for t in s.tables:
            if t.rows:
                lines += ["", f"### {t.title}", ""] + ([f"_{t.note}_", ""] if t.note else []) + [markdown_table(t.rows)]
        if s.figures:
            lines += ["", f"_Plots in report.html: {', '.join(f.title for f in s.figures)}._"]
    return "\n".join(lines).rstrip() + "\n"


def _heads(run: RunArtifacts) -> dict:
    evaluation, heads = run.metrics("evaluation"), run.metrics("heads")
    if evaluation:
        return {str(layer): {"agreement": h["agreement"], "logit_lens": evaluation["lens"][str(layer)]["agreement"],
                             "top5_agreement": h["top5_agreement"], "accuracy": h["accuracy"],
                             "entropy_auroc": h["entropy_auroc"], "kl_from_teacher": h["kl_from_teacher"]}
                for layer, h in layer_sorted(evaluation["heads"])}
    if heads and heads.get("eval"):
        lens = heads.get("logit_lens", {})
        return {str(layer): {"agreement": h.get("agreement"), "logit_lens": lens.get(str(layer), {}).get("agreement"),
                             "accuracy": h.get("accuracy"), "entropy_auroc": h.get("entropy_auroc")}
                for layer, h in layer_sorted(heads["eval"])}
    return {}


def _gates(run: RunArtifacts) -> dict:
    evaluation, gates = run.metrics("evaluation"), run.metrics("gates")
    source = (evaluation or {}).get("gates") or (gates or {}).get("eval") or {}
    return {str(layer): {"gate_auroc": g.get("gate_auroc"), "entropy_auroc": g.get("entropy_auroc")}
            for layer, g in layer_sorted(source)}


def _cascade(evaluation: dict | None, cal: Calibration | None) -> list[dict]:
    if evaluation and evaluation.get("cascade"):
        return [{"predictor": c["predictor"], "level": c["level"], "avg_exit_layer": c["avg_exit_layer"],
                 "compute_saved": c["compute_saved"], "accuracy": c["accuracy"], "met": c["met"], "tokens": "eval"}
                for c in evaluation["cascade"]]
    if cal is None:
        return []
    return [{"predictor": p, "level": c.level, "avg_exit_layer": c.avg_exit_layer,
             "compute_saved": 1 - c.avg_exit_layer / cal.final_layer, "accuracy": c.accuracy, "met": None,
             "tokens": "calib"} for p in cal.predictors for c in cal.chosen_cascade(p)]


def _at_level(cascade: list[dict], draft_level: float | None) -> dict | None:
    """The entropy cascade's row at the draft level (else the level nearest `DEFAULT_LEVEL`)."""
    rows = [c for c in cascade if c["predictor"] == "entropy"] or cascade
    if not rows:
        return None
    target = DEFAULT_LEVEL if draft_level is None else draft_level
    return min(rows, key=lambda c: (abs(c["level"] - target), -c["level"]))


def _decode(d: dict) -> dict:
    best = next((s for s in d.get("settings", []) if s["name"] == d.get("best")), None)
    return {"greedy_tokens_per_s": d.get("greedy_tokens_per_s"), "best": d.get("best"),
            "speedup": best["speedup"] if best else None, "acceptance": best["acceptance"] if best else None,
            "tokens_per_s": best["tokens_per_s"] if best else None}
