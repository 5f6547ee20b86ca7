"""The tables of a report, each from one artifact's metrics: rows of formatted cells, keys in
reading order (`reports.format`). The HTML page, summary.md and the Prefect UI's per-stage
tables all come from these functions, so a column has one name everywhere."""

from __future__ import annotations

from pipeline.calibrate import Calibration
from reports.format import (
    MISSING,
    Rows,
    human_bytes,
    layer_sorted,
    level,
    num,
    pct,
    points,
    short,
    signed,
    times,
    yes_no,
)
from stores.artifacts import Manifest


def payload_bytes(m: Manifest) -> int:
    """Bytes on disk of an artifact's payload, from its manifest (folders counted whole)."""
    return sum(int(f.get("size", 0)) for f in m.files.values())


# ----------------------------------------------------------------------------- caches


def cache_rows(caches: dict[str, Manifest]) -> Rows:
    """One row per hidden-state cache (name: train / calib / eval)."""
    rows = []
    for name, m in caches.items():
        mt, cfg = m.metrics, m.config
        rows.append({"cache": name, "key": short(m.key), "tokens": num(mt.get("tokens")),
                     "documents": num(m.extra.get("num_documents")),
                     "layers": ", ".join(str(x) for x in cfg.get("layers", [])),
                     "hidden": num(mt.get("hidden_size")), "stored as": str(cfg.get("storage_dtype", MISSING)),
                     "backbone dtype": str(m.extra.get("dtype", MISSING)), "size": human_bytes(payload_bytes(m)),
                     "tokens/s": num(mt.get("tokens_per_s"), 0)})
    return rows


def topk_rows(m: Manifest) -> Rows:
    mt = m.metrics
    return [{"k": num(mt.get("k")), "tokens": num(mt.get("tokens")), "top-k mass (mean)": pct(mt.get("topk_mass_mean")),
             "top-k mass (p10)": pct(mt.get("topk_mass_p10")), "size": human_bytes(payload_bytes(m)),
             "tokens/s": num(mt.get("tokens_per_s"), 0)}]


# ----------------------------------------------------------------------------- heads


def head_rows(heads_metrics: dict | None, evaluation: dict | None = None) -> Rows:
    """Per head: agreement with the final layer beside the logit lens at its layer. From the
    evaluation when there is one (eval tokens, every quality metric), else from the train_heads
    artifact's own eval numbers."""
    if evaluation:
        rows = []
        for layer, h in layer_sorted(evaluation["heads"]):
            lens = evaluation["lens"][str(layer)]
            rows.append({"head": str(layer), "agreement": pct(h["agreement"]), "logit lens": pct(lens["agreement"]),
                         "gain": points(_diff(h["agreement"], lens["agreement"])), "top-5": pct(h["top5_agreement"]),
                         "accuracy": pct(h["accuracy"]), "perplexity": num(h["perplexity"], 1),
                         "KL to teacher": num(h["kl_from_teacher"]), "ECE": num(h["ece"]),
                         "entropy AUROC": num(h["entropy_auroc"])})
        return rows
    if not heads_metrics or "eval" not in heads_metrics:
        return []
    lens_all = heads_metrics.get("logit_lens", {})
    rows = []
    for layer, h in layer_sorted(heads_metrics["eval"]):
        lens = lens_all.get(str(layer), {})
        rows.append({"head": str(layer), "agreement": pct(h.get("agreement")), "logit lens": pct(lens.get("agreement")),
                     "gain": points(_diff(h.get("agreement"), lens.get("agreement"))),
                     "accuracy": pct(h.get("accuracy")), "entropy AUROC": num(h.get("entropy_auroc"))})
    return rows


def epoch_rows(epochs: list[dict]) -> Rows:
    """Training per epoch: loss, throughput and (heads) probe agreement or (gates) held-out AUROC per head."""
    rows = []
    for e in epochs:
        row = {"epoch": str(e["epoch"]), "loss": num(e.get("loss"), 4), "tokens/s": num(e.get("tokens_per_s"), 0)}
        for what, name in (("agreement", "agreement"), ("auroc", "AUROC")):
            for layer, v in layer_sorted(e.get(what, {})):
                row[f"{name} {layer}"] = pct(v) if what == "agreement" else num(v)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- gates


