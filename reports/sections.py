"""A report's sections, one per kind of artifact among a run's inputs, each present only when
its artifact is: the caches, the heads, the gates, the calibrated exits, the recalibration
drift, ternary vs float heads, and decoding speed. The first section names the run.

Sections hold formatted tables (`reports.tables`) and lazily drawn plots (`reports.plots`);
`reports.html` and `reports.summary` render the same sections, so both say the same thing.
"""

from __future__ import annotations

from functools import partial

from pipeline.calibrate import Calibration
from reports import plots
from reports.format import (
    Figure,
    Section,
    Table,
    layer_sorted,
    level,
    pct,
    short,
    times,
)
from reports.recalibration import drift_rows
from reports.run import RunArtifacts
from reports.tables import (
    cache_rows,
    cascade_rows,
    deployed_rows,
    decode_rows,
    epoch_rows,
    exit_rate_rows,
    float_vs_ternary_cascade_rows,
    gate_rows,
    guarantee_checks,
    guarantee_rows,
    head_rows,
    operating_point_rows,
    ternary_rows,
    threshold_rows,
    topk_rows,
)

SECTION_TITLES = {"run": "Run", "caches": "Hidden-state caches", "heads": "Exit heads", "gates": "Exit gates",
                  "calibration": "Calibrated exits", "recalibration": "Recalibration drift",
                  "ternary": "Ternary vs float heads", "decoding": "Decoding speed"}
"""Every section a report can hold, in page order."""

CURVES_VERSION = "evaluate-3"
"""The first evaluate code version whose metrics carry the curves (ROC points, entropy bins)."""


def build_sections(run: RunArtifacts) -> list[Section]:
    """The sections of a report of `run`, in page order; those without their artifact are left out."""
    builders = [_run, _caches, _heads, _gates, _calibration, _recalibration, _ternary, _decoding]
    return [s for s in (b(run) for b in builders) if s is not None]


def _older(m) -> str:
    return (f"evaluation {short(m.key)} was made by {m.code_version}, before evaluations recorded curves "
            f"({CURVES_VERSION}); re-run the evaluate stage to draw them")


# ----------------------------------------------------------------------------- run


def _run(run: RunArtifacts) -> Section:
    artifacts = [{"input": name, "stage": m.stage, "key": short(m.key), "created": m.created,
                  "code": m.code_version} for name, m in run.manifests.items()]
    settings = [{"setting": "backbone", "value": run.model_name},
                {"setting": "data", "value": run.data or "unknown"}]
    for name in ("train_cache", "eval_cache", "calib_cache"):
        if name in run.manifests:
            c = run.manifests[name].config
            settings.append({"setting": "cached layers", "value": ", ".join(map(str, c.get("layers", [])))})
            settings.append({"setting": "sequence length", "value": str(c.get("seq_len", "–"))})
            break
    if "heads" in run.manifests:
        h = run.manifests["heads"].config
        settings.append({"setting": "heads", "value": f"{h.get('kind')} at layers {h.get('layers')}, loss {h.get('loss')}"
                         f"{' (efficient)' if h.get('efficient_loss') else ''}, {h.get('epochs')} epochs, "
                         f"lr {h.get('lr')}, {h.get('mode')}"})
    if "gates" in run.manifests:
        g = run.manifests["gates"].config
        settings.append({"setting": "gates", "value": f"features {g.get('features', 'hidden')}, {g.get('epochs')} "
                         f"epochs, lr {g.get('lr')}, hidden ratio {g.get('hidden_ratio')}, sampling {g.get('sampling')}"})
    for name in ("calibration", "ternary_calibration"):
        if name in run.manifests:
            c = run.manifests[name].config
            right = "the final layer's top-1" if c.get("reference") == "final" else "the true next token"
            settings.append({"setting": "calibration", "value": f"{c.get('method')}, levels {c.get('levels')}, "
                             f"δ {c.get('delta')}, right = {right}"})
            break
    if "evaluation" in run.manifests:
        e = run.manifests["evaluation"]
        settings.append({"setting": "evaluation", "value": f"{e.metrics.get('tokens', '–')} eval tokens, decoding "
                         f"{'on' if e.config.get('decode') else 'off'}, draft level {e.extra.get('draft_level', '–')}"})
    if "quantized" in run.manifests:
        q = run.manifests["quantized"].config
        settings.append({"setting": "quantize", "value": f"ternary, {q.get('epochs')} epochs, lr {q.get('lr')}, "
                         f"gates {'on' if q.get('gates') else 'off'}, hadamard {'on' if q.get('hadamard') else 'off'}"})
    return Section("run", SECTION_TITLES["run"], tables=[Table("Artifacts", artifacts), Table("Settings", settings)])


