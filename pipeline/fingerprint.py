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
