"""The per-artifact build lock: a second holder waits (and says so), a timeout names the holder,
and the kernel frees the lock of a process killed with -9."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from stores.artifacts import StoreError
from stores.locks import LockTimeout, build_lock, lock_path, timeout_from_env, unfinished_builds

REPO = Path(__file__).resolve().parents[2]
KEY = "ab" * 32


def test_a_second_holder_waits_with_heartbeats_until_the_first_releases(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="stores.locks")
    order: list[str] = []
    holding = threading.Event()

    def first() -> None:
        with build_lock(tmp_path, "extract", KEY):
            holding.set()
            time.sleep(0.8)
            order.append("first done")

    t = threading.Thread(target=first)
    t.start()
    holding.wait(5)
    with build_lock(tmp_path, "extract", KEY, heartbeat_s=0.3):
        order.append("second holds")
    t.join()
    assert order == ["first done", "second holds"]
    assert f"waiting for another run building extract {KEY[:12]} (held by pid {os.getpid()}" in caplog.text
    assert "still waiting for another run building extract" in caplog.text


def test_a_timeout_names_the_holder_and_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("EXITFLOW_LOCK_TIMEOUT", "0.3")
    holding, release = threading.Event(), threading.Event()

    def holder() -> None:
        with build_lock(tmp_path, "train_heads", KEY):
            holding.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    holding.wait(5)
    try:
        with pytest.raises(LockTimeout, match=f"building train_heads {KEY[:12]}.*pid {os.getpid()}.*EXITFLOW_LOCK_TIMEOUT"):
            with build_lock(tmp_path, "train_heads", KEY):
                pass
    finally:
        release.set()
        t.join()


def test_a_bad_timeout_setting_is_refused(monkeypatch):
    monkeypatch.setenv("EXITFLOW_LOCK_TIMEOUT", "soon")
    with pytest.raises(StoreError, match="EXITFLOW_LOCK_TIMEOUT='soon' is not a number"):
        timeout_from_env()


def test_kill_9_of_the_holder_frees_the_lock(tmp_path):
    code = ("import sys, time; from stores.locks import build_lock\n"
            "with build_lock(sys.argv[1], 'extract', sys.argv[2]):\n    print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), KEY], cwd=REPO, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(LockTimeout):
            with build_lock(tmp_path, "extract", KEY, timeout=0.2):
                pass
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        with build_lock(tmp_path, "extract", KEY, timeout=5):
            assert lock_path(tmp_path, "extract", KEY).is_file()
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait()
        holder.stdout.close()


def test_a_build_left_by_an_exception_is_reported_until_it_completes(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with build_lock(tmp_path, "extract", KEY):
            raise KeyboardInterrupt
    left = [(b.stage, b.key) for b in unfinished_builds() if b.root == tmp_path]
    assert left == [("extract", KEY)]
    with build_lock(tmp_path, "extract", KEY):
        pass
    assert not [b for b in unfinished_builds() if b.root == tmp_path]


def test_names_are_checked_before_they_become_paths(tmp_path):
    with pytest.raises(StoreError):
        lock_path(tmp_path, "../extract", KEY)