# ----------------------------------------------------------------------------- caches


def _caches(run: RunArtifacts) -> Section | None:
    caches = {n.removesuffix("_cache"): m for n, m in run.manifests.items() if n.endswith("_cache")}
    if not caches and "teacher_topk" not in run.manifests:
        return None
    tables = [Table("Caches", cache_rows(caches), "size: bytes on disk (hidden states and the teacher's weights)")]
    if "teacher_topk" in run.manifests:
        tables.append(Table("Teacher top-k", topk_rows(run.manifests["teacher_topk"]),
                            "top-k mass: the final layer's probability on its k most likely tokens"))
    return Section("caches", SECTION_TITLES["caches"], tables=[t for t in tables if t.rows])


# ----------------------------------------------------------------------------- heads


def _heads(run: RunArtifacts) -> Section | None:
    heads, evaluation = run.get("heads"), run.metrics("evaluation")
    if heads is None and evaluation is None:
        return None
    section = Section("heads", SECTION_TITLES["heads"])
    rows = head_rows(heads.metrics if heads else None, evaluation)
    source = "eval tokens (evaluation)" if evaluation else "eval tokens (train_heads)"
    section.tables.append(Table("Agreement with the final layer", rows,
                                f"on {source}; logit lens: the backbone's own LM head at the head's layer, "
                                "the baseline; gain in percentage points"))
    if evaluation:
        per = {layer: (h["agreement"], evaluation["lens"][str(layer)]["agreement"])
               for layer, h in layer_sorted(evaluation["heads"])}
    elif heads and "eval" in heads.metrics:
        lens = heads.metrics.get("logit_lens", {})
        per = {layer: (h.get("agreement"), lens.get(str(layer), {}).get("agreement"))
               for layer, h in layer_sorted(heads.metrics["eval"])}
    else:
        per = {}
    if per:
        section.figures.append(Figure("Agreement per head", partial(
            plots.grouped_bars, list(per), {"trained head": [a for a, _ in per.values()],
                                            "logit lens": [b for _, b in per.values()]},
            [plots.HEADS_COLOR, plots.LENS_COLOR], "agreement with the final layer", "agreement per head"),
            "top-1 equal to the final layer's top-1"))
    if heads and heads.metrics.get("epochs"):
        epochs = heads.metrics["epochs"]
        section.figures.append(_training_figure(epochs, "agreement", "probe agreement", True, section))
        section.tables.append(Table("Training per epoch", epoch_rows(epochs), "agreement on a fixed probe of train rows"))
        section.text.append(f"{heads.config.get('kind')} heads, {heads.metrics.get('steps')} steps at "
                            f"{heads.metrics.get('tokens_per_s')} tokens/s.")
    return section


