"""What Ctrl-C and SIGTERM do to `exitflow run`: stop now, keep what the stages made durable.

Both signals raise :class:`Interrupted` (a KeyboardInterrupt) in the main thread, where the
flow and its tasks run. Every store writes atomically and every long stage resumes from its
staging folder (extraction from its last whole chunk, training from its last epoch
checkpoint), so any point of the main thread is a safe one to stop at; Prefect's engine sees
an interrupt, marks the task and flow runs Crashed and lets it through, and the CLI says what
a re-run resumes from and exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM).

The handlers are installed explicitly, so a run stops on SIGINT even where it was started with
SIGINT ignored (a background job of a non-interactive shell) and on SIGTERM (what a worker,
``docker stop`` or systemd sends). During a flow Prefect's engine puts its own SIGTERM handler
in front of this one; it ends the task and flow runs, then puts this one back and re-sends
the signal, so the outcome is the same. A second signal while the run is stopping forces the
exit at once.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run was asked to stop by a signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received: list[int] = []


def as_interrupt(exc: BaseException) -> Interrupted | None:
    """`exc` as an :class:`Interrupted` when it says the run was stopped by a signal (a plain
    KeyboardInterrupt: SIGINT; Prefect's TerminationSignal: its signal); else None."""
    if isinstance(exc, Interrupted):
        return exc
    if isinstance(exc, KeyboardInterrupt):
        return Interrupted(signal.SIGINT)
    prefect_exceptions = sys.modules.get("prefect.exceptions")
    if prefect_exceptions is not None and isinstance(exc, prefect_exceptions.TerminationSignal):
        return Interrupted(exc.signal)
    return None


def exit_code(exc: Interrupted) -> int:
    """128 + the signal number: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + exc.signum


def _on_signal(signum: int, frame) -> None:
    _received.append(signum)
    if len(_received) == 1:
        raise Interrupted(signum)
    # Already stopping and asked again: go now (the server child follows: it watches this process).
    print(f"\n{signal.Signals(signum).name} again: exiting without waiting for the run to stop", file=sys.stderr,
          flush=True)
    os._exit(128 + signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted` in the main thread
    (outside the main thread this does nothing: Python delivers signals to the main thread)."""
    _received.clear()
    previous = {}
    try:
        for sig in HANDLED:
            previous[sig] = signal.signal(sig, _on_signal)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def raise_if_signalled() -> None:
    """Raise :class:`Interrupted` when a signal arrived in the block but something caught the
    exception on its way (the flow returned anyway)."""
    if _received:
        raise Interrupted(_received[0])


def interrupted_message(exc: Interrupted) -> str:
    """"interrupted; re-run to resume ..." naming each stage left half built and its staging
    folder, or saying that none was."""
    from stores.artifacts import ArtifactStore
    from stores.locks import unfinished_builds

    name = signal.Signals(exc.signum).name
    kept = []
    for b in unfinished_builds():
        store = ArtifactStore(b.root)
        if not store.exists(b.stage, b.key):
            kept.append(f"{b.stage} {b.key[:12]} from its staging folder {store.staging(b.stage, b.key).resolve()}")
    if not kept:
        return (f"interrupted ({name}) before any stage had work in progress; re-run to start again "
                "(finished stages are cache hits)")
    return f"interrupted ({name}); re-run to resume " + "; and ".join(kept)
