"""The report stage as a stage: keyed on its input keys (a hit for the same run, a new key when
an input changes), refusing unknown or missing inputs before any work, registered with the rest."""

from __future__ import annotations

import pytest

from flows.stages import STAGES
from flows.stages.base import PRODUCED_BY, InputMismatch, StageContext, run_stage
from flows.stages.extract import ExtractStage
from flows.stages.report import ReportStage
from flows.stages.train_heads import TrainHeadsStage
from pipeline.config import load_config
from stores.artifacts import ArtifactNotFound, ArtifactStore


def _cfg(model_dir, corpus, *extra):
    return load_config(None, [
        f"model.source={model_dir}", f"data.source={corpus}", "data.seq_len=32",
        "data.fractions={train: 0.5, calib: 0.1, eval: 0.4}", "extract.layers=[1,2]", "extract.chunk_tokens=256",
        "extract.max_tokens=2048", "heads.epochs=1", "heads.batch_tokens=256", "heads.warmup_steps=1",
        "heads.efficient_loss=false", *extra])


@pytest.fixture(scope="module")
def small(tmp_path_factory, tiny_model_dir, corpus_dir):
    store = ArtifactStore(tmp_path_factory.mktemp("root"))
    ctx = StageContext(_cfg(tiny_model_dir, corpus_dir), store, progress=False)
    keys = {f"{s}_cache": run_stage(ExtractStage(s), ctx, {}) for s in ("train", "eval")}
    keys["heads"] = run_stage(TrainHeadsStage(), ctx, {"cache": keys["train_cache"], "eval_cache": keys["eval_cache"]})
    other = StageContext(_cfg(tiny_model_dir, corpus_dir, "heads.lr=0.002"), store, progress=False)
    other_heads = run_stage(TrainHeadsStage(), other, {"cache": keys["train_cache"], "eval_cache": keys["eval_cache"]})
    return ctx, keys, other_heads


def test_the_report_is_registered_and_its_inputs_have_producers():
    assert STAGES["report"] is ReportStage
    assert PRODUCED_BY["report"] == "report" and PRODUCED_BY["recalibrate"] == "recalibrate"
    assert all(PRODUCED_BY[name.rstrip("?")] for name in ReportStage.inputs)


def test_same_inputs_are_a_hit_and_a_changed_input_is_a_new_report(small):
    ctx, keys, other_heads = small
    key = run_stage(ReportStage(), ctx, keys)
    manifest = ctx.store.path("report", key) / "manifest.json"
    before = manifest.stat().st_mtime_ns
    assert run_stage(ReportStage(), ctx, dict(reversed(keys.items()))) == key  # order does not matter
    assert manifest.stat().st_mtime_ns == before  # a hit rebuilds nothing
    m = ctx.store.manifest("report", key)
    assert m.inputs == keys and m.config == {}
    assert set(m.metrics["agreement"]) == {"1", "2"} and m.metrics["sections"] == ["run", "caches", "heads"]
    changed = ReportStage().plan(ctx, {**keys, "heads": other_heads}).key
    fewer = ReportStage().plan(ctx, {"heads": keys["heads"]}).key
    assert len({key, changed, fewer}) == 3
    assert ReportStage().plan(ctx, {**keys, "gates": None}).key == key  # an absent optional input is no input


def test_unknown_missing_and_absent_inputs_are_refused_before_any_work(small):
    ctx, keys, _ = small
    with pytest.raises(InputMismatch, match=r"not \['cache'\]"):
        ReportStage().plan(ctx, {"cache": keys["train_cache"]})
    with pytest.raises(InputMismatch, match="at least one artifact key"):
        ReportStage().plan(ctx, {"heads": None})
    with pytest.raises(ArtifactNotFound, match="recalibrate"):
        run_stage(ReportStage(), ctx, {"recalibrate": "0" * 64})
    assert not (ctx.store.root / "staging" / "report").exists() or not any((ctx.store.root / "staging" / "report")
                                                                           .iterdir())
