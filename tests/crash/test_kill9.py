"""kill -9 at random points of every resumable stage, five times in a row, then a run to the
end: the artifact equals an uninterrupted run's and the finished units were not redone.

Each stage runs in its own process (`tests/crash/run_stage.py`) on the tiny model, its units
(chunks, top-k batches, epochs) slowed by a sleep so a kill can land between and inside them.
A kill waits for 1-2 new units of that run (one epoch for the trainers), then a random 0-0.2 s
more. Slow: `make test-all`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from flows.stages import make_stage
from flows.stages.base import StageContext, run_stage
from pipeline.config import load_config
from stores.artifacts import ArtifactStore

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RUNNER = REPO / "tests" / "crash" / "run_stage.py"
KILLS = 5


def _overrides(model: Path, corpus: Path) -> list[str]:
    return [f"model.source={model}", f"data.source={corpus}", "data.seq_len=32",
            "data.fractions={train: 1.0, calib: 0.0, eval: 0.0}", "extract.layers=[1,2,3]", "extract.batch_size=4",
            "extract.chunk_tokens=256", "extract.max_tokens=8192",
            "heads.epochs=8", "heads.batch_tokens=512", "heads.warmup_steps=2", "heads.negatives=64", "heads.topk=16",
            "gates.epochs=8", "gates.batch_tokens=512", "gates.warmup_steps=2", "gates.max_tokens=4096",
            "quantize.epochs=4", "quantize.batch_tokens=512", "quantize.warmup_steps=2"]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, tiny_model_dir, corpus_dir):
    """Every stage's inputs, built once in-process: stage name -> (params, inputs)."""
    root = tmp_path_factory.mktemp("crash-upstream")
    ov = _overrides(tiny_model_dir, corpus_dir)
    ctx = StageContext(load_config(None, ov), ArtifactStore(root), progress=False)
    cache = run_stage(make_stage("extract", split="train"), ctx, {})
    topk = run_stage(make_stage("teacher_topk"), ctx, {"cache": cache})
    heads = run_stage(make_stage("train_heads"), ctx, {"cache": cache, "teacher_topk": topk})
    gates = run_stage(make_stage("train_gates"), ctx, {"cache": cache, "heads": heads})
    plans = {
        "extract": ({"split": "train"}, {}),
        "teacher_topk": ({}, {"cache": cache}),
        "train_heads": ({}, {"cache": cache, "teacher_topk": topk}),
        "train_gates": ({}, {"cache": cache, "heads": heads}),
        "quantize": ({}, {"cache": cache, "heads": heads, "gates": gates, "teacher_topk": topk}),
    }
    return root, ov, plans


def _fresh_root(upstream_root: Path, dest: Path, stage: str) -> Path:
    """A copy of the upstream root without `stage`'s own artifacts."""
    shutil.copytree(upstream_root, dest, ignore=shutil.ignore_patterns("staging"))
    shutil.rmtree(dest / "artifacts" / stage, ignore_errors=True)
    return dest


def _units(staging: Path, stage: str) -> int:
    """Units of work made durable so far in the stage's staging folder."""
    if stage == "extract":
        return sum(json.loads(p.read_text()).get("rows_done", 0) for p in staging.rglob("progress.json")
                   if p.parent.name.endswith(".zarr"))
    if stage == "teacher_topk":
        return sum(json.loads(p.read_text()).get("batches_done", 0) for p in staging.rglob("progress.json"))
    return sum(p.stat().st_mtime_ns for p in staging.rglob("last.pt"))  # changes on every epoch's checkpoint


def _read_units(staging: Path, stage: str) -> int:
    for _ in range(20):  # a file replaced while reading: try again
        try:
            return _units(staging, stage)
        except (OSError, ValueError):
            time.sleep(0.01)
    return 0


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "EXITFLOW_TEST_UNIT_DELAY": "0.03",
            "EXITFLOW_TEST_TOPK_BATCH_ROWS": "256"}


def _cmd(root: Path, stage: str, params: dict, inputs: dict, ov: list[str]) -> list[str]:
    return [sys.executable, str(RUNNER), str(root), stage, json.dumps(params), json.dumps(inputs), *ov]


