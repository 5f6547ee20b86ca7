"""The report's plots, drawn with matplotlib's Agg canvas into PNG bytes (no pyplot, so no
global figure state and no display). Each function takes plain numbers and returns one PNG;
the report embeds it as a data: URI, so the page opens offline."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

DPI = 110
PANEL = (3.6, 3.0)
"""Inches per panel of a multi-panel figure."""
HEADS_COLOR, LENS_COLOR, GATE_COLOR, TERNARY_COLOR = "#1f77b4", "#9a9a9a", "#d62728", "#2ca02c"


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _panels(n: int, cols: int = 4, size: tuple[float, float] = PANEL) -> tuple[Figure, list]:
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(size[0] * cols, size[1] * rows))
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    return fig, axes


def _percent_axis(ax, axis: str = "y") -> None:
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(PercentFormatter(1.0, decimals=None))


def _bar_labels(ax, bars, values: Sequence[float | None]) -> None:
    for bar, v in zip(bars, values):
        if v is not None:
            ax.annotate(f"{100 * v:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")


def grouped_bars(layers: Sequence[int], series: dict[str, Sequence[float | None]], colors: Sequence[str],
                 ylabel: str, title: str) -> bytes:
    """Shares per head layer, one bar per series (heads vs the logit lens; float vs ternary)."""
    fig = Figure(figsize=(max(5.0, 1.2 * len(layers) + 2), 3.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(series))
    for i, ((label, values), color) in enumerate(zip(series.items(), colors)):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(layers))]
        bars = ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=label, color=color)
        _bar_labels(ax, bars, values)
    ax.set_xticks(range(len(layers)), [f"layer {x}" for x in layers])
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.08 * max([v for vs in series.values() for v in vs if v is not None] + [0.01]))
    _percent_axis(ax)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def training_curves(loss: dict[str, tuple[Sequence[float], Sequence[float]]], loss_xlabel: str,
                    per_head: dict[int, tuple[Sequence[float], Sequence[float]]], per_head_label: str,
                    percent: bool, epoch_ends: Sequence[float] = ()) -> bytes:
    """Left: the training loss (per step when recorded, else per epoch; `epoch_ends`: the steps
    where epochs end, marked); right: a per-head number after each epoch (probe agreement, or
    held-out gate AUROC)."""
    fig, (left, right) = _panels(2, cols=2)
    for x in epoch_ends:
        left.axvline(x, color=LENS_COLOR, linestyle=":", linewidth=1)
    for label, (xs, ys) in loss.items():
        left.plot(xs, ys, marker="o" if len(xs) <= 12 else None, markersize=4, label=label)
    left.set_xlabel(loss_xlabel)
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_ylabel("training loss")
    left.grid(alpha=0.3)
    if len(loss) > 1:
        left.legend(fontsize=8, frameon=False)
    for layer, (xs, ys) in per_head.items():
        right.plot(xs, ys, marker="o", markersize=4, label=f"head {layer}")
    right.set_xlabel("epoch")
    right.set_ylabel(per_head_label)
    if percent:
        _percent_axis(right)
    right.grid(alpha=0.3)
    if per_head:
        right.legend(fontsize=7, frameon=False)
        right.set_xticks(sorted({x for xs, _ in per_head.values() for x in xs}))
    return _png(fig)


def roc_curves(curves: dict[int, dict[str, tuple[Sequence[float], Sequence[float], float | None]]]) -> bytes:
    """One panel per head: ROC curves (fpr, tpr, AUROC) of each predictor of "the head agrees"."""
    fig, axes = _panels(len(curves), size=(3.2, 3.3))
    colors = {"-entropy": HEADS_COLOR, "gate p_exit": GATE_COLOR}
    for ax, (layer, by_predictor) in zip(axes, curves.items()):
        ax.plot([0, 1], [0, 1], color=LENS_COLOR, linestyle=":", linewidth=1)
        for name, (fpr, tpr, area) in by_predictor.items():
            label = name if area is None else f"{name} (AUROC {area:.3f})"
            ax.plot(fpr, tpr, label=label, color=colors.get(name))
        ax.set_title(f"head {layer}", fontsize=10)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.legend(fontsize=7, frameon=False, loc="lower right")
        ax.grid(alpha=0.3)
    return _png(fig)


def accuracy_by_entropy(bins: dict[int, tuple[Sequence[float], Sequence[float | None]]],
                        thresholds: dict[int, list[tuple[float, float | None]]], ylabel: str) -> bytes:
    """One panel per head: the share right in each entropy bin (x: the bin's mean entropy), and
    each level's calibrated entropy threshold as a vertical line (tokens left of it exit)."""
    fig, axes = _panels(len(bins))
    levels = sorted({lv for ts in thresholds.values() for lv, _ in ts})
    palette = ["#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    color = {lv: palette[i % len(palette)] for i, lv in enumerate(levels)}
    for ax, (layer, (centres, right)) in zip(axes, bins.items()):
        pts = [(c, r) for c, r in zip(centres, right) if r is not None]
        ax.plot([c for c, _ in pts], [r for _, r in pts], marker="o", markersize=3, color=HEADS_COLOR)
        for lv, t in thresholds.get(layer, []):
            if t is not None and math.isfinite(t):
                ax.axvline(t, color=color[lv], linestyle="--", linewidth=1, label=f"level {lv:g}")
        ax.set_title(f"head {layer}", fontsize=10)
        ax.set_xlabel("entropy (nats)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1.02)
        _percent_axis(ax)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, frameon=False, title="threshold", title_fontsize=7)
    return _png(fig)


def heatmaps(panels: dict[str, tuple[list[str], list[str], list[list[float | None]]]], title: str) -> bytes:
    """One heatmap per panel (rows, columns, shares), each cell labelled with its percentage."""
    fig, axes = _panels(len(panels), cols=2)
    for ax, (name, (rows, cols, values)) in zip(axes, panels.items()):
        data = [[float("nan") if v is None else v for v in row] for row in values]
        im = ax.imshow(data, cmap="Blues", vmin=0.0, vmax=max([v for row in values for v in row if v] + [0.01]),
                       aspect="auto")
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                if v is not None:
                    ax.text(j, i, f"{100 * v:.1f}", ha="center", va="center", fontsize=7,
                            color="white" if v > 0.6 * im.get_clim()[1] else "black")
        ax.set_xticks(range(len(cols)), cols, fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set_xlabel("target level")
        ax.set_title(f"{title}: {name}", fontsize=10)
    return _png(fig)


def cascade_bars(panels: dict[str, list[tuple[str, dict[int, float], float | None]]]) -> bytes:
    """One panel per predictor: per level, a stacked bar of where tokens leave (each head, then
    the final layer), labelled with the share of layer compute saved."""
    fig, axes = _panels(len(panels), cols=2, size=(5.0, 3.4))
    for ax, (name, bars) in zip(axes, panels.items()):
        layers = sorted({layer for _, rates, _ in bars for layer in rates})
        bottoms = [0.0] * len(bars)
        for k, layer in enumerate(layers):
            heights = [rates.get(layer, 0.0) for _, rates, _ in bars]
            ax.bar(range(len(bars)), heights, bottom=bottoms, label="final layer" if k == len(layers) - 1 else
                   f"head {layer}", color=LENS_COLOR if k == len(layers) - 1 else None)
            bottoms = [b + h for b, h in zip(bottoms, heights)]
        for i, (_, _, saved) in enumerate(bars):
            if saved is not None:
                ax.annotate(f"{100 * saved:.1f}%", (i, 1.0), ha="center", va="bottom", fontsize=7,
                            xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(bars)), [label for label, _, _ in bars], fontsize=8)
        ax.set_xlabel("target level")
        ax.set_ylabel("share of tokens leaving at")
        ax.set_ylim(0, 1.12)
        _percent_axis(ax)
        ax.set_title(f"cascade, {name} (above the bars: layer compute saved)", fontsize=9)
        ax.legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _png(fig)


def speedups(rows: list[tuple[str, float]], title: str, best: str | None = None) -> bytes:
    """Horizontal bars of speed-up over greedy decoding, with 1x marked and the `best` setting
    (one that drafted, with output identical to greedy) in colour."""
    fig = Figure(figsize=(7.0, 0.35 * len(rows) + 1.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ys = list(range(len(rows)))[::-1]
    colors = [HEADS_COLOR if name == best else LENS_COLOR for name, _ in rows]
    ax.barh(ys, [v for _, v in rows], color=colors)
    for y, (_, v) in zip(ys, rows):
        ax.annotate(f"{v:.2f}x", (v, y), va="center", fontsize=7, xytext=(2, 0), textcoords="offset points")
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(ys, [name for name, _ in rows], fontsize=8)
    ax.set_xlabel("speed-up over greedy decoding")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)
