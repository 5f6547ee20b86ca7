"""report: a readable account of one flow run: ``report.html`` (self-contained, every plot
embedded), ``summary.md`` and ``metrics.json``; the manifest carries the headline numbers.

Its inputs are the named artifacts of a run (any of `reports.run.REPORT_INPUTS`: the caches,
heads, gates, calibrations, evaluations, the quantized heads, a recalibration and the
calibration it replaced); each section of the report is there only when its artifact is.
Content key: those input keys and the code version, so the same run reports once. The flow
that builds a report refreshes the index of every report (`reports.index.write_index`).
"""

from __future__ import annotations

from pathlib import Path

from flows.stages.base import (
    PRODUCED_BY,
    Built,
    InputMismatch,
    Plan,
    Stage,
    StageContext,
)
from reports.run import REPORT_INPUTS, UnknownReportInput, check_report_inputs, load_run

REPORT_CODE_VERSION = "report-1"


class ReportStage(Stage):
    name = "report"
    code_version = REPORT_CODE_VERSION
    inputs = tuple(f"{name}?" for name in REPORT_INPUTS)

    def plan(self, ctx: StageContext, inputs: dict[str, str | None]) -> Plan:
        try:
            present = check_report_inputs(inputs)
        except UnknownReportInput as e:
            raise InputMismatch(str(e)) from None
        return self.make_plan({}, present)

    def build(self, ctx: StageContext, plan: Plan, staging: Path) -> Built:
        from reports.report import write_report  # imports matplotlib (a second); a cache hit draws nothing

        run = load_run(ctx.store, plan.inputs, PRODUCED_BY)
        rendered = write_report(run, staging)
        return Built(metrics=rendered.headline)
