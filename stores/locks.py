"""One builder per artifact: an exclusive lock per (stage, key) under the artifact root.

Two runs that plan the same key (two `exitflow run` at once, a UI run beside a terminal run)
would otherwise build into the same staging folder, overwrite each other's chunks and trip
over each other's renames. The first to take ``locks/<stage>-<key>.lock`` builds and
publishes; the others wait, then find the artifact published and reuse it.

The lock is ``flock`` on an open file (``msvcrt.locking`` on Windows): the kernel releases it
when its holder dies, ``kill -9`` included, so a crashed run never leaves a stale lock behind,
and each open file is a lock of its own, so two threads of one process exclude each other too.
Use it on a local filesystem (over NFS it depends on the client's lock support). Lock files
are never deleted: unlinking a lock file someone waits on would let two runs hold "the" lock
on two different files. They are empty but for the holder's pid and start time, which the
waiting message names.

``EXITFLOW_LOCK_TIMEOUT`` (seconds) makes a waiter give up with :class:`LockTimeout` instead
of waiting for as long as the build takes (the default).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from stores.artifacts import StoreError, check_key, check_stage

log = logging.getLogger(__name__)

LOCK_DIR = "locks"
TIMEOUT_ENV = "EXITFLOW_LOCK_TIMEOUT"
HEARTBEAT_S = 10.0
"""Seconds between the waiter's "still waiting" lines."""
_POLL_S = 0.2


class LockTimeout(StoreError):
    """Another run held a stage's lock for longer than the waiter was willing to wait."""


@dataclass(frozen=True)
class HeldLock:
    """A build lock this process holds: which artifact, under which root."""

    root: Path
    stage: str
    key: str


_held: list[HeldLock] = []
_abandoned: list[HeldLock] = []
_held_guard = threading.Lock()


def unfinished_builds() -> list[HeldLock]:
    """The builds of this process that hold their lock now or were left by an exception (an
    interrupt, an error), oldest first: their staging folders keep what a re-run resumes from."""
    with _held_guard:
        return list(dict.fromkeys(_abandoned + _held))


def lock_path(root: str | Path, stage: str, key: str) -> Path:
    return Path(root) / LOCK_DIR / f"{check_stage(stage)}-{check_key(key)}.lock"


def timeout_from_env() -> float | None:
    """``EXITFLOW_LOCK_TIMEOUT`` in seconds; None (wait as long as it takes) when unset or empty."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise StoreError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds; unset it to wait for as long as "
                         "another run's build takes") from None
    return max(0.0, value)


@contextmanager
def build_lock(root: str | Path, stage: str, key: str, timeout: float | None = None,
               heartbeat_s: float = HEARTBEAT_S) -> Iterator[None]:
    """Hold the build lock of ``<stage>/<key>`` for the block; wait while another run holds it.

    ``timeout``: seconds to wait before raising :class:`LockTimeout` (None: the value of
    ``EXITFLOW_LOCK_TIMEOUT``, else wait without limit). While waiting, logs once that it waits
    and then every ``heartbeat_s`` seconds for how long.
    """
    path = lock_path(root, stage, key)
    timeout = timeout_from_env() if timeout is None else timeout
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise StoreError(f"cannot open the build lock {path} ({e.strerror or e}); the artifact root must be "
                         "writable: pass a writable folder with --root or set EXITFLOW_HOME") from None
    try:
        _acquire(fd, path, stage, key, timeout, heartbeat_s)
        _write_holder(fd)
        me = HeldLock(Path(root), stage, key)
        with _held_guard:
            _held.append(me)
        try:
            yield
        except BaseException:
            with _held_guard:
                _abandoned.append(me)
            raise
        else:
            with _held_guard:
                _abandoned[:] = [b for b in _abandoned if b != me]
        finally:
            with _held_guard:
                _held.remove(me)
            _unlock(fd)
    finally:
        os.close(fd)


def _acquire(fd: int, path: Path, stage: str, key: str, timeout: float | None, heartbeat_s: float) -> None:
    if _try_lock(fd):
        return
    t0 = time.monotonic()
    log.info("waiting for another run building %s %s (%s); this run goes on when that one publishes or stops",
             stage, key[:12], _holder(path))
    next_beat = t0 + heartbeat_s
    while not _try_lock(fd):
        now = time.monotonic()
        if timeout is not None and now - t0 >= timeout:
            raise LockTimeout(f"another run has been building {stage} {key[:12]} for longer than {timeout:.0f} s "
                              f"({_holder(path)}; lock {path}); wait for it, or raise {TIMEOUT_ENV}")
        if now >= next_beat:
            log.info("still waiting for another run building %s %s: %.0f s so far (%s)", stage, key[:12], now - t0,
                     _holder(path))
            next_beat = now + heartbeat_s
        time.sleep(_POLL_S)
    log.info("%s %s: the other run's lock is released after %.0f s", stage, key[:12], time.monotonic() - t0)


def _write_holder(fd: int) -> None:
    """Record who holds the lock, for the waiters' messages (best effort)."""
    note = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}"
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, note.encode(), 0)
    except (OSError, AttributeError):  # pwrite is POSIX-only; the note is only a courtesy
        pass


def _holder(path: Path) -> str:
    try:
        note = path.read_text().strip()
    except OSError:
        note = ""
    return f"held by {note}" if note else "holder unknown"


if os.name == "nt":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
