"""The one file hasher: sha256 of a file's bytes, read in blocks so multi-GB weights never sit
in memory. Model identities (weight files) and artifact manifests (payload files) both use it;
stores/ memoises it by path, size and mtime."""

from __future__ import annotations

import hashlib
from pathlib import Path

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
