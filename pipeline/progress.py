"""Progress bars a caller can watch: a tqdm bar that also tells listeners where it is.

The library knows nothing of who watches; an orchestrator registers a listener for the span of
a stage (:func:`watch_progress`) and mirrors the bars wherever its users look, such as a run
page. A listener that raises is dropped with a warning: watching never stops the work.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

Listener = Callable[[str, float, float | None], None]
"""Called as ``listener(description, done, total)`` after each update and when a bar closes."""

_listeners: list[Listener] = []
_lock = threading.Lock()


class ProgressBar(tqdm):
    """tqdm, plus a call to every registered listener on each update and on close."""

    def update(self, n: float | None = 1) -> bool | None:
        out = super().update(n)
        self._tell()
        return out

    def close(self) -> None:
        if not getattr(self, "_told_closed", True) and not self.disable:
            self._told_closed = True
            self._tell()
        super().close()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._told_closed = False

    def _tell(self) -> None:
        if self.disable:
            return
        with _lock:
            listeners = list(_listeners)
        for listener in listeners:
            try:
                listener(self.desc or "", self.n, self.total)
            except Exception as e:  # noqa: BLE001 - a watcher must not stop the work
                log.warning("progress listener failed (%s); no more progress reports from it", e)
                with _lock:
                    if listener in _listeners:
                        _listeners.remove(listener)


@contextmanager
def watch_progress(listener: Listener) -> Iterator[None]:
    """Send every progress bar's updates to `listener` while the block runs."""
    with _lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _lock:
            if listener in _listeners:
                _listeners.remove(listener)
