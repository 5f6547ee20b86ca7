"""The evaluate stage's metrics as a few lines a person reads at the end of a run (the full
report with plots builds on the same metrics)."""

from __future__ import annotations


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _num(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def evaluation_summary(metrics: dict) -> str:
    """Per head: agreement with the final layer against the logit lens; the cascade's layer
    compute saved at each guaranteed level; how many guarantees held on eval tokens; and the
    best self-speculative decoding setting (metrics: an evaluate manifest's ``metrics``)."""
    lines = ["head  agreement  (logit lens)  top-5   KL to teacher"]
    for layer, h in sorted(metrics["heads"].items(), key=lambda kv: int(kv[0])):
        lens = metrics["lens"][layer]
        lines.append(f"{layer:>4}  {_pct(h['agreement']):>9}  ({_pct(lens['agreement']):>10})  "
                     f"{_pct(h['top5_agreement']):>6}  {_num(h['kl_from_teacher'], 3)}")
    saved = [f"{c['predictor']} {c['level']:g}: {_pct(c['compute_saved'])}" for c in metrics["cascade"]]
    lines.append("cascade, layer compute saved on eval tokens: " + ", ".join(saved))
    held = sum(bool(g["held"]) for g in metrics["guarantees"])
    lines.append(f"guarantees held on eval tokens: {held} of {len(metrics['guarantees'])}")
    gates = sorted((metrics.get("gates") or {}).items(), key=lambda kv: int(kv[0]))
    if gates:
        lines.append("gate AUROC vs entropy AUROC per head: " + ", ".join(
            f"{layer} {_num(g['gate_auroc'], 3)} vs {_num(g['entropy_auroc'], 3)}" for layer, g in gates))
    by_level: dict[float, list[str]] = {}
    for d in metrics.get("deployed") or []:
        rates = "/".join(_pct(r) for r in d["exit_rates"].values())
        by_level.setdefault(d["level"], []).append(f"{d['head']} {rates} -> {d['predictor']}")
    for lvl, cells in sorted(by_level.items()):
        names = "/".join(next(iter(metrics["deployed"]))["exit_rates"])
        lines.append(f"level {lvl:g}, exit rate ({names}) per head and the deployed predictor: " + ", ".join(cells))
    decode = metrics.get("decode")
    if decode:
        best = next((s for s in decode["settings"] if s["name"] == decode.get("best")), None)
        greedy = decode.get("greedy_tokens_per_s")
        if not best:
            lines.append(f"decoding: greedy {greedy:.1f} tokens/s; no self-speculative setting drafted a token with "
                         "identical output (calibrated thresholds too strict for these heads)")
        else:
            lines.append(f"decoding: greedy {greedy:.1f} tokens/s; best self-speculative {best['name']}: "
                         f"{best['tokens_per_s']:.1f} tokens/s ({best['speedup']:.2f}x), acceptance "
                         f"{_num(best['acceptance'])}, tau {_num(best['tau'])}, output identical to greedy")
    return "\n".join(lines)