def gate_rows(gates_metrics: dict | None, evaluation: dict | None = None) -> Rows:
    """Per gate: AUROC of p_exit against its head's -entropy for "the head agrees", on eval
    tokens (the evaluation's, else the train_gates artifact's), or on held-out train rows."""
    source = (evaluation or {}).get("gates") or (gates_metrics or {}).get("eval")
    if source:
        return [{"head": str(layer), "agreement": pct(g.get("agreement")), "gate AUROC": num(g.get("gate_auroc")),
                 "entropy AUROC": num(g.get("entropy_auroc")),
                 "gate − entropy": signed(_diff(g.get("gate_auroc"), g.get("entropy_auroc")))}
                for layer, g in layer_sorted(source)]
    held, ent = (gates_metrics or {}).get("heldout_auroc", {}), (gates_metrics or {}).get("heldout_entropy_auroc", {})
    return [{"head": str(layer), "agreement": MISSING, "gate AUROC": num(v), "entropy AUROC": num(ent.get(str(layer))),
             "gate − entropy": signed(_diff(v, ent.get(str(layer))))} for layer, v in layer_sorted(held)]


def operating_point_rows(evaluation: dict) -> Rows:
    """Per gate, at each fixed p_exit threshold: the share of tokens that exit and how often the
    head agrees on them."""
    rows = []
    for layer, g in layer_sorted(evaluation.get("gates", {})):
        row = {"head": str(layer)}
        for p in g["operating_points"]:
            if p["kind"] == "fixed":
                row[f"exit at p ≥ {p['threshold']:g}"] = pct(p["exit_rate"])
                row[f"agreement at p ≥ {p['threshold']:g}"] = pct(p["agreement"])
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- calibration


def threshold_rows(cal: Calibration) -> Rows:
    """The deployed thresholds per head and predictor (entropy: exit below, in nats; gate:
    exit when p_exit is above), one column per level; "none": no threshold meets the level."""
    rows = []
    for predictor in cal.predictors:
        for layer, results in cal.chosen(predictor).items():
            row = {"head": str(layer), "predictor": predictor}
            for r in results:
                row[f"level {level(r.level)}"] = "none" if r.threshold is None else num(r.threshold)
            rows.append(row)
    return rows


def exit_rate_rows(cal: Calibration) -> Rows:
    """Per head and predictor, the share of calibration tokens its own threshold lets exit, per level."""
    rows = []
    for predictor in cal.predictors:
        for layer, results in cal.chosen(predictor).items():
            row = {"head": str(layer), "predictor": predictor}
            for r in results:
                row[f"level {level(r.level)}"] = pct(r.exit_rate)
            rows.append(row)
    return rows


def deployed_rows(evaluation: dict | None, cal: Calibration | None) -> Rows:
    """Per head and level, the share of tokens each predictor's certified threshold lets exit
    and the predictor deployed (the higher rate; ties: entropy), on eval tokens (the evaluation,
    else the calibration's own choice, on the tokens it was made on)."""
    if evaluation and evaluation.get("deployed"):
        items = [(d["head"], d["level"], d["predictor"], d["exit_rates"], d.get("held")) for d in evaluation["deployed"]]
    elif cal is not None and cal.deployed:
        items = [(d.head, d.level, d.predictor, d.exit_rates, None) for d in cal.deployed]
    else:
        return []
    rows = []
    for head, lvl, predictor, rates, held in items:
        row = {"head": str(head), "level": level(lvl)}
        for p, r in rates.items():
            row[f"exit rate ({p})"] = pct(r)
        row["deployed"] = predictor if held is None else f"{predictor}{'' if held else ' (FAILED)'}"
        rows.append(row)
    return rows


def cascade_rows(evaluation: dict | None, cal: Calibration | None) -> Rows:
    """The cascade per predictor and level: average exit layer, the share of layer compute
    saved and the accuracy reached, on eval tokens (the evaluation) or calibration tokens."""
    if evaluation:
        return [{"predictor": c["predictor"], "level": level(c["level"]), "avg exit layer": num(c["avg_exit_layer"], 2),
                 "compute saved": pct(c["compute_saved"]), "accuracy": pct(c["accuracy"]),
                 "target met": yes_no(c["met"]), "accuracy (calib)": pct(c["calib_accuracy"])}
                for c in evaluation["cascade"]]
    if cal is None:
        return []
    return [{"predictor": p, "level": level(c.level), "avg exit layer": num(c.avg_exit_layer, 2),
             "compute saved": pct(1 - c.avg_exit_layer / cal.final_layer), "accuracy": pct(c.accuracy),
             "target met": MISSING, "accuracy (calib)": pct(c.accuracy)}
            for p in cal.predictors for c in cal.chosen_cascade(p)]


