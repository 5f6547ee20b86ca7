"""Sharded extraction on Prefect's Dask task runner: the published cache, its key and its
checksums equal a single process's, on a LocalCluster of 2 worker processes, for a Llama and a
GPT-2 layout; the backbone loads once per worker; a run killed mid-shard resumes only the
unfinished shards; a bad cluster address is one clear error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows import shards
from flows.stages.base import StageContext, run_stage
from flows.stages.extract import ExtractStage
from pipeline.config import ConfigError, load_config
from pipeline.extract import shard_sequences
from stores.artifacts import ArtifactStore

REPO = Path(__file__).resolve().parents[2]
RUNNER = REPO / "tests" / "crash" / "run_stage.py"


def _overrides(model: Path, corpus: Path, *extra: str) -> list[str]:
    """128 sequences of 32 tokens, chunks of 8 sequences, batches of 4: 4 shards of 4 chunks on 2 workers."""
    return [f"model.source={model}", f"data.source={corpus}", "data.seq_len=32", "extract.layers=[1,2]",
            "extract.batch_size=4", "extract.chunk_tokens=256", "extract.max_tokens=4096",
            "data.fractions={train: 1.0, calib: 0.0, eval: 0.0}", *extra]


def _extract(root: Path, overrides: list[str]) -> str:
    ctx = StageContext(load_config(None, overrides), ArtifactStore(root), progress=False)
    return run_stage(ExtractStage("train"), ctx, {})


def _published(root: Path, key: str) -> dict[str, bytes]:
    """Every file of the published cache artifact but its manifest, by relative path."""
    base = ArtifactStore(root).path("extract", key)
    return {p.relative_to(base).as_posix(): p.read_bytes() for p in sorted(base.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def _assert_same_artifact(root: Path, ref_root: Path, key: str) -> None:
    got, want = _published(root, key), _published(ref_root, key)
    assert sorted(got) == sorted(want), "the sharded cache has other files (leftover shard records?)"
    differ = [name for name in want if got[name] != want[name]]
    assert not differ, f"files differ from the single-process cache: {differ[:5]}"
    assert "cache.zarr/checksums.json" in got and "cache.zarr/zarr.json" in got


# -- fast: no cluster ---------------------------------------------------------------------------
def test_shards_are_whole_chunks_and_whole_batches_covering_every_sequence():
    for n_seq, chunk_seqs, batch, want in [(128, 8, 4, 4), (130, 8, 4, 4), (128, 8, 3, 4), (5, 8, 4, 4), (64, 2, 8, 3)]:
        ranges = shard_sequences(n_seq, 32, chunk_seqs * 32, batch, want)
        assert ranges[0][0] == 0 and ranges[-1][1] == n_seq and len(ranges) <= want
        assert all(a < b for a, b in ranges) and all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:]))
        assert all(a % chunk_seqs == 0 and a % batch == 0 for a, _ in ranges)
    assert len(shard_sequences(128, 32, 256, 4, 4)) == 4


def test_workers_and_cluster_do_not_change_the_key(tmp_path, tiny_model_dir, corpus_dir):
    store = ArtifactStore(tmp_path)
    keys = {ExtractStage("train").plan(StageContext(load_config(None, _overrides(tiny_model_dir, corpus_dir, *extra)),
                                                    store, progress=False), {}).key
            for extra in [(), ("extract.workers=2",), ("extract.cluster=tcp://127.0.0.1:8786",)]}
    assert len(keys) == 1


def test_an_unreachable_cluster_is_one_error_naming_it_and_the_fix(monkeypatch):
    monkeypatch.setattr(shards, "CONNECT_TIMEOUT_S", 1)
    address = "tcp://127.0.0.1:9"
    with pytest.raises(ConfigError) as e:
        shards.cluster_workers(address)
    msg = str(e.value)
    assert "\n" not in msg and f"extract.cluster={address!r}" in msg and "unset extract.cluster" in msg


# -- slow: a LocalCluster of 2 worker processes -------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sharded_on_two_dask_workers_equals_one_process(prefect_env, tmp_path, make_tiny_family, corpus_dir, family):
    model = make_tiny_family(tmp_path / family, family)
    single = _extract(tmp_path / "single", _overrides(model, corpus_dir))
    sharded = _extract(tmp_path / "sharded", _overrides(model, corpus_dir, "extract.workers=2"))
    assert sharded == single
    _assert_same_artifact(tmp_path / "sharded", tmp_path / "single", single)
    assert not list((tmp_path / "sharded" / "staging").rglob("*.shard-*")), "shard records left in staging"

    run = ArtifactStore(tmp_path / "sharded").manifest("extract", sharded).extra["sharded"]
    assert run["workers"] == 2 and run["shards"] == 4 and len(run["ran"]) == 4
    assert sorted((s["start_row"], s["stop_row"]) for s in run["ran"]) == [(i * 1024, (i + 1) * 1024) for i in range(4)]
    pids = {s["pid"] for s in run["ran"]}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2, "shards ran outside the two Dask worker processes"
    assert all(s["backbone_loads"] == 1 for s in run["ran"]), f"a worker loaded the backbone more than once: {run}"


def _shard_progress(staging: Path) -> dict[tuple[int, int], dict]:
    out = {}
    for p in staging.rglob("progress.shard-*.json"):
        try:
            doc = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        out[(doc["start"], doc["stop"])] = doc
    return out


@pytest.mark.slow
def test_a_run_killed_mid_shard_resumes_only_that_shard(prefect_env, tmp_path, tiny_model_dir, corpus_dir):
    """kill -9 of the whole run (its Dask workers included) once one shard is complete and another
    is part-way; the re-run skips the complete shards, resumes the others from their last whole
    chunk, and publishes the single-process cache."""
    from prefect.settings import PREFECT_API_URL

    ov = _overrides(tiny_model_dir, corpus_dir, "extract.workers=2")
    single = _extract(tmp_path / "single", _overrides(tiny_model_dir, corpus_dir))
    root = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "EXITFLOW_TEST_UNIT_DELAY": "0.15",
           "PREFECT_API_URL": PREFECT_API_URL.value()}
    cmd = [sys.executable, str(RUNNER), str(root), "extract", json.dumps({"split": "train"}), "{}", *ov]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            progress = _shard_progress(root / "staging")
            if any(d["complete"] for d in progress.values()) and any(
                    0 < d["rows_done"] < d["stop"] - d["start"] for d in progress.values()):
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()[1][-3000:]}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the runner and the Dask cluster it started
        proc.wait()
    before = _shard_progress(root / "staging")
    complete = {r for r, d in before.items() if d["complete"]}
    partial = {r: d["rows_done"] for r, d in before.items() if not d["complete"] and d["rows_done"]}
    assert complete and partial
    assert not ArtifactStore(root).exists("extract", single), "a killed run must not look complete"

    final = subprocess.run(cmd, env={**env, "EXITFLOW_TEST_UNIT_DELAY": "0"}, capture_output=True, text=True,
                           timeout=600)
    assert final.returncode == 0, final.stderr[-12000:]
    assert final.stdout.strip().splitlines()[-1] == single
    _assert_same_artifact(root, tmp_path / "single", single)
    run = ArtifactStore(root).manifest("extract", single).extra["sharded"]
    ran = {(s["start_row"], s["stop_row"]): s for s in run["ran"]}
    assert not complete & set(ran), "a shard the killed run finished was extracted again"
    for r, rows in partial.items():
        assert ran[r]["resumed_from"] >= rows > 0, f"shard {r} did not resume from its last whole chunk"


@pytest.mark.slow
def test_exitflow_run_extract_with_two_workers_publishes_the_single_process_cache(tmp_path, tiny_model_dir, corpus_dir):
    """The path a user takes: `exitflow run extract --set extract.workers=2`, the shard flow nested
    in the extract flow's stage task, under the CLI's own temporary Prefect server."""
    from tests.flows.cli_procs import cli_cmd, cli_env

    single = _extract(tmp_path / "single", _overrides(tiny_model_dir, corpus_dir))
    out = subprocess.run(cli_cmd(tmp_path / "cli", _overrides(tiny_model_dir, corpus_dir, "extract.workers=2")),
                         env=cli_env(tmp_path / "prefect-home"), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-6000:]
    _assert_same_artifact(tmp_path / "cli", tmp_path / "single", single)
    run = ArtifactStore(tmp_path / "cli").manifest("extract", single).extra["sharded"]
    assert run["workers"] == 2 and len(run["ran"]) == 4
    assert "extract train (2 workers)" in out.stderr, "no progress bar over the shards"
