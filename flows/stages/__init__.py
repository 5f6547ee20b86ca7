"""The stages of the DAG, one module each, in DAG order; see :mod:`flows.stages.base` for the
shape they share and :func:`flows.stages.base.run_stage` for the routine that runs them."""

from __future__ import annotations

from flows.stages.base import Stage
from flows.stages.calibrate import CalibrateStage
from flows.stages.evaluate import EvaluateStage
from flows.stages.extract import ExtractStage
from flows.stages.quantize import QuantizeStage
from flows.stages.recalibrate import RecalibrateStage
from flows.stages.report import ReportStage
from flows.stages.teacher import TeacherStage
from flows.stages.teacher_topk import TeacherTopkStage
from flows.stages.train_gates import TrainGatesStage
from flows.stages.train_heads import TrainHeadsStage

STAGES: dict[str, type[Stage]] = {
    cls.name: cls
    for cls in (TeacherStage, ExtractStage, TeacherTopkStage, TrainHeadsStage, TrainGatesStage, CalibrateStage, QuantizeStage,
                EvaluateStage, RecalibrateStage, ReportStage)
}
"""Every registered stage by name, in DAG order."""


def make_stage(name: str, **params) -> Stage:
    """An instance of the stage called `name` (``params``: e.g. the split of ``extract``)."""
    try:
        return STAGES[name](**params)
    except KeyError:
        raise ValueError(f"no stage named {name!r}; the stages are {', '.join(STAGES)}") from None
