"""The recalibration outcome as markdown (drift.md, the Prefect UI's markdown artifact) and as
a table of plain rows (the UI's table artifact). Typed results in, text and rows out; flows
publish what this returns.

Both show the same columns in the same order, the `DriftRow` field order: predictor, head,
level, thresholds and their shift, exit rates, accuracies, then the held-out result.
"""

from __future__ import annotations

from dataclasses import asdict

from pipeline.recalibrate import DriftRow, RecalibrationOutcome

_MARKDOWN_COLUMNS: list[tuple[str, str]] = [
    ("predictor", "predictor"), ("head", "head"), ("level", "level"), ("old_threshold", "old thr"),
    ("new_threshold", "new thr"), ("shift", "shift"), ("old_exit_rate", "old exit"), ("new_exit_rate", "new exit"),
    ("exit_rate_change", "Δ exit"), ("old_accuracy", "old acc"), ("new_accuracy", "new acc"),
    ("accuracy_change", "Δ acc"), ("held_out_accuracy", "held-out acc"), ("held_out_held", "held"),
]
"""(DriftRow field, markdown header), in DriftRow order; the markdown leaves out the held-out
exit rate and the point-estimate `met` to stay readable (the table keeps them)."""

TABLE_DIGITS = 5
"""Floats in the UI table are rounded to this many digits."""


def _fmt(x: object) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "**no**"
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def _cell(row: DriftRow, name: str) -> str:
    value = getattr(row, name)
    return f"{value:g}" if name == "level" else _fmt(value)


def drift_rows(outcome: RecalibrationOutcome) -> list[dict[str, str]]:
    """The drift rows as formatted cells under the markdown's column names (the HTML report's table)."""
    return [{header: _cell(r, name) for name, header in _MARKDOWN_COLUMNS} for r in outcome.drift]


def drift_rows_table(outcome: RecalibrationOutcome) -> list[dict]:
    """The drift rows as plain dicts for a UI table: keys in `DriftRow` order (predictor, head,
    level, ...), floats rounded to `TABLE_DIGITS`."""
    return [{k: (round(v, TABLE_DIGITS) if isinstance(v, float) else v) for k, v in asdict(r).items()}
            for r in outcome.drift]


def recalibration_markdown(outcome: RecalibrationOutcome, *, overruled: str | None = None) -> str:
    """The decision, its reason and the drift table. `overruled`: why the promotion the outcome
    asked for did not happen after all (e.g. `current` moved meanwhile), shown first."""
    prev = outcome.previous
    lines = [f"**Not promoted:** {overruled}", ""] if overruled else []
    lines += [
        "# Recalibration",
        "",
        f"- new calibration: `{outcome.calibration}`",
        f"- previous (current): `{prev}`" if prev else "- previous: none",
        f"- decision: **{'promoted' if outcome.promote else 'kept the previous'}**",
        f"- reason: {outcome.reason}",
        "",
        "Threshold in score units (entropy: nats, exit when below; gate: exit probability, exit when above);",
        "shift = new - old. Exit rate and accuracy on calib tokens; held-out: the new threshold on eval tokens;",
        "held: the held-out accuracy is not significantly below the level (one-sided binomial test at the "
        "family-wise rule's per-check delta, delta / K; see the reason).",
        "",
        "| " + " | ".join(header for _, header in _MARKDOWN_COLUMNS) + " |",
        "|" + "---|" * len(_MARKDOWN_COLUMNS),
    ]
    for row in drift_rows(outcome):
        lines.append("| " + " | ".join(row.values()) + " |")
    return "\n".join(lines) + "\n"


def unchanged_markdown(reason: str) -> str:
    """What the UI shows when there was nothing to compare (the new calibration is the current one)."""
    return f"# Recalibration\n\n{reason}\n"

