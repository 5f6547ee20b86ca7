"""The extract stage end to end on the tiny model: values, content keys, cache hits,
resume after kill -9, and the errors users meet."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from flows.stages.base import StageContext, run_stage
from flows.stages.extract import ExtractStage, cache_path, load_teacher
from pipeline.backbone import BackboneError, load_backbone
from pipeline.config import ConfigError, load_config
from pipeline.data import DataError
from stores.artifacts import ArtifactNotFound, ArtifactStore, StoreError
from stores.cache import CacheMismatchError, CacheReader

REPO = Path(__file__).resolve().parents[2]


def run_extract(cfg, store, split=None) -> str:
    return run_stage(ExtractStage(split or cfg.extract.split), StageContext(cfg, store, progress=False), {})


def plan_extract(cfg, store, split=None):
    return ExtractStage(split or cfg.extract.split).plan(StageContext(cfg, store, progress=False), {})


def _cfg(model_dir: Path, corpus: Path, *extra: str, layers: str = "[1,2,3]"):
    return load_config(None, [
        f"model.source={model_dir}", f"data.source={corpus}", "data.seq_len=32",
        f"extract.layers={layers}", "extract.batch_size=4", "extract.chunk_tokens=256",
        "data.fractions={train: 0.6, calib: 0.2, eval: 0.2}", "extract.max_tokens=4096", *extra,
    ])


def test_cache_equals_output_hidden_states(tmp_path, tiny_model_dir, corpus_dir):
    cfg = _cfg(tiny_model_dir, corpus_dir)
    store = ArtifactStore(tmp_path)
    key = run_extract(cfg, store)
    reader = CacheReader(cache_path(store, key))
    assert reader.num_tokens % 32 == 0 and reader.num_tokens > 1000

    bb = load_backbone(cfg.model)
    ids = reader.column("input_ids")[: 4 * 32].reshape(4, 32).astype(np.int64)
    with torch.no_grad():
        ref = bb.model(torch.from_numpy(ids), output_hidden_states=True).hidden_states
    for layer in (1, 2, 3):
        got = reader.hidden(f"layer_{layer}", slice(0, 128))
        want = ref[layer].reshape(-1, bb.hidden_size).numpy()
        np.testing.assert_allclose(got, want.astype(np.float16).astype(np.float32), rtol=0, atol=0)
    np.testing.assert_array_equal(reader.hidden("final", slice(0, 128)),
                                  ref[-1].reshape(-1, bb.hidden_size).numpy().astype(np.float16).astype(np.float32))
    # targets are the next token; the teacher is rebuildable from the stored pieces
    stream_ids = reader.column("input_ids")
    np.testing.assert_array_equal(reader.column("targets")[:-1], stream_ids[1:])
    teacher = load_teacher(store, key)
    logits = teacher.logits(torch.from_numpy(reader.hidden("final", slice(0, 32))))
    with torch.no_grad():
        want_logits = bb.model(torch.from_numpy(ids[:1])).logits[0]
    assert torch.allclose(logits, want_logits, atol=2e-2)
    m = store.manifest("extract", key)
    assert m.metrics["tokens"] == reader.num_tokens and m.config["layers"] == [1, 2, 3]


def test_same_inputs_same_key_any_change_new_key(tmp_path, tiny_model_dir, corpus_dir):
    store = ArtifactStore(tmp_path)
    base = plan_extract(_cfg(tiny_model_dir, corpus_dir), store)
    again = plan_extract(_cfg(tiny_model_dir, corpus_dir), store)
    assert base.key == again.key
    changed = [
        _cfg(tiny_model_dir, corpus_dir, layers="[1,2]"),
        _cfg(tiny_model_dir, corpus_dir, "extract.storage_dtype=int8"),
        _cfg(tiny_model_dir, corpus_dir, "data.seq_len=16"),
        _cfg(tiny_model_dir, corpus_dir, "extract.split=calib"),
        _cfg(tiny_model_dir, corpus_dir, "model.dtype=bfloat16"),
        _cfg(tiny_model_dir, corpus_dir, "data.seed=1"),
    ]
    keys = {plan_extract(c, store).key for c in changed}
    assert base.key not in keys and len(keys) == len(changed)
    # the batch size does not change a single value: same key
    assert plan_extract(_cfg(tiny_model_dir, corpus_dir, "extract.batch_size=2"), store).key == base.key


def test_changed_data_or_weights_change_the_key(tmp_path, tiny_model_dir, corpus_dir):
    import shutil

    corpus2 = tmp_path / "corpus2"
    shutil.copytree(corpus_dir, corpus2)
    store = ArtifactStore(tmp_path / "root")
    k1 = plan_extract(_cfg(tiny_model_dir, corpus2), store).key
    (corpus2 / "doc000.txt").write_text((corpus2 / "doc000.txt").read_text() + " changed")
    k2 = plan_extract(_cfg(tiny_model_dir, corpus2), store).key
    model2 = tmp_path / "model2"
    shutil.copytree(tiny_model_dir, model2)
    k3 = plan_extract(_cfg(model2, corpus2), store).key
    assert k3 == k2  # same weights elsewhere: same identity
    from safetensors.torch import load_file, save_file

    w = load_file(model2 / "model.safetensors")
    name = next(iter(w))
    w[name] = w[name] + 1e-3
    save_file(w, model2 / "model.safetensors", metadata={"format": "pt"})
    k4 = plan_extract(_cfg(model2, corpus2), store).key
    assert len({k1, k2, k4}) == 3


def _extract_cmd(root: Path, model: Path, corpus: Path, *extra: str) -> list[str]:
    code = (
        "import sys; from flows.stages.base import StageContext, run_stage; from flows.stages.extract import ExtractStage; from pipeline.config import load_config; "
        "from stores.artifacts import ArtifactStore; "
        "cfg = load_config(None, sys.argv[2:]); print(run_stage(ExtractStage(cfg.extract.split), StageContext(cfg, ArtifactStore(sys.argv[1]), progress=False), {}))"
    )
    return [sys.executable, "-c", code, str(root), f"model.source={model}", f"data.source={corpus}",
            "data.seq_len=32", "extract.layers=[1,2,3]", "extract.batch_size=2", "extract.chunk_tokens=64", "extract.max_tokens=8192",
            "data.fractions={train: 1.0, calib: 0.0, eval: 0.0}", *extra]


def test_resume_after_kill_equals_clean_run(tmp_path, tiny_model_dir):
    """kill -9 part-way, re-run: the finished cache equals an uninterrupted one."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    from pydoc_data.topics import topics

    (corpus / "all.txt").write_text("\n".join(topics[k] for k in sorted(topics)[:40]))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    killed_root, clean_root = tmp_path / "killed", tmp_path / "clean"
    cmd = _extract_cmd(killed_root, tiny_model_dir, corpus)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    progress_files = lambda: list((killed_root / "staging").rglob("progress.json"))  # noqa: E731
    deadline = time.monotonic() + 120
    rows = 0
    while time.monotonic() < deadline and proc.poll() is None:
        files = progress_files()
        if files:
            try:
                rows = json.loads(files[0].read_text())["rows_done"]
            except (ValueError, KeyError):
                rows = 0
            if rows >= 64 * 10:
                break
        time.sleep(0.02)
    assert proc.poll() is None, f"extraction finished before it could be killed: {proc.communicate()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = ArtifactStore(killed_root)
    assert not list(store.iter_manifests("extract")), "a killed extraction must not look complete"

    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    key = resumed.stdout.strip().splitlines()[-1]
    m = store.manifest("extract", key)
    assert m.metrics["resumed_from"] >= rows > 0

    clean = subprocess.run(_extract_cmd(clean_root, tiny_model_dir, corpus), env=env, capture_output=True, text=True, check=True)
    assert clean.stdout.strip().splitlines()[-1] == key
    a = CacheReader(cache_path(store, key))
    b = CacheReader(cache_path(ArtifactStore(clean_root), key))
    for name in ["layer_1", "layer_2", "layer_3", "final"]:
        np.testing.assert_array_equal(a.hidden(name), b.hidden(name))
    for name in ["input_ids", "targets", "doc_ids", "positions"]:
        np.testing.assert_array_equal(a.column(name), b.column(name))