def _training_figure(epochs: list[dict], what: str, label: str, percent: bool, section: Section) -> Figure:
    curve = [pt for e in epochs for pt in e.get("loss_curve", [])]
    ends: list[float] = []
    if curve:
        loss = {"loss": ([s for s, _ in curve], [v for _, v in curve])}
        xlabel = "step"
        ends = [e["loss_curve"][-1][0] for e in epochs[:-1] if e.get("loss_curve")]
    else:
        loss = {"loss": ([e["epoch"] for e in epochs], [e["loss"] for e in epochs])}
        xlabel = "epoch"
        section.notes.append("This artifact predates per-step loss curves: training loss is shown per epoch.")
    per_head: dict[int, tuple[list, list]] = {}
    for e in epochs:
        for layer, v in layer_sorted(e.get(what, {})):
            xs, ys = per_head.setdefault(layer, ([], []))
            xs.append(e["epoch"])
            ys.append(v)
    return Figure("Training", partial(plots.training_curves, loss, xlabel, per_head, label, percent, ends),
                  f"loss per {xlabel}" + (" (dotted: end of an epoch)" if ends else "") + f"; {label} after each epoch")


# ----------------------------------------------------------------------------- gates


def _gates(run: RunArtifacts) -> Section | None:
    gates, ev = run.get("gates"), run.get("evaluation")
    evaluation = ev.metrics if ev else None
    if gates is None and not (evaluation and evaluation.get("gates")):
        return None
    section = Section("gates", SECTION_TITLES["gates"])
    section.tables.append(Table("Gates against the heads' entropy", gate_rows(gates.metrics if gates else None,
                                                                            evaluation),
                                "AUROC for \"the head agrees with the final layer\": the gate's p_exit vs the "
                                "head's -entropy, on eval tokens"))
    if evaluation and evaluation.get("gates"):
        section.tables.append(Table("Fixed thresholds", operating_point_rows(evaluation),
                                    "exit when p_exit ≥ the threshold; agreement of the tokens that exit"))
    if evaluation and evaluation.get("curves"):
        curves = {}
        for layer, c in layer_sorted(evaluation["curves"]):
            g = evaluation.get("gates", {}).get(str(layer), {})
            by = {}
            if c.get("entropy_roc"):
                by["-entropy"] = (c["entropy_roc"]["fpr"], c["entropy_roc"]["tpr"],
                                  evaluation["heads"][str(layer)]["entropy_auroc"])
            if c.get("gate_roc"):
                by["gate p_exit"] = (c["gate_roc"]["fpr"], c["gate_roc"]["tpr"], g.get("gate_auroc"))
            curves[layer] = by
        section.figures.append(Figure("ROC curves", partial(plots.roc_curves, curves),
                                      "does the score rank agreeing tokens first? eval tokens"))
    elif ev is not None:
        section.notes.append(f"No ROC curves: {_older(ev)}.")
    else:
        section.notes.append("No ROC curves: they come from an evaluation, which is not among this report's inputs.")
    if gates and gates.metrics.get("epochs"):
        section.figures.append(_training_figure(gates.metrics["epochs"], "auroc", "held-out AUROC", False, section))
    return section


# ----------------------------------------------------------------------------- calibration


