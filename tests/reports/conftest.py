"""A whole run on the tiny random Llama, once per session: every artifact a report can read
(caches, teacher top-k, heads, gates, calibration, evaluation with decoding, ternary heads
with their calibration and evaluation, and a recalibration against an earlier calibration)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from flows.stages.base import StageContext, run_stage
from flows.stages.calibrate import CalibrateStage
from flows.stages.evaluate import EvaluateStage
from flows.stages.extract import ExtractStage
from flows.stages.quantize import QuantizeStage
from flows.stages.recalibrate import RecalibrateStage
from flows.stages.teacher_topk import TeacherTopkStage
from flows.stages.train_gates import TrainGatesStage
from flows.stages.train_heads import TrainHeadsStage
from pipeline.config import Config, load_config
from stores.artifacts import ArtifactStore


@dataclass(frozen=True)
class Run:
    cfg: Config
    store: ArtifactStore
    keys: dict[str, str]
    """The run's artifacts under the names a flow gives them (`reports.run.REPORT_INPUTS`)."""

    def ctx(self) -> StageContext:
        return StageContext(self.cfg, self.store, progress=False)


def tiny_config(model_dir, corpus, *extra: str) -> Config:
    return load_config(None, [
        f"model.source={model_dir}", f"data.source={corpus}", "data.seq_len=32",
        "data.fractions={train: 0.5, calib: 0.3, eval: 0.2}",
        "extract.layers=[1,2,3]", "extract.chunk_tokens=256", "extract.max_tokens=4096",
        "heads.epochs=2", "heads.batch_tokens=256", "heads.warmup_steps=2", "heads.negatives=64", "heads.topk=16",
        "gates.epochs=1", "gates.batch_tokens=256", "gates.warmup_steps=2",
        "calibrate.levels=[0.5, 0.8]",
        "evaluate.prompts=2", "evaluate.prompt_tokens=16", "evaluate.new_tokens=8", "evaluate.draft_lens=[2]",
        "evaluate.draft_vocab=64",
        "quantize.epochs=1", "quantize.batch_tokens=256", "quantize.warmup_steps=2", *extra,
    ])


@pytest.fixture(scope="session")
def full_run(tmp_path_factory, tiny_model_dir, corpus_dir) -> Run:
    store = ArtifactStore(tmp_path_factory.mktemp("report-root"))
    cfg = tiny_config(tiny_model_dir, corpus_dir)
    ctx = StageContext(cfg, store, progress=False)
    keys = {f"{s}_cache": run_stage(ExtractStage(s), ctx, {}) for s in ("train", "calib", "eval")}
    keys["teacher_topk"] = run_stage(TeacherTopkStage(), ctx, {"cache": keys["train_cache"]})
    keys["heads"] = run_stage(TrainHeadsStage(), ctx, {"cache": keys["train_cache"], "teacher_topk": keys["teacher_topk"],
                                                       "eval_cache": keys["eval_cache"]})
    keys["gates"] = run_stage(TrainGatesStage(), ctx, {"cache": keys["train_cache"], "heads": keys["heads"],
                                                       "eval_cache": keys["eval_cache"]})
    calibrate = {"calib_cache": keys["calib_cache"], "heads": keys["heads"], "gates": keys["gates"],
                 "eval_cache": keys["eval_cache"]}
    keys["calibration"] = run_stage(CalibrateStage(), ctx, calibrate)
    keys["evaluation"] = run_stage(EvaluateStage(), ctx, {
        "eval_cache": keys["eval_cache"], "heads": keys["heads"], "gates": keys["gates"],
        "calibration": keys["calibration"], "teacher_topk": keys["teacher_topk"]})
    keys["quantized"] = run_stage(QuantizeStage(), ctx, {
        "cache": keys["train_cache"], "heads": keys["heads"], "gates": keys["gates"],
        "teacher_topk": keys["teacher_topk"], "eval_cache": keys["eval_cache"]})
    keys["ternary_calibration"] = run_stage(CalibrateStage(), ctx, {
        "calib_cache": keys["calib_cache"], "quantized": keys["quantized"], "eval_cache": keys["eval_cache"]})
    no_decode = StageContext(tiny_config(tiny_model_dir, corpus_dir, "evaluate.decode=false"), store, progress=False)
    keys["ternary_evaluation"] = run_stage(EvaluateStage(), no_decode, {
        "eval_cache": keys["eval_cache"], "quantized": keys["quantized"],
        "calibration": keys["ternary_calibration"]})
    earlier = StageContext(tiny_config(tiny_model_dir, corpus_dir, "calibrate.delta=0.3"), store, progress=False)
    keys["previous"] = run_stage(CalibrateStage(), earlier, calibrate)
    keys["recalibrate"] = run_stage(RecalibrateStage(), ctx, {"calibration": keys["calibration"],
                                                              "previous": keys["previous"]})
    return Run(cfg, store, keys)