def test_int8_and_bfloat16_caches(tmp_path, tiny_model_dir, corpus_dir):
    store = ArtifactStore(tmp_path)
    k16 = run_extract(_cfg(tiny_model_dir, corpus_dir), store)
    k8 = run_extract(_cfg(tiny_model_dir, corpus_dir, "extract.storage_dtype=int8"), store)
    kb = run_extract(_cfg(tiny_model_dir, corpus_dir, "extract.storage_dtype=bfloat16"), store)
    ref = CacheReader(cache_path(store, k16)).hidden("layer_2")
    q = CacheReader(cache_path(store, k8)).hidden("layer_2")
    bf = CacheReader(cache_path(store, kb)).hidden("layer_2")
    scale = np.abs(ref).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(q - ref) <= scale * 0.51 + 1e-2 * np.abs(ref))
    assert np.allclose(bf, ref, rtol=1e-2, atol=1e-2)
    assert store.manifest("extract", k8).metrics["bytes_per_token_per_layer"] < 0.6 * store.manifest("extract", k16).metrics["bytes_per_token_per_layer"]


# -- bad input -----------------------------------------------------------------------------------
def test_bad_inputs_name_the_value_and_leave_nothing_complete(tmp_path, tiny_model_dir, corpus_dir):
    store = ArtifactStore(tmp_path)
    with pytest.raises(BackboneError, match="does not exist"):
        run_extract(_cfg(tmp_path / "no-such-model", corpus_dir), store)
    with pytest.raises(BackboneError, match=r"\b4\b"):
        run_extract(_cfg(tiny_model_dir, corpus_dir, layers="[2,4]"), store)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("   ")
    with pytest.raises(DataError):
        run_extract(_cfg(tiny_model_dir, empty), store)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"body": "hello world"}\n')
    with pytest.raises(DataError, match="body"):
        run_extract(_cfg(tiny_model_dir, jsonl), store)
    with pytest.raises(BackboneError, match="1024"):
        run_extract(_cfg(tiny_model_dir, corpus_dir, "data.seq_len=1024"), store)
    assert not list(store.iter_manifests())