def _calibration(run: RunArtifacts) -> Section | None:
    cal, ev = run.calibrations.get("calibration"), run.get("evaluation")
    if cal is None and ev is None:
        return None
    evaluation = ev.metrics if ev else None
    section = Section("calibration", SECTION_TITLES["calibration"])
    if cal is not None:
        right = "the final layer's top-1" if cal.reference == "final" else "the true next token"
        section.text.append(f"Thresholds by {cal.method} (δ = {cal.delta:g}) on {cal.n:,} calibration tokens at "
                            f"levels {', '.join(level(x) for x in cal.levels)}; a token counts as right when the "
                            f"head's top-1 is {right}.")
        section.tables.append(Table("Thresholds", threshold_rows(cal),
                                    "entropy: exit below (nats); gate: exit when p_exit is above; none: no "
                                    "threshold reaches the level"))
        section.tables.append(Table("Exit rate per head and level", exit_rate_rows(cal),
                                    "each head alone, on calibration tokens"))
        section.figures.append(Figure("Exit rate per head and level", partial(plots.heatmaps, _exit_panels(cal),
                                                                               "exit rate"),
                                      "share of calibration tokens each head's own threshold lets exit"))
    deployed = deployed_rows(evaluation, cal)
    if deployed:
        where = "eval tokens" if evaluation and evaluation.get("deployed") else f"{cal.deployed_on} tokens"
        section.tables.append(Table("Deployed predictor per head and level", deployed,
                                    "share of tokens each predictor's certified threshold lets exit; the head "
                                    f"exits on the predictor with the higher rate (ties: entropy, it is free); {where}"))
    cascade = cascade_rows(evaluation, cal)
    if cascade:
        where = "eval tokens" if evaluation else "calibration tokens"
        section.tables.append(Table("Cascade", cascade, f"a token leaves at the first head whose threshold it "
                                    f"passes; compute saved = 1 - avg exit layer / layers; {where}"))
        section.figures.append(Figure("Cascade", partial(plots.cascade_bars, _cascade_panels(evaluation, cal)),
                                      f"where tokens leave at each level, {where}"))
    checks = guarantee_checks(evaluation, cal)
    if checks:
        failed = [c for c in checks if c.get("held") is False]
        section.tables.append(Table("Guarantees on eval tokens", guarantee_rows(checks),
                                    "accuracy of the tokens a head lets exit; held: not significantly below "
                                    "the level (one-sided binomial test); a 2-point miss shows only with "
                                    "thousands of exits at the loose levels (README, Calibration data)"))
        section.text.append(f"Guarantees held on eval tokens: {len(checks) - len(failed)} of {len(checks)}.")
        if failed:
            section.notes.append("Not held on eval tokens: " + ", ".join(
                f"{c['predictor']} head {c['head']} at {level(c['level'])} ({pct(c['accuracy'])})" for c in failed))
    if evaluation and evaluation.get("curves"):
        ylabel = "agreement" if (cal is None or cal.reference == "final") else "accuracy"
        bins = {layer: (c["entropy_bins"]["centre"], c["entropy_bins"][ylabel])
                for layer, c in layer_sorted(evaluation["curves"])}
        thresholds = _entropy_thresholds(cal) if cal is not None else {}
        section.figures.append(Figure("Agreement against entropy", partial(
            plots.accuracy_by_entropy, bins, thresholds, ylabel), f"{ylabel} in 20 quantile bins of each head's "
            "entropy on eval tokens; dashed: the entropy threshold of each level"))
    elif ev is not None:
        section.notes.append(f"No agreement-against-entropy curves: {_older(ev)}.")
    return section


def _exit_panels(cal: Calibration) -> dict[str, tuple[list[str], list[str], list[list[float | None]]]]:
    panels = {}
    for predictor in cal.predictors:
        chosen = cal.chosen(predictor)
        rows = [f"head {layer}" for layer in chosen]
        panels[predictor] = (rows, [level(x) for x in cal.levels], [[r.exit_rate for r in rs] for rs in chosen.values()])
    return panels


def _cascade_panels(evaluation: dict | None, cal: Calibration | None) -> dict[str, list]:
    panels: dict[str, list] = {}
    if evaluation:
        for c in evaluation["cascade"]:
            panels.setdefault(c["predictor"], []).append(
                (level(c["level"]), {int(k): v for k, v in c["exit_rates"].items()}, c["compute_saved"]))
    elif cal is not None:
        for p in cal.predictors:
            panels[p] = [(level(c.level), {int(k): v for k, v in c.exit_rates.items()},
                          1 - c.avg_exit_layer / cal.final_layer) for c in cal.chosen_cascade(p)]
    return panels


def _entropy_thresholds(cal: Calibration) -> dict[int, list[tuple[float, float | None]]]:
    return {layer: [(r.level, r.threshold) for r in rs] for layer, rs in cal.chosen("entropy").items()}


# ----------------------------------------------------------------------------- recalibration, ternary, decoding


