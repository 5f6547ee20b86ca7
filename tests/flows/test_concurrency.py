"""Two runs of the same stage at once build it once: the second waits for the first's lock,
then reuses what it published; both succeed and the artifact equals a single run's."""

from __future__ import annotations

import sys
import threading

import pytest
from cli_procs import assert_caches_equal, cli_cmd, cli_env, extract_overrides, output

from flows.stages.base import StageContext, run_stage
from flows.stages.extract import ExtractStage
from pipeline.config import load_config
from stores.artifacts import ArtifactStore

WAITED = "waiting for another run building extract"


def _single_run(tmp_path, overrides) -> tuple[ArtifactStore, str]:
    store = ArtifactStore(tmp_path / "single")
    return store, run_stage(ExtractStage("train"), StageContext(load_config(None, overrides), store, progress=False), {})


def _assert_one_artifact(root, key: str) -> None:
    assert sorted(p.name for p in (root / "artifacts" / "extract").iterdir()) == [key]
    assert not list((root / "staging" / "extract").glob("*/*")), "the loser must not leave a staging folder"


def test_two_cli_runs_of_the_same_extract_build_it_once(tmp_path, tiny_model_dir, long_corpus, migrated_prefect_home,
                                                         procs):
    root = tmp_path / "root"
    ov = extract_overrides(tiny_model_dir, long_corpus, max_tokens=8192)
    runs = [procs.start(cli_cmd(root, ov), cli_env(migrated_prefect_home), f"run{i}") for i in range(2)]
    for run in runs:
        assert run.wait(timeout=300) == 0, output(run)[-3000:]
    outs = [output(run) for run in runs]
    keys = {line.split()[1] for out in outs for line in out.splitlines() if line.startswith("train_cache")}
    assert len(keys) == 1
    key = keys.pop()
    assert sum("extract: published" in out for out in outs) == 1, "one run builds"
    (other,) = [out for out in outs if "extract: published" not in out]
    # the other waited for the lock, or (started after the build ended) found the artifact: a cache hit
    # of the stage or of its Prefect task
    assert WAITED in other or "extract: cache hit" in other or "Cached(" in other, other[-3000:]
    _assert_one_artifact(root, key)
    single, single_key = _single_run(tmp_path, ov)
    assert single_key == key
    assert_caches_equal(ArtifactStore(root), single, key)


def test_two_threads_running_the_same_stage_build_it_once(tmp_path, tiny_model_dir, long_corpus, caplog):
    """Two runs in one process (a worker running two flows in threads) exclude each other too."""
    root = tmp_path / "root"
    ov = extract_overrides(tiny_model_dir, long_corpus, max_tokens=8192)
    keys, errors = [], []

    def run() -> None:
        try:
            keys.append(run_stage(ExtractStage("train"), StageContext(load_config(None, ov), ArtifactStore(root),
                                                                      progress=False), {}))
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    caplog.set_level("INFO", logger="stores.locks")
    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len(set(keys)) == 1 and len(keys) == 2
    assert WAITED in caplog.text
    _assert_one_artifact(root, keys[0])
    single, key = _single_run(tmp_path, ov)
    assert_caches_equal(ArtifactStore(root), single, key)


FLOW = ("import logging, sys; from flows.dag import extract_flow; logging.basicConfig(level='INFO', force=True); "
        "print('KEY', extract_flow(overrides=sys.argv[2:], root=sys.argv[1])['train_cache'])")


@pytest.fixture(scope="module")
def prefect_server(migrated_prefect_home):
    """One Prefect server for flows started by processes of a test (as a worker's are)."""
    from flows.server_process import TemporaryServer

    server = TemporaryServer(migrated_prefect_home)
    server.start()
    try:
        server.wait_ready(120)
        yield server.api_url
    finally:
        server.stop()


@pytest.mark.slow
def test_two_extract_flows_at_once_build_it_once(tmp_path, tiny_model_dir, long_corpus, migrated_prefect_home,
                                                 prefect_server, procs):
    root = tmp_path / "root"
    ov = extract_overrides(tiny_model_dir, long_corpus, max_tokens=20480)
    env = {**cli_env(migrated_prefect_home), "PREFECT_API_URL": prefect_server}
    runs = [procs.start([sys.executable, "-c", FLOW, str(root), *ov], env, f"flow{i}") for i in range(2)]
    for run in runs:
        assert run.wait(timeout=300) == 0, output(run)[-3000:]
    outs = [output(run) for run in runs]
    keys = {line.split()[1] for out in outs for line in out.splitlines() if line.startswith("KEY ")}
    assert len(keys) == 1
    key = keys.pop()
    assert sum("extract: published" in out for out in outs) == 1
    _assert_one_artifact(root, key)
    single, single_key = _single_run(tmp_path, ov)
    assert single_key == key
    assert_caches_equal(ArtifactStore(root), single, key)
