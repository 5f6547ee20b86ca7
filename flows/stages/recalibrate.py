"""recalibrate: the drift of a new calibration against the one in service, and whether to
promote it under a family-wise rule (``drift.json`` with the rule, and ``drift.md`` for people).

Content key: the two calibrations and the code version. Moving the `current` pointer is the
flow's business (:mod:`flows.recalibrate`), not the stage's: an artifact never changes state.
"""

from __future__ import annotations

import json
from pathlib import Path

from flows.stages.base import Built, Plan, Stage, StageContext
from flows.stages.calibrate import load_calibration
from pipeline.recalibrate import RECALIBRATE_CODE_VERSION, RecalibrationOutcome, compare_calibrations
from reports.recalibration import recalibration_markdown
from stores.artifacts import ArtifactStore
from stores.files import write_atomic, write_json_atomic

DRIFT_JSON = "drift.json"
DRIFT_MD = "drift.md"


class RecalibrateStage(Stage):
    name = "recalibrate"
    code_version = RECALIBRATE_CODE_VERSION
    inputs = ("calibration", "previous?")

    def plan(self, ctx: StageContext, inputs: dict[str, str | None]) -> Plan:
        return self.make_plan({}, {"calibration": inputs["calibration"], "previous": inputs.get("previous")})

    def build(self, ctx: StageContext, plan: Plan, staging: Path) -> Built:
        new = load_calibration(ctx.store, plan.inputs["calibration"])
        old = load_calibration(ctx.store, plan.inputs["previous"]) if "previous" in plan.inputs else None
        outcome = compare_calibrations(new, old, new_key=plan.inputs["calibration"], old_key=plan.inputs.get("previous"))
        write_json_atomic(staging / DRIFT_JSON, outcome.to_dict())
        write_atomic(staging / DRIFT_MD, recalibration_markdown(outcome).encode())
        rule = outcome.rule
        return Built(metrics={"promote": outcome.promote, "failed": len(outcome.failures),
                              "checked": outcome.checked, "rows": len(outcome.drift),
                              "family_delta": rule.delta, "per_check_delta": rule.per_check_delta},
                     extra={"reason": outcome.reason, "rule": rule.describe()})


def load_outcome(store: ArtifactStore, key: str) -> RecalibrationOutcome:
    store.manifest(RecalibrateStage.name, key)  # a clear error when it is gone
    return RecalibrationOutcome.from_dict(json.loads((store.path(RecalibrateStage.name, key) / DRIFT_JSON).read_text()))
