"""Training checkpoints in a folder: the latest whole state, replaced atomically.

A training stage saves its full state (weights, optimizer, scheduler, RNG, metrics so far) after
every epoch; a killed run resumes from the last one, and the resumed result must equal an
uninterrupted run. That only holds if a reader can never see a half-written file, so:

- the state is written to a temporary file in the same folder, fsynced, then renamed over
  ``last.pt`` (``os.replace`` is atomic on POSIX and Windows), and the folder is fsynced so the
  rename itself survives a power cut;
- with ``keep_previous`` the old ``last.pt`` is first renamed to ``previous.pt``. Between the
  two renames ``last.pt`` does not exist, so :meth:`FileCheckpoints.load` falls back to
  ``previous.pt``, which is then the newest whole state. It also falls back when ``last.pt``
  cannot be read (a disk error; never a torn write).

Files are read with ``torch.load(weights_only=True)``: a checkpoint holds tensors and plain
Python values only, so loading one never runs pickled code.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from stores.files import fsync_dir

log = logging.getLogger(__name__)

LAST = "last.pt"
PREVIOUS = "previous.pt"


class CheckpointError(RuntimeError):
    """No readable checkpoint where one should be; the message names the files and the fix."""


class FileCheckpoints:
    """`CheckpointIO` over a folder: ``last.pt`` (and ``previous.pt`` with ``keep_previous``).

    The folder is created on the first save; it should be private to one run of one stage
    (e.g. inside the stage's temporary artifact folder), since the newest save wins.
    """

    def __init__(self, folder: str | Path, keep_previous: bool = True):
        self.folder = Path(folder)
        self.keep_previous = keep_previous

    def __repr__(self) -> str:
        return f"FileCheckpoints({str(self.folder)!r})"

    @property
    def last_path(self) -> Path:
        return self.folder / LAST

    @property
    def previous_path(self) -> Path:
        return self.folder / PREVIOUS

    def load(self) -> dict[str, Any] | None:
        """The newest whole state, or None when nothing was saved yet."""
        candidates = [p for p in (self.last_path, self.previous_path) if p.is_file()]
        if not candidates:
            return None
        errors = []
        for path in candidates:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # unreadable file: try the older one before giving up
                first_line = (str(e).strip().splitlines() or [""])[0][:200]  # torch's messages run to pages
                errors.append(f"{path}: {type(e).__name__}: {first_line}")
                log.warning("checkpoint %s is unreadable (%s: %s)", path, type(e).__name__, first_line)
                continue
            if not isinstance(state, dict):
                errors.append(f"{path}: holds a {type(state).__name__}, not a dict")
                continue
            if path != self.last_path:
                log.warning("resuming from %s: %s is missing or unreadable", path, self.last_path.name)
            return state
        raise CheckpointError(
            "no readable checkpoint in " + str(self.folder) + ":\n  - " + "\n  - ".join(errors)
            + "\nDelete the folder to restart this stage from scratch."
        )

    def save(self, state: dict[str, Any]) -> None:
        """Write `state` so that `load` sees either the previous state or this one, whole."""
        if not isinstance(state, dict):
            raise TypeError(f"checkpoint state must be a dict, got {type(state).__name__}")
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{LAST}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            if self.keep_previous and self.last_path.exists():
                os.replace(self.last_path, self.previous_path)
            os.replace(tmp, self.last_path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(self.folder)
