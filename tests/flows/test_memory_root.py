"""Stages and flows on an artifact root that is not a local folder: ``memory://`` (an fsspec
filesystem without rename, like an object store). memory:// lives in this process, so
everything runs in-process."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from flows.stages.base import StageContext, run_stage
from flows.stages.calibrate import CALIBRATION_FILE, CalibrateStage
from flows.stages.extract import CACHE_DIR, ExtractStage, open_cache
from flows.stages.train_heads import TrainHeadsStage
from pipeline.config import load_config
from stores.artifacts import ArtifactStore
from stores.remote import MIRROR_ENV, RemoteRoot, open_zarr


@pytest.fixture
def memory_root(memory_url):
    return memory_url


def _overrides(model_dir, corpus) -> list[str]:
    return [f"model.source={model_dir}", f"data.source={corpus}", "data.seq_len=32",
            "data.fractions={train: 0.5, calib: 0.3, eval: 0.2}", "extract.layers=[1,2]",
            "extract.chunk_tokens=256", "extract.max_tokens=2048", "heads.epochs=1", "heads.batch_tokens=256",
            "heads.warmup_steps=2", "heads.negatives=64", "heads.topk=16", "gates.epochs=1",
            "gates.batch_tokens=256", "gates.warmup_steps=2", "calibrate.levels=[0.5, 0.8]"]


@pytest.mark.filterwarnings("ignore:Object at .* is not recognized:UserWarning")  # a cache keeps json files beside its arrays
def test_extract_train_heads_calibrate_on_memory_root(memory_root, tmp_path, monkeypatch, tiny_model_dir, corpus_dir):
    cfg = load_config(None, [*_overrides(tiny_model_dir, corpus_dir), "heads.efficient_loss=false"])
    store = ArtifactStore(memory_root)
    ctx = StageContext(cfg, store, progress=False)
    train = run_stage(ExtractStage("train"), ctx, {})
    calib = run_stage(ExtractStage("calib"), ctx, {})
    heads = run_stage(TrainHeadsStage(), ctx, {"cache": train})
    calibration = run_stage(CalibrateStage(), ctx, {"calib_cache": calib, "heads": heads})

    remote = RemoteRoot(memory_root)
    for stage, key in (("extract", train), ("extract", calib), ("train_heads", heads), ("calibrate", calibration)):
        assert remote.read(f"{RemoteRoot.artifact(stage, key)}/manifest.json") is not None  # committed remotely
    assert {a.stage for a in store.listing()} == {"extract", "teacher", "train_heads", "calibrate"}
    assert not any((store.root / "staging").rglob("*.json"))  # nothing left half built in the mirror

    # another machine: an empty mirror downloads what it reads, and the stages hit their keys
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "mirror2"))
    other = ArtifactStore(memory_root)
    assert run_stage(CalibrateStage(), StageContext(cfg, other, progress=False),
                     {"calib_cache": calib, "heads": heads}) == calibration
    cal = json.loads((other.path("calibrate", calibration) / CALIBRATION_FILE).read_text())
    assert cal["levels"] == [0.5, 0.8] and set(cal["heads"]) == {"1", "2"}

    # zarr over fsspec: the cache straight from the URL reads what the mirror's reader reads
    group = open_zarr(f"{memory_root}/artifacts/extract/{train}/{CACHE_DIR}")
    reader = open_cache(other, train)  # the mirror's copy, with its chunk checksums
    local = zarr.open_group(str(reader.path), mode="r")
    assert sorted(group.array_keys()) == sorted(local.array_keys())
    for name in local.array_keys():
        np.testing.assert_array_equal(group[name][:], local[name][:])
    assert dict(group.attrs) == dict(local.attrs)
    assert group["input_ids"].shape[0] == reader.num_tokens


@pytest.mark.slow
def test_calibrate_flow_and_ls_on_memory_root(prefect_env, memory_root, tiny_model_dir, corpus_dir, capsys):
    from flows.cli import main
    from flows.dag import calibrate_flow

    ov = _overrides(tiny_model_dir, corpus_dir)
    keys = calibrate_flow(overrides=ov, root=memory_root)
    store = ArtifactStore(memory_root)
    for name in ("train_cache", "calib_cache", "heads", "gates", "calibration", "report"):
        assert keys[name], name
    assert store.exists("calibrate", keys["calibration"]) and store.exists("report", keys["report"])
    assert (store.root / "reports" / "index.html").is_file()  # the index stays in the mirror
    assert calibrate_flow(overrides=ov, root=memory_root) == keys  # all hits, from the remote manifests
    assert main(["--root", memory_root, "ls"]) == 0
    out = capsys.readouterr().out
    assert keys["calibration"][:16] in out and "BROKEN" not in out
    assert main(["--root", memory_root, "verify", keys["calibration"][:12]]) == 0
    assert main(["--root", memory_root, "report"]) == 0
    page = capsys.readouterr().out.strip().splitlines()[-1]
    assert page.endswith("report.html") and keys["report"] in page and store.root.as_posix() in page