def guarantee_checks(evaluation: dict | None, cal: Calibration | None) -> list[dict]:
    """The deployed thresholds checked on eval tokens, as plain dicts: the evaluation's, else the
    calibration's own held-out check (both are `check_held_out` rows)."""
    if evaluation and evaluation.get("guarantees"):
        return list(evaluation["guarantees"])
    if cal is not None and cal.held_out:
        return [r.to_dict() for r in cal.held_out]
    return []


def guarantee_rows(checks: list[dict]) -> Rows:
    """Per predictor and level, each head's accuracy on the eval tokens it let exit, whether the
    guarantee held (not significantly below the level) and on how many exits that verdict rests;
    "no exit" where none exited."""
    by_key: dict[tuple[str, float], dict[str, str]] = {}
    for r in checks:
        row = by_key.setdefault((r["predictor"], r["level"]), {"predictor": r["predictor"], "level": level(r["level"])})
        if not r.get("n_exited"):
            cell = "no exit"
        else:
            cell = f"{pct(r['accuracy'])} {'held' if r['held'] else 'FAILED'} ({r['n_exited']:,} exits)"
        row[f"head {r['head']}"] = cell
    return list(by_key.values())


# ----------------------------------------------------------------------------- ternary, decoding


def ternary_rows(quantize_metrics: dict) -> Rows:
    """Per head on eval tokens: float vs ternary agreement and AUROCs, and the packed size."""
    size, packed = quantize_metrics.get("size", {}), quantize_metrics.get("packed", {})
    rows = []
    for layer, e in layer_sorted(quantize_metrics.get("eval", {})):
        s, p = size.get(str(layer), {}), packed.get(str(layer), {})
        ms = p.get("ms_per_token", {}).get("batch_1", {})
        rows.append({"head": str(layer), "float agreement": pct(e.get("float_agreement")),
                     "ternary agreement": pct(e.get("ternary_agreement")),
                     "change": points(_diff(e.get("ternary_agreement"), e.get("float_agreement"))),
                     "float entropy AUROC": num(e.get("float_entropy_auroc")),
                     "ternary entropy AUROC": num(e.get("ternary_entropy_auroc")),
                     "float gate AUROC": num(e.get("float_gate_auroc")),
                     "ternary gate AUROC": num(e.get("ternary_gate_auroc")),
                     "float32 size": human_bytes(s.get("float32_bytes")), "packed size": human_bytes(s.get("packed_bytes")),
                     "ms/token float32": num(ms.get("float32"), 2), "ms/token packed": num(ms.get("packed"), 2)})
    return rows


def float_vs_ternary_cascade_rows(float_eval: dict, ternary_eval: dict) -> Rows:
    """The cascade's compute saved and accuracy at each predictor and level, float vs ternary heads."""
    ternary = {(c["predictor"], c["level"]): c for c in ternary_eval.get("cascade", [])}
    rows = []
    for c in float_eval.get("cascade", []):
        t = ternary.get((c["predictor"], c["level"]), {})
        rows.append({"predictor": c["predictor"], "level": level(c["level"]),
                     "float compute saved": pct(c["compute_saved"]), "ternary compute saved": pct(t.get("compute_saved")),
                     "float accuracy": pct(c["accuracy"]), "ternary accuracy": pct(t.get("accuracy"))})
    return rows


def decode_rows(decode: dict, heads: str = "float") -> Rows:
    """Greedy, then each self-speculative setting and early exit: tokens/s, speed-up over greedy,
    acceptance and tokens per verification (τ); `heads` names the head set in the first column."""
    rows = [{"heads": heads, "setting": "greedy (full model)", "tokens/s": num(decode.get("greedy_tokens_per_s"), 1),
             "speedup": times(1.0), "acceptance": MISSING, "τ": MISSING, "identical": "yes"}]
    for s in decode.get("settings", []):
        name = s["name"] + (" (best)" if s["name"] == decode.get("best") else "" if s.get("drafted") else
                            " (never drafted)")
        rows.append({"heads": heads, "setting": name, "tokens/s": num(s.get("tokens_per_s"), 1),
                     "speedup": times(s.get("speedup")), "acceptance": pct(s.get("acceptance")),
                     "τ": num(s.get("tau"), 2), "identical": yes_no(s.get("identical"))})
    ee = decode.get("early_exit")
    if ee:
        rows.append({"heads": heads, "setting": "early exit", "tokens/s": num(ee.get("tokens_per_s"), 1),
                     "speedup": times(ee.get("speedup")), "acceptance": MISSING, "τ": MISSING,
                     "identical": f"{pct(ee.get('matches_greedy'))} of tokens"})
    return rows


def _diff(a: object, b: object) -> float | None:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) - float(b)
    return None