def _kill_chain(cmd: list[str], staging: Path, stage: str, rng: np.random.Generator) -> list[int]:
    """Start the stage KILLS times, each killed with -9 after 1-2 new units; returns the units
    durable after each kill (every kill must leave more than the one before)."""
    marks = []
    for i in range(KILLS):
        before = _read_units(staging, stage)
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wanted = int(rng.integers(1, 3)) if stage in ("extract", "teacher_topk") else 1  # epochs are few
            seen, last = 0, before
            deadline = time.monotonic() + 180
            while seen < wanted and proc.poll() is None and time.monotonic() < deadline:
                now = _read_units(staging, stage)
                if now != last:
                    seen, last = seen + 1, now
                time.sleep(0.005)
            time.sleep(float(rng.uniform(0, 0.2)))
            assert proc.poll() is None, f"kill {i + 1}: the run finished first: {proc.communicate()[1][-2000:]}"
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        marks.append(_read_units(staging, stage))
        assert marks[-1] != before, f"kill {i + 1} left no new durable unit"
    return marks


def _payload(store: ArtifactStore, stage: str, key: str) -> dict[str, object]:
    """Every payload file of an artifact but its manifest, by relative path: its bytes, or for a
    safetensors file its metadata and each tensor's bytes (the header's key order is not fixed)."""
    from safetensors import safe_open

    base = store.path(stage, key)
    out: dict[str, object] = {}
    for p in sorted(base.rglob("*")):
        if not p.is_file() or p.name == "manifest.json":
            continue
        if p.suffix == ".safetensors":
            with safe_open(str(p), "pt") as f:
                out[str(p.relative_to(base))] = (f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()})
        else:
            out[str(p.relative_to(base))] = p.read_bytes()
    return out


@pytest.mark.parametrize("stage", ["extract", "teacher_topk", "train_heads", "train_gates", "quantize"])
def test_five_kills_then_a_whole_run_equal_an_uninterrupted_run(upstream, tmp_path, stage):
    root, ov, plans = upstream
    params, inputs = plans[stage]
    clean_root = _fresh_root(root, tmp_path / "clean", stage)
    clean = subprocess.run(_cmd(clean_root, stage, params, inputs, ov), env={**_env(), "EXITFLOW_TEST_UNIT_DELAY": "0"},
                           capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-3000:]
    key = clean.stdout.strip().splitlines()[-1]

    killed_root = _fresh_root(root, tmp_path / "killed", stage)
    cmd = _cmd(killed_root, stage, params, inputs, ov)
    marks = _kill_chain(cmd, killed_root / "staging" / stage, stage,
                        np.random.default_rng(sorted(plans).index(stage)))
    store = ArtifactStore(killed_root)
    assert not store.exists(stage, key), "a killed run must not look complete"
    final = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    assert final.stdout.strip().splitlines()[-1] == key

    assert _payload(store, stage, key) == _payload(ArtifactStore(clean_root), stage, key)
    m = store.manifest(stage, key).metrics
    if stage == "extract":
        assert m["resumed_from"] >= marks[-1] > 0  # rows durable before the last kill were not extracted again
    elif stage == "teacher_topk":
        assert m["resumed_from_batch"] >= marks[-1] > 0
    else:
        assert m["resumed_from_epoch"] >= 1  # at least one finished epoch was kept, not retrained


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_disk_stops_the_extraction_and_a_run_with_space_resumes_it(upstream, tmp_path):
    """A real small filesystem (tmpfs, as root): the extraction fails on ENOSPC, nothing looks
    complete, and once there is space the same command resumes from the chunks on disk."""
    root, ov, plans = upstream
    params, inputs = plans["extract"]
    disk = tmp_path / "small"
    if not _mount_tmpfs(disk, "1500k"):
        pytest.skip("cannot mount a small tmpfs here (needs root); the full-disk path is not exercised")
    try:
        cmd = _cmd(disk / "root", "extract", params, inputs, ov)
        full = subprocess.run(cmd, env={**_env(), "EXITFLOW_TEST_UNIT_DELAY": "0"}, capture_output=True, text=True,
                              timeout=600)
        assert full.returncode != 0 and "No space left on device" in full.stderr, full.stderr[-2000:]
        store = ArtifactStore(disk / "root")
        assert not any(store.iter_manifests("extract")), "a failed extraction must not look complete"
        done_before = _read_units(disk / "root" / "staging" / "extract", "extract")
        assert done_before > 0
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        again = subprocess.run(cmd, env={**_env(), "EXITFLOW_TEST_UNIT_DELAY": "0"}, capture_output=True, text=True,
                               timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]
        key = again.stdout.strip().splitlines()[-1]
        assert store.manifest("extract", key).metrics["resumed_from"] >= done_before
        assert _payload(store, "extract", key) == _payload(ArtifactStore(root), "extract", key)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
