"""Per-stage summaries for the Prefect UI: a markdown text and a table for every stage's
manifest, rows with the same keys in reading order, the same columns as the HTML report."""

from __future__ import annotations

import pytest

from flows.stages.base import PRODUCED_BY, run_stage
from flows.stages.report import ReportStage
from reports.format import pct
from reports.stage_summary import stage_markdown, stage_table
from reports.tables import gate_rows, head_rows

FIRST_COLUMN = {"extract": "cache", "teacher_topk": "k", "train_heads": "head", "train_gates": "head",
                "calibrate": "head", "evaluate": "head", "quantize": "head", "recalibrate": "predictor",
                "report": "created"}
"""What each stage's table is about comes first, then its numbers."""


@pytest.mark.parametrize("name", ["train_cache", "teacher_topk", "heads", "gates", "calibration", "evaluation",
                                  "quantized", "ternary_calibration", "ternary_evaluation", "recalibrate"])
def test_every_stage_has_a_summary_and_a_table_in_reading_order(full_run, name):
    m = full_run.store.manifest(PRODUCED_BY[name], full_run.keys[name])
    text = stage_markdown(full_run.store, m)
    assert text.startswith(f"### {m.stage} `{m.key[:12]}`") and len(text.splitlines()) > 2
    rows = stage_table(full_run.store, m)
    assert rows and next(iter(rows[0])) == FIRST_COLUMN[m.stage]
    assert all(list(r) == list(rows[0]) for r in rows)
    assert all(isinstance(v, str) for r in rows for v in r.values())
    if next(iter(rows[0])) == "head":  # one row per head (per head and predictor for thresholds), heads in order
        heads = [int(r["head"]) for r in rows]
        assert heads == sorted(heads) or m.stage == "calibrate"


def test_head_tables_carry_the_manifest_numbers_under_the_reports_column_names(full_run):
    store, keys = full_run.store, full_run.keys
    heads = store.manifest("train_heads", keys["heads"])
    rows = stage_table(store, heads)
    assert rows == head_rows(heads.metrics)
    assert list(rows[0])[:3] == ["head", "agreement", "logit lens"]
    for row in rows:
        assert row["agreement"] == pct(heads.metrics["eval"][row["head"]]["agreement"])
        assert row["logit lens"] == pct(heads.metrics["logit_lens"][row["head"]]["agreement"])
        assert f"| {row['head']} | {row['agreement']} | {row['logit lens']} |" in stage_markdown(store, heads)
    gates = store.manifest("train_gates", keys["gates"])
    assert stage_table(store, gates) == gate_rows(gates.metrics)


def test_the_evaluate_summary_has_the_cascade_and_decoding(full_run):
    m = full_run.store.manifest("evaluate", full_run.keys["evaluation"])
    text = stage_markdown(full_run.store, m)
    assert "**Cascade**" in text and "**Decoding**" in text and "guarantees held" in text
    for c in m.metrics["cascade"]:
        assert pct(c["compute_saved"]) in text


def test_the_recalibrate_summary_is_the_drift_markdown_and_a_report_links_its_page(full_run):
    from reports.recalibration import recalibration_markdown
    from reports.run import load_drift_payload

    store, keys = full_run.store, full_run.keys
    m = store.manifest("recalibrate", keys["recalibrate"])
    assert recalibration_markdown(load_drift_payload(store, m.key)) in stage_markdown(store, m)
    report = store.manifest("report", run_stage(ReportStage(), full_run.ctx(), {"heads": keys["heads"]}))
    text = stage_markdown(store, report)
    assert "report.html" in text and "Heads agree with the final layer" in text
    assert [r["report"] for r in stage_table(store, report)] == [report.key[:12]]
