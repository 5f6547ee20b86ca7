"""Helpers for tests that run `exitflow run` as real processes: the command, a shared warm
Prefect home, waiting for extraction progress, and killing whatever a test started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[2]


def extract_overrides(model: Path, corpus: Path, max_tokens: int = 30720) -> list[str]:
    """A tiny-model extraction slow enough to interrupt: small batches, small chunks."""
    return [f"model.source={model}", f"data.source={corpus}", "data.seq_len=32", "extract.layers=[1,2,3]",
            "extract.batch_size=2", "extract.chunk_tokens=64", f"extract.max_tokens={max_tokens}",
            "data.fractions={train: 1.0, calib: 0.0, eval: 0.0}"]


def cli_cmd(root: Path, overrides: list[str]) -> list[str]:
    sets = [a for o in overrides for a in ("--set", o)]
    return [sys.executable, "-m", "flows.cli", "--root", str(root), "run", "extract", *sets]


def cli_env(prefect_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PREFECT_HOME=str(prefect_home),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    return env


def write_long_corpus(folder: Path) -> Path:
    """One document of ~95k tiny-model tokens (the first 40 topics of the embedded corpus)."""
    from pydoc_data.topics import topics

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "all.txt").write_text("\n".join(topics[k] for k in sorted(topics)[:40]))
    return folder


class Procs:
    """Processes a test started, each in a session of its own; :meth:`kill_all` ends them and
    every descendant seen (teardown, pass or fail)."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.started: list[subprocess.Popen] = []
        self.seen: dict[int, psutil.Process] = {}

    def start(self, cmd: list[str], env: dict[str, str], name: str, **kwargs) -> subprocess.Popen:
        out = open(self.tmp_path / f"{name}.out", "wb")
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, **kwargs)
        out.close()
        proc.log = self.tmp_path / f"{name}.out"  # type: ignore[attr-defined]
        self.started.append(proc)
        return proc

    def descendants(self, proc: subprocess.Popen) -> list[psutil.Process]:
        try:
            kids = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.seen.update({k.pid: k for k in kids})
        return kids

    def kill_all(self) -> None:
        for proc in self.started:
            self.descendants(proc)
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
        for kid in self.seen.values():
            try:
                kid.kill()
            except psutil.Error:
                pass


def output(proc: subprocess.Popen) -> str:
    return Path(proc.log).read_text(errors="replace")  # type: ignore[attr-defined]


def wait_for_rows(root: Path, rows: int, proc: subprocess.Popen, timeout: float = 120.0) -> int:
    """Wait until the extraction under `root` has made `rows` rows durable; returns how many."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before it could be interrupted:\n"
                                 f"{output(proc)[-3000:]}")
        for f in (root / "staging").rglob("progress.json"):
            try:
                done = json.loads(f.read_text())["rows_done"]
            except (OSError, ValueError, KeyError):
                continue
            if done >= rows:
                return done
        time.sleep(0.02)
    raise AssertionError(f"no {rows} rows extracted within {timeout:.0f} s:\n{output(proc)[-3000:]}")


def wait_exit(proc: subprocess.Popen, timeout: float) -> float:
    """Seconds until `proc` exits (fails the test after `timeout`)."""
    t0 = time.monotonic()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {timeout:.0f} s after the signal:\n{output(proc)[-3000:]}") from None
    return time.monotonic() - t0


def assert_caches_equal(store_a, store_b, key: str) -> None:
    from flows.stages.extract import cache_path
    from stores.cache import CacheReader

    a, b = CacheReader(cache_path(store_a, key)), CacheReader(cache_path(store_b, key))
    for name in ["layer_1", "layer_2", "layer_3", "final"]:
        np.testing.assert_array_equal(a.hidden(name), b.hidden(name))
    for name in ["input_ids", "targets", "doc_ids", "positions"]:
        np.testing.assert_array_equal(a.column(name), b.column(name))
