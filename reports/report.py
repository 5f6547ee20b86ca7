"""A run's report as files: ``report.html`` (the page with plots), ``summary.md`` (the same
sections as markdown) and ``metrics.json`` (the key numbers as plain JSON)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from reports.html import render_html
from reports.run import METRICS_JSON, REPORT_HTML, SUMMARY_MD, RunArtifacts
from reports.sections import build_sections
from reports.summary import headline, key_metrics, render_markdown
from stores.files import write_atomic


@dataclass(frozen=True)
class RenderedReport:
    html: str
    markdown: str
    metrics: dict
    """metrics.json: `reports.summary.key_metrics`."""
    headline: dict
    """The few numbers the report artifact's manifest carries (`reports.summary.headline`)."""


def render_report(run: RunArtifacts) -> RenderedReport:
    sections = build_sections(run)
    metrics = key_metrics(run, sections)
    evaluation = run.get("evaluation")
    head = headline(metrics, evaluation.extra.get("draft_level") if evaluation else None)
    return RenderedReport(html=render_html(run, sections, head), markdown=render_markdown(run, sections, head),
                          metrics=metrics, headline=head)


def write_report(run: RunArtifacts, folder: Path) -> RenderedReport:
    """Render the report of `run` into `folder` (each file written atomically)."""
    rendered = render_report(run)
    rendered = RenderedReport(rendered.html, rendered.markdown, plain(rendered.metrics), plain(rendered.headline))
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / REPORT_HTML, rendered.html.encode())
    write_atomic(folder / SUMMARY_MD, rendered.markdown.encode())
    write_atomic(folder / METRICS_JSON, json.dumps(rendered.metrics, indent=1, allow_nan=False).encode())
    return rendered


def plain(x: object) -> object:
    """`x` with non-finite floats as None (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
