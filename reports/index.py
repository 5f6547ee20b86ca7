"""The index of every report under an artifact root: ``<root>/reports/index.html``, newest
first, each row linking to its report by a relative path, so the root can be copied or served
as a folder and the links still work. On a remote root (a URL) the index is written in the
local mirror, beside the downloaded copies of the reports it links to."""

from __future__ import annotations

import html
from datetime import datetime
from pathlib import Path

from reports.format import (
    MISSING,
    Rows,
    html_table,
    layer_sorted,
    level,
    pct,
    points,
    short,
    times,
)
from reports.html import STYLE
from reports.run import REPORT_HTML
from stores.artifacts import ArtifactStore, Manifest
from stores.files import write_atomic

REPORT_STAGE = "report"
INDEX_DIR = "reports"
INDEX_HTML = "index.html"


def report_html_path(store: ArtifactStore, key: str) -> Path:
    """Where the report artifact `key` keeps its page."""
    return store.path(REPORT_STAGE, key) / REPORT_HTML


def _created(m: Manifest, store: ArtifactStore) -> tuple[float, int]:
    """Sort key: the manifest's creation time, then its file's mtime (two reports in one second)."""
    try:
        when = datetime.strptime(m.created, "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except (TypeError, ValueError):
        when = 0.0
    mtime = (store.path(REPORT_STAGE, m.key) / "manifest.json").stat().st_mtime_ns
    return when, mtime


def report_manifests(store: ArtifactStore) -> list[Manifest]:
    """Every report artifact under the root, newest first."""
    found = list(store.iter_manifests(REPORT_STAGE))
    return sorted(found, key=lambda m: _created(m, store), reverse=True)


def latest_report(store: ArtifactStore) -> str | None:
    """The key of the newest report, None when there is none."""
    reports = report_manifests(store)
    return reports[0].key if reports else None


def index_rows(store: ArtifactStore, manifests: list[Manifest] | None = None) -> Rows:
    """One row per report, newest first: when, which run (inputs, backbone) and its headline numbers."""
    rows = []
    for m in report_manifests(store) if manifests is None else manifests:
        h = m.metrics
        saved = MISSING
        if "compute_saved" in h:
            at = h.get("compute_saved_at", {})
            saved = f"{pct(h['compute_saved'])} ({at.get('predictor', '?')} at {level(at.get('level'))})"
        rows.append({
            "created": m.created, "report": short(m.key), "backbone": str(h.get("model", MISSING)),
            "inputs": ", ".join(m.inputs),
            "agreement per head": ", ".join(f"{k}: {pct(v)}" for k, v in layer_sorted(h.get("agreement", {})))
            or MISSING,
            "compute saved": saved,
            "guarantees held": f"{h['guarantees_held']} of {h['guarantees_checked']}" if "guarantees_checked" in h
            else MISSING,
            "decoding speed-up": times(h.get("decode_speedup")),
            "ternary vs float": points(h.get("ternary_agreement_change")),
            "recalibration": MISSING if "promoted" not in h else ("promoted" if h["promoted"] else "kept"),
        })
    return rows


def write_index(store: ArtifactStore) -> Path:
    """Write ``<root>/reports/index.html`` listing every report, newest first, each linked by a
    path relative to the index (``../artifacts/report/<key>/report.html``); returns its path."""
    manifests = report_manifests(store)
    rows = index_rows(store, manifests)
    links = [{"report": f"../artifacts/{REPORT_STAGE}/{m.key}/{REPORT_HTML}"} for m in manifests]
    table = html_table(rows, links) if rows else "<p>No reports yet.</p>"
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>exitflow reports</title>
<style>{STYLE}</style>
</head>
<body>
<h1>exitflow reports</h1>
<p class="sub">{len(rows)} report{'' if len(rows) == 1 else 's'} under {html.escape(store.location)}, newest first</p>
<div class="tablewrap">{table}</div>
</body>
</html>
"""
    path = store.root / INDEX_DIR / INDEX_HTML
    write_atomic(path, page.encode())
    return path