def _recalibration(run: RunArtifacts) -> Section | None:
    if run.drift is None:
        return None
    d = run.drift
    section = Section("recalibration", SECTION_TITLES["recalibration"])
    section.text.append(f"New calibration {short(d.calibration)} against {short(d.previous) if d.previous else 'none'}"
                        f": {'promoted' if d.promote else 'kept the previous'} (reason: {d.reason}).")
    section.tables.append(Table("Drift", drift_rows(d), "threshold shift = new - old; exit rate and accuracy on "
                                "calibration tokens; held-out: the new threshold on eval tokens"))
    if d.failures:
        section.notes.append(f"{len(d.failures)} of {d.checked} held-out checks failed.")
    return section


def _ternary(run: RunArtifacts) -> Section | None:
    q, t_ev, f_ev = run.get("quantized"), run.metrics("ternary_evaluation"), run.metrics("evaluation")
    if q is None and t_ev is None:
        return None
    section = Section("ternary", SECTION_TITLES["ternary"])
    if q is not None and q.metrics.get("eval"):
        section.tables.append(Table("Per head", ternary_rows(q.metrics), "eval tokens; ms/token at batch 1 of the "
                                    "packed head vs its float32 copy"))
        per = layer_sorted(q.metrics["eval"])
        section.figures.append(Figure("Float vs ternary agreement", partial(
            plots.grouped_bars, [x for x, _ in per], {"float": [e.get("float_agreement") for _, e in per],
                                                      "ternary": [e.get("ternary_agreement") for _, e in per]},
            [plots.HEADS_COLOR, plots.TERNARY_COLOR], "agreement with the final layer", "float vs ternary heads")))
    if f_ev and t_ev:
        section.tables.append(Table("Cascade, float vs ternary", float_vs_ternary_cascade_rows(f_ev, t_ev),
                                    "each head set with its own calibration, on eval tokens"))
    elif t_ev:
        section.tables.append(Table("Ternary heads on eval tokens", head_rows(None, t_ev),
                                    "logit lens: the baseline; gain in percentage points"))
        section.tables.append(Table("Cascade, ternary heads", cascade_rows(t_ev, None), "eval tokens"))
    return section


def _decoding(run: RunArtifacts) -> Section | None:
    decodes = {label: m["decode"] for label, m in (("float", run.metrics("evaluation")),
                                                     ("ternary", run.metrics("ternary_evaluation")))
               if m and m.get("decode")}
    if not decodes:
        return None
    section = Section("decoding", SECTION_TITLES["decoding"])
    for label, d in decodes.items():
        best = next((s for s in d.get("settings", []) if s["name"] == d.get("best")), None)
        section.text.append(f"{label} heads: greedy {d.get('greedy_tokens_per_s', 0):.1f} tokens/s; " + (
            f"best self-speculative setting {best['name']}: {times(best['speedup'])}, acceptance "
            f"{pct(best['acceptance'])}, output identical to greedy." if best else
            "no self-speculative setting drafted a token with identical output."))
        section.tables.append(Table(f"{label.capitalize()} heads", decode_rows(d, label),
                                    f"{d.get('prompts')} prompts x {d.get('new_tokens')} new tokens on "
                                    f"{d.get('device')} ({d.get('dtype')}); acceptance: drafted tokens kept; "
                                    "τ: tokens per verification"))
        rows = [(s["name"] + ("" if s.get("drafted") else " (never drafted)"), s["speedup"])
                for s in d.get("settings", []) if s.get("speedup") is not None]
        if d.get("early_exit", {}).get("speedup") is not None:
            rows.append(("early exit", d["early_exit"]["speedup"]))
        if rows:
            section.figures.append(Figure(f"Speed-up, {label} heads", partial(
                plots.speedups, rows, f"{label} heads", d.get("best")), "in colour: the best setting that drafted "
                "tokens; a setting that never drafted is greedy plus the head's cost"))
    return section