def test_staging_folder_of_other_inputs_is_refused(tmp_path, tiny_model_dir, corpus_dir):
    store = ArtifactStore(tmp_path)
    cfg = _cfg(tiny_model_dir, corpus_dir)
    other = run_extract(_cfg(tiny_model_dir, corpus_dir, layers="[1,2]"), store)
    plan = plan_extract(cfg, store)
    # a cache folder copied over from another run sits where ours would resume
    import shutil

    shutil.copytree(cache_path(store, other), store.staging("extract", plan.key) / "cache.zarr")
    (store.staging("extract", plan.key) / "cache.zarr" / "progress.json").write_text(
        json.dumps({"rows_done": 0, "num_tokens": 0, "complete": False}))
    with pytest.raises(CacheMismatchError, match=other[:12]):
        run_extract(cfg, store)


def test_non_finite_hidden_states_stop_the_stage(tmp_path, tiny_model_dir, corpus_dir, monkeypatch):
    from pipeline import backbone as bb_mod
    from stores.cache import NonFiniteError

    real = bb_mod.Backbone.hidden_states

    def overflowing(self, ids, layers):
        per_layer, final = real(self, ids, layers)
        per_layer[layers[0]][0, 0, 0] = 1e6  # beyond float16
        return per_layer, final

    monkeypatch.setattr(bb_mod.Backbone, "hidden_states", overflowing)
    store = ArtifactStore(tmp_path)
    with pytest.raises(NonFiniteError, match="bfloat16"):
        run_extract(_cfg(tiny_model_dir, corpus_dir), store)
    assert not list(store.iter_manifests("extract"))  # the shared teacher may exist; no cache does


def test_bad_config_and_root(tmp_path):
    with pytest.raises(ConfigError, match="storage_dtype"):
        load_config(None, ["extract.storage_dtype=float8"])
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(StoreError, match="not writable"):
        ArtifactStore(f / "root")


