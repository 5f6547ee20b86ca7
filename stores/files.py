"""Whole-file writes, file hashes and tensor files: the one copy every store uses.

Every file a stage writes must be seen by a reader as the old file or the new one, never a
torn one, whatever kills the process: write a temporary file in the same folder, fsync it,
rename it over the target (atomic on POSIX and Windows), fsync the folder so the rename
itself survives a power cut.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from pipeline.fingerprint import sha256_file as file_sha256  # noqa: F401  (the one file hasher; stores memoise it)


class TensorFileError(RuntimeError):
    """A tensor file is missing or unreadable; the message names the path and the fix."""


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, content: bytes | Callable[[BinaryIO], None]) -> None:
    """Write `content` (bytes, or a function that writes to a binary file) to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(content, (bytes, bytearray)):
                f.write(content)
            else:
                content(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, data: Any) -> None:
    """JSON (sorted keys, indented) written with :func:`write_atomic`."""
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str).encode())


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save to safetensors atomically, with optional string metadata in the file's header."""
    from safetensors.torch import save

    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        if t.untyped_storage().data_ptr() in seen and t.numel():  # safetensors refuses shared storage (tied weights)
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    write_atomic(path, save(out, metadata=metadata))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file."""
    return load_tensors_with_metadata(path)[0]


def load_tensors_with_metadata(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a safetensors file and its header metadata ({} when it has none)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise TensorFileError(f"no tensors at {path}; run the stage that writes it first")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types with no path in them
        raise TensorFileError(f"{path} is not a readable safetensors file ({e}); delete its artifact and re-run "
                              "the stage that wrote it") from e
