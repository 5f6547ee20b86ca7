"""The teacher_topk stage on the tiny model: values equal torch.topk of the teacher's logits on
the cached final states, and the artifact is content-addressed (a second call does no work;
another k or another cache is another artifact)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import flows.stages.teacher_topk
from flows.stages.base import StageContext, run_stage
from flows.stages.extract import ExtractStage, load_teacher, open_cache
from flows.stages.teacher_topk import TeacherTopkStage, open_topk
from pipeline.config import load_config
from stores.artifacts import ArtifactNotFound, ArtifactStore


def run_teacher_topk(cfg, store, cache_key):
    return run_stage(TeacherTopkStage(), StageContext(cfg, store), {"cache": cache_key})


def plan_teacher_topk(cfg, store, cache_key):
    return TeacherTopkStage().plan(StageContext(cfg, store), {"cache": cache_key})


def _cfg(model_dir: Path, corpus: Path, *extra: str):
    return load_config(None, [
        f"model.source={model_dir}", f"data.source={corpus}", "data.seq_len=32",
        "extract.layers=[1,2,3]", "extract.batch_size=4", "extract.chunk_tokens=256",
        "data.fractions={train: 0.6, calib: 0.2, eval: 0.2}", "extract.max_tokens=2048", *extra,
    ])


def _no_work(*args, **kwargs):
    raise AssertionError("the stage recomputed an artifact that already exists")


def test_teacher_topk_stage_values_and_content_key(tmp_path, tiny_model_dir, corpus_dir, monkeypatch):
    store = ArtifactStore(tmp_path)
    cfg = _cfg(tiny_model_dir, corpus_dir, "heads.topk=8")
    cache_key = run_stage(ExtractStage("train"), StageContext(cfg, store), {})
    key = run_teacher_topk(cfg, store, cache_key)
    assert key == plan_teacher_topk(cfg, store, cache_key).key

    reader = open_cache(store, cache_key)
    teacher = load_teacher(store, cache_key)
    logits = teacher.logits(torch.from_numpy(reader.hidden("final")))  # [N, V]
    values, ids = logits.topk(8, dim=-1)
    topk = open_topk(store, key)
    assert (topk.num_tokens, topk.k) == (reader.num_tokens, 8)
    np.testing.assert_array_equal(topk.ids, ids.numpy())
    np.testing.assert_allclose(topk.logprobs, torch.log_softmax(logits, -1).gather(1, ids).numpy(),
                               rtol=1e-5, atol=1e-5)
    m = store.manifest("teacher_topk", key)
    assert m.inputs == {"cache": cache_key} and m.config == {"k": 8}
    assert m.metrics["tokens"] == reader.num_tokens and 0 < m.metrics["topk_mass_mean"] <= 1
    assert {"topk_ids.npy", "topk_logprobs.npy"} <= set(m.files)

    # same inputs: the same key and no work; settings that do not change the top-k keep the key
    monkeypatch.setattr(flows.stages.teacher_topk, "compute_teacher_topk", _no_work)
    assert run_teacher_topk(cfg, store, cache_key) == key
    same = _cfg(tiny_model_dir, corpus_dir, "heads.topk=8", "heads.lr=0.5", "heads.negatives=7")
    assert run_teacher_topk(same, store, cache_key) == key

    # another k or another cache: another key
    cfg4 = _cfg(tiny_model_dir, corpus_dir, "heads.topk=4")
    assert plan_teacher_topk(cfg4, store, cache_key).key != key
    assert plan_teacher_topk(cfg, store, "f" * 64).key != key
    monkeypatch.undo()
    key4 = run_teacher_topk(cfg4, store, cache_key)
    assert key4 == plan_teacher_topk(cfg4, store, cache_key).key != key
    topk4 = open_topk(store, key4)
    np.testing.assert_array_equal(topk4.ids, topk.ids[:, :4])
    assert store.path("teacher_topk", key).is_dir()  # the k=8 artifact is untouched
    assert not list((tmp_path / "staging" / "teacher_topk").iterdir())  # nothing left in staging


def test_teacher_topk_stage_needs_the_cache(tmp_path, tiny_model_dir, corpus_dir):
    store = ArtifactStore(tmp_path)
    with pytest.raises(ArtifactNotFound, match="run the extract stage first.*`exitflow run extract`"):
        run_teacher_topk(_cfg(tiny_model_dir, corpus_dir), store, "0" * 64)
    with pytest.raises(ArtifactNotFound, match="run the teacher_topk stage first.*`exitflow run teacher_topk`"):
        open_topk(store, "0" * 64)