def test_a_second_plan_remembers_the_packed_split_and_builds_from_it(tmp_path, tiny_model_dir, corpus_dir,
                                                                      monkeypatch):
    """An unchanged re-run plans without loading the tokenizer (seconds for a GGUF model); a
    tokenizer or corpus file that changes re-packs; a build planned from the memo packs then."""
    import shutil

    import flows.stages.extract as extract

    model, corpus = tmp_path / "model", tmp_path / "corpus"
    shutil.copytree(tiny_model_dir, model)
    shutil.copytree(corpus_dir, corpus)
    store = ArtifactStore(tmp_path / "root")
    cfg = _cfg(model, corpus)
    first = plan_extract(cfg, store)
    loads = []
    real = extract.load_tokenizer
    monkeypatch.setattr(extract, "load_tokenizer", lambda m: loads.append(m) or real(m))
    extract._tokenizer.cache_clear()
    again = plan_extract(cfg, store)
    assert again.key == first.key and again.scratch is None and loads == []
    assert again.extra["num_documents"] == first.extra["num_documents"]
    key = run_stage(ExtractStage("train"), StageContext(cfg, store, progress=False), {}, plan=again)
    assert key == first.key and len(loads) == 1
    assert CacheReader(extract.cache_path(store, key)).num_tokens == 4096
    tok = model / "tokenizer_config.json"
    tok.write_text(tok.read_text() + "\n")
    extract._tokenizer.cache_clear()
    assert plan_extract(cfg, store).key == first.key and len(loads) == 2  # re-packed, same tokens
    (corpus / "doc000.txt").write_text((corpus / "doc000.txt").read_text() + " changed")
    assert plan_extract(cfg, store).key != first.key and len(loads) == 2  # same tokenizer, in-process


def test_max_tokens_is_a_cap_the_stage_never_exceeds(tmp_path, tiny_model_dir, corpus_dir):
    """Caches hold whole sequences: a cap under one sequence is refused (it used to cache one
    whole sequence, more than asked), a larger one rounds down."""
    from flows.stages.base import InputMismatch

    store = ArtifactStore(tmp_path / "root")
    with pytest.raises(InputMismatch, match=r"extract.max_tokens=16 is less than one sequence of data.seq_len=32"):
        run_extract(_cfg(tiny_model_dir, corpus_dir, "extract.max_tokens=16"), store)
    assert not list(store.iter_manifests())
    key = run_extract(_cfg(tiny_model_dir, corpus_dir, "extract.max_tokens=100"), store)
    assert store.manifest("extract", key).metrics["tokens"] == 96  # three sequences of 32, not four


def test_the_lm_head_is_stored_once_per_backbone_and_old_caches_still_read(tmp_path, tiny_model_dir, corpus_dir):
    """Every split's cache references one `teacher` artifact (final norm + LM head) instead of
    a copy each; a cache written with its own copy (before teachers were shared) still reads."""
    import shutil

    from flows.stages.extract import load_teacher, teacher_path
    from flows.stages.teacher import TEACHER_FILE

    store = ArtifactStore(tmp_path / "root")
    cfg = _cfg(tiny_model_dir, corpus_dir)
    keys = [run_extract(cfg, store, split) for split in ("train", "calib", "eval")]
    teachers = {store.manifest("extract", k).extra["teacher"] for k in keys}
    assert len(teachers) == 1 and [m.key for m in store.iter_manifests("teacher")] == list(teachers)
    assert not any((store.path("extract", k) / TEACHER_FILE).exists() for k in keys)
    backbone = load_backbone(cfg.model)
    want = backbone.teacher_weights()
    for k in keys:
        got = load_teacher(store, k)
        assert torch.equal(got.lm_head, want.lm_head) and torch.equal(got.final_norm, want.final_norm)
    # the layout of older caches: their own copy, no teacher artifact
    shutil.copy(teacher_path(store, keys[0]), store.path("extract", keys[0]) / TEACHER_FILE)
    shutil.rmtree(store.path("teacher", teachers.pop()))
    assert torch.equal(load_teacher(store, keys[0]).lm_head, want.lm_head)
    with pytest.raises(ArtifactNotFound, match="re-run the extract stage"):
        load_teacher(store, keys[1])
