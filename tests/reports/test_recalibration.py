"""The recalibration report: markdown and UI table share the column order, and the head column
is called "head" in both."""

from __future__ import annotations

from dataclasses import fields

from pipeline.calibrate import HeldOutCheck
from pipeline.recalibrate import DriftRow, RecalibrationOutcome
from reports.recalibration import _MARKDOWN_COLUMNS, drift_rows_table, recalibration_markdown, unchanged_markdown


def _row(head: int, level: float, held: bool | None = True, old: float | None = 1.25) -> DriftRow:
    return DriftRow(predictor="entropy", head=head, level=level, old_threshold=old, new_threshold=1.0,
                    shift=None if old is None else 1.0 - old, old_exit_rate=0.5, new_exit_rate=0.4,
                    exit_rate_change=-0.1, old_accuracy=0.91, new_accuracy=0.92, accuracy_change=0.01,
                    held_out_accuracy=0.905123456, held_out_exit_rate=0.41, held_out_met=True, held_out_held=held)


def _failure() -> HeldOutCheck:
    return HeldOutCheck(level=0.9, threshold=1.0, n=1000, n_exited=400, exit_rate=0.4, accuracy=0.85, met=False,
                        p_below=1e-5, held=False, calib_exit_rate=0.4, calib_accuracy=0.92, predictor="entropy", head=8)


def _outcome(promote: bool = True, previous: str | None = "a" * 64) -> RecalibrationOutcome:
    return RecalibrationOutcome(calibration="b" * 64, previous=previous, promote=promote, reason="because",
                                failures=[] if promote else [_failure()],
                                drift=[_row(4, 0.8), _row(8, 0.9, held=False, old=None)], held_out=[])


def test_table_rows_have_the_drift_row_columns_in_order():
    table = drift_rows_table(_outcome())
    assert [list(r) for r in table] == [[f.name for f in fields(DriftRow)]] * 2
    assert list(table[0])[:6] == ["predictor", "head", "level", "old_threshold", "new_threshold", "shift"]
    assert "layer" not in table[0]
    assert table[0]["head"] == 4 and table[0]["held_out_accuracy"] == 0.90512  # rounded for the UI
    assert table[1]["old_threshold"] is None and table[1]["held_out_held"] is False


def test_markdown_columns_follow_the_table_order():
    order = [f.name for f in fields(DriftRow)]
    names = [name for name, _ in _MARKDOWN_COLUMNS]
    assert all(n in order for n in names) and names == sorted(names, key=order.index)


def test_markdown_shows_decision_reason_and_rows():
    md = recalibration_markdown(_outcome())
    lines = md.splitlines()
    assert lines[0] == "# Recalibration" and "- decision: **promoted**" in lines and "- reason: because" in lines
    assert f"- previous (current): `{'a' * 64}`" in lines
    header = next(line for line in lines if line.startswith("| predictor"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells[:6] == ["predictor", "head", "level", "old thr", "new thr", "shift"] and cells[-1] == "held"
    rows = [line for line in lines if line.startswith("| entropy")]
    assert rows[0] == ("| entropy | 4 | 0.8 | 1.2500 | 1.0000 | -0.2500 | 0.5000 | 0.4000 | -0.1000 | 0.9100 | 0.9200 "
                       "| 0.0100 | 0.9051 | yes |")
    assert rows[1].startswith("| entropy | 8 | 0.9 | – | 1.0000 | – |") and rows[1].endswith("| **no** |")
    assert len(header.split("|")) == len(rows[0].split("|"))


def test_markdown_of_a_rejection_and_an_overruled_promotion():
    md = recalibration_markdown(_outcome(promote=False, previous=None))
    assert "- decision: **kept the previous**" in md and "- previous: none" in md
    over = recalibration_markdown(_outcome(), overruled="current moved")
    assert over.startswith("**Not promoted:** current moved\n\n# Recalibration")
    assert unchanged_markdown("same data") == "# Recalibration\n\nsame data\n"
