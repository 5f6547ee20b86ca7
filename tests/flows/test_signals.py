"""`exitflow run` as a user stops it: Ctrl-C to the terminal's process group, SIGINT to the CLI
alone, SIGTERM (a worker, `docker stop`), kill -9. A signal stops the run within seconds with
one line saying what a re-run resumes from, exit 128 + the signal, no traceback, and the
re-run's cache equals an uninterrupted one; nothing the CLI started outlives it."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
from cli_procs import (
    assert_caches_equal,
    cli_cmd,
    cli_env,
    extract_overrides,
    output,
    wait_exit,
    wait_for_rows,
)

from flows.stages.base import StageContext, run_stage
from flows.stages.extract import ExtractStage
from pipeline.config import load_config
from stores.artifacts import ArtifactStore

STOP_WITHIN_S = 10.0
"""Seconds allowed from the signal to the exit (about 1.5 s measured on an idle 2-CPU machine)."""


def _interrupt(procs, root, overrides, migrated_prefect_home, send, name, **popen):
    """Start the CLI, wait for its extraction to make chunks durable, `send(proc)`; returns the
    process, the seconds it took to exit, the server-and-other descendants seen before."""
    proc = procs.start(cli_cmd(root, overrides), cli_env(migrated_prefect_home), name, **popen)
    wait_for_rows(root, 64 * 4, proc)
    kids = procs.descendants(proc)
    assert kids, "the CLI runs its temporary Prefect server as a child"
    send(proc)
    return proc, wait_exit(proc, STOP_WITHIN_S), kids


def _assert_interrupted(proc, code: int, signame: str, root) -> None:
    out = output(proc)
    assert proc.returncode == code, out[-3000:]
    assert f"interrupted ({signame}); re-run to resume extract " in out, out[-3000:]
    assert str((root / "staging" / "extract").resolve()) in out
    assert "Traceback" not in out and "ConnectError" not in out, out[-3000:]


def _assert_gone(kids: list[psutil.Process], within: float = 10.0) -> None:
    _, alive = psutil.wait_procs(kids, timeout=within)
    assert not alive, f"still running after the CLI exited: {[(p.pid, p.cmdline()[:3]) for p in alive]}"


def test_ctrl_c_to_the_process_group_stops_and_the_rerun_equals_a_clean_run(tmp_path, tiny_model_dir, long_corpus,
                                                                            migrated_prefect_home, procs):
    root = tmp_path / "interrupted"
    ov = extract_overrides(tiny_model_dir, long_corpus, max_tokens=12288)
    proc, seconds, kids = _interrupt(procs, root, ov, migrated_prefect_home, lambda p: os.killpg(p.pid, signal.SIGINT),
                                     "ctrl-c")
    _assert_interrupted(proc, 130, "SIGINT", root)
    assert seconds < STOP_WITHIN_S
    _assert_gone(kids)
    assert not list(ArtifactStore(root).iter_manifests("extract")), "an interrupted extraction must not look complete"

    # The re-run (the stage as the CLI's task runs it; the CLI's own path to completion is run by
    # test_concurrency) resumes from the kept chunks and ends equal to an uninterrupted run.
    cfg, store, clean = load_config(None, ov), ArtifactStore(root), ArtifactStore(tmp_path / "clean")
    key = run_stage(ExtractStage("train"), StageContext(cfg, store, progress=False), {})
    assert key in output(proc)
    assert store.manifest("extract", key).metrics["resumed_from"] >= 64 * 4
    assert run_stage(ExtractStage("train"), StageContext(cfg, clean, progress=False), {}) == key
    assert_caches_equal(store, clean, key)


@pytest.mark.slow
def test_sigterm_stops_like_ctrl_c_with_exit_143(tmp_path, tiny_model_dir, long_corpus, migrated_prefect_home, procs):
    root = tmp_path / "root"
    proc, seconds, kids = _interrupt(procs, root, extract_overrides(tiny_model_dir, long_corpus), migrated_prefect_home,
                                     lambda p: os.kill(p.pid, signal.SIGTERM), "sigterm")
    _assert_interrupted(proc, 143, "SIGTERM", root)
    _assert_gone(kids)


def test_kill_9_leaves_no_child_behind(tmp_path, tiny_model_dir, long_corpus, migrated_prefect_home, procs):
    root = tmp_path / "root"
    proc, _, kids = _interrupt(procs, root, extract_overrides(tiny_model_dir, long_corpus), migrated_prefect_home,
                               lambda p: os.kill(p.pid, signal.SIGKILL), "kill-9")
    t0 = time.monotonic()
    _assert_gone(kids, within=15.0)
    assert time.monotonic() - t0 < 15.0


@pytest.mark.slow
def test_sigint_to_the_cli_alone_stops_it_even_when_started_ignoring_sigint(tmp_path, tiny_model_dir, long_corpus,
                                                                           migrated_prefect_home, procs):
    """A background job of a non-interactive shell starts with SIGINT ignored; the CLI still
    decides what SIGINT does."""
    root = tmp_path / "root"
    ignore_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)  # noqa: E731
    proc, _, kids = _interrupt(procs, root, extract_overrides(tiny_model_dir, long_corpus), migrated_prefect_home,
                               lambda p: os.kill(p.pid, signal.SIGINT), "sigint-alone", preexec_fn=ignore_sigint)
    _assert_interrupted(proc, 130, "SIGINT", root)
    _assert_gone(kids)
