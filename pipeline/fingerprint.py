"""The one file hasher: sha256 of a file's bytes, read in blocks so multi-GB weights never sit
in memory. Model identities (weight files) and artifact manifests (payload files) both use it;
stores/ memoises it by path, size and mtime."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline.config import ModelConfig

HASH_BLOCK = 1 << 22
"""Bytes read per step (4 MiB)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def stat_stamp(path: Path, skip_suffixes: tuple[str, ...] = ()) -> str:
    """A cheap stamp of a file or folder: sha256 over every file's relative name, size and
    modification time. Equal stamps mean (barring deliberate mtime forgery) unchanged files; it
    keys memos of work derived from the files, never an artifact's content key. Files with one
    of `skip_suffixes` are left out (weights already identified by their hash)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix not in skip_suffixes) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


def tokenizer_stamp(cfg: ModelConfig) -> str:
    """A cheap stamp of what the tokenizer loads beyond the model identity: nothing for GGUF
    (the tokenizer is inside the hashed weights file) or a hub model (the identity's commit
    pins every file); the non-weight files' names, sizes and times for a local folder."""
    path = Path(cfg.source).expanduser()
    if cfg.source.startswith("embedded:") or path.is_file() or cfg.gguf_file:
        return "inside-gguf"
    if path.is_dir():
        return stat_stamp(path, skip_suffixes=_WEIGHT_SUFFIXES)
    return "hub-commit"
