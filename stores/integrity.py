"""Checksums of stored files, so a reader knows the bytes are the ones that were written.

Two records sit beside the data:

- the manifest's ``files``: every small file (json, safetensors, npy) with its size and sha256,
  hashed when the artifact is published;
- a sidecar ``checksums.json`` in a folder of many large files (the chunks of a zarr cache),
  written by the writer as it goes, so publishing never reads a large cache a second time: size
  and CRC-32 of each file, and the files that are absent on purpose (zarr stores no chunk that
  is all fill value, and reading one gives zeros, so a deleted chunk must be told from those).

CRC-32 (zlib, in the standard library) for the chunks: it catches what disks and copies do to
files (truncation, zeroed pages, flipped bits) and is several times faster than sha256 or
blake2b, so a writer that hashes every chunk it writes stays close to its old throughput
(benchmarks/results/checksums.md). It is no defence against someone forging a chunk; nor would
a cryptographic hash be, with the sidecar beside it.

While a cache is being written its checksums go to an append-only log (one JSON line per flush,
fsynced before the progress file counts those chunks), so a killed run resumes with them; the
finished cache folds the log into the sidecar.
"""

from __future__ import annotations

import json
import mmap
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from stores.files import file_sha256, fsync_dir, write_atomic

SIDECAR = "checksums.json"
LOG = "checksums.log"
FORMAT = "exitflow.checksums/1"
ALGORITHM = "crc32"
MAX_LISTED = 3
"""Problems named one by one in a one-line summary; the rest are counted."""


class IntegrityError(RuntimeError):
    """A checksum record is missing or unreadable."""


def crc32_fd(fd: int) -> tuple[int, str]:
    """Size and CRC-32 (8 hex digits) of an open file, read through a memory map (no copy)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return 0, f"{zlib.crc32(b''):08x}"
    with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as m:
        return size, f"{zlib.crc32(m):08x}"


def crc32_file(path: Path) -> tuple[int, str]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return crc32_fd(fd)
    finally:
        os.close(fd)


Entry = tuple[int, str] | None
"""(size, checksum) of a file, or None for a file that is absent on purpose."""


@dataclass
class Sidecar:
    """The checksums of the files of a folder (paths relative to it, with ``/``)."""

    files: dict[str, tuple[int, str]] = field(default_factory=dict)
    absent: set[str] = field(default_factory=set)
    algorithm: str = ALGORITHM

    @classmethod
    def from_entries(cls, entries: dict[str, Entry]) -> Sidecar:
        return cls(files={k: v for k, v in entries.items() if v is not None},
                   absent={k for k, v in entries.items() if v is None})

    def entry(self, rel: str) -> Entry:
        """The record of `rel`; KeyError when the sidecar does not know it."""
        if rel in self.absent:
            return None
        return self.files[rel]

    def write(self, folder: Path) -> None:
        doc = {"format": FORMAT, "algorithm": self.algorithm, "absent": sorted(self.absent),
               "files": {k: list(v) for k, v in sorted(self.files.items())}}
        write_atomic(Path(folder) / SIDECAR, json.dumps(doc, separators=(",", ":")).encode())

    @classmethod
    def read(cls, folder: Path) -> Sidecar:
        path = Path(folder) / SIDECAR
        try:
            doc = json.loads(path.read_text())
            if doc.get("format") != FORMAT or doc.get("algorithm") != ALGORITHM:
                raise ValueError(f"format {doc.get('format')!r} with {doc.get('algorithm')!r}, "
                                 f"expected {FORMAT!r} with {ALGORITHM!r}")
            return cls(files={k: (int(s), str(c)) for k, (s, c) in doc["files"].items()},
                       absent=set(doc["absent"]))
        except FileNotFoundError:
            raise IntegrityError(f"{path} is missing") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise IntegrityError(f"{path} is unreadable ({e})") from None


def check_file(path: Path, rel: str, entry: Entry, *, checksum: bool) -> str | None:
    """What is wrong with file `rel` at `path` against its record (None: nothing). Without
    `checksum` only existence and size are compared (a stat, no read)."""
    if entry is None:
        return f"{rel}: present, but recorded as absent (a chunk of fill values)" if path.exists() else None
    size, digest = entry
    try:
        if not checksum:
            got = path.stat().st_size
            return None if got == size else f"{rel}: {got} bytes, recorded {size}"
        got, got_digest = crc32_file(path)
    except FileNotFoundError:
        return f"{rel}: missing (recorded {size} bytes)"
    if got != size:
        return f"{rel}: {got} bytes, recorded {size}"
    if got_digest != digest:
        return f"{rel}: {ALGORITHM} {got_digest}, recorded {digest}"
    return None


def verify_sidecar(folder: Path, sidecar: Sidecar, prefix: str = "", checksum: bool = True) -> list[str]:
    """Every file the sidecar records: present (or absent, as recorded), size and checksum."""
    folder = Path(folder)
    problems = []
    for rel in sorted(sidecar.files.keys() | sidecar.absent):
        problem = check_file(folder / rel, prefix + rel, sidecar.entry(rel), checksum=checksum)
        if problem:
            problems.append(problem)
    return problems


def check_sha256(path: Path, rel: str, entry: dict, checksum: bool = True) -> str | None:
    """What is wrong with `path` against a manifest record ``{"size", "sha256"}`` (None: nothing);
    without `checksum`, only its existence and size."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{rel}: missing (recorded {entry.get('size')} bytes)"
    if "size" in entry and size != entry["size"]:
        return f"{rel}: {size} bytes, recorded {entry['size']}"
    if checksum and "sha256" in entry and file_sha256(path) != entry["sha256"]:
        return f"{rel}: sha256 differs from the manifest's"
    return None


def summarize(problems: list[str]) -> str:
    shown = "; ".join(problems[:MAX_LISTED])
    return shown + (f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else "")


class ChecksumLog:
    """Append-only record of the checksums of files written so far (one JSON line per batch)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOG

    def load(self) -> dict[str, Entry]:
        """Every entry logged, later lines winning; a torn last line (a kill mid-append) is skipped."""
        out: dict[str, Entry] = {}
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            return out
        for line in lines:
            try:
                batch = json.loads(line)
                out.update({k: (None if v is None else (int(v[0]), str(v[1]))) for k, v in batch.items()})
            except (ValueError, TypeError, IndexError, AttributeError):
                continue
        return out

    def append(self, entries: dict[str, Entry]) -> None:
        """Add `entries` durably: the caller may count those files as written once this returns."""
        new = not self.path.exists()
        line = json.dumps({k: (None if v is None else list(v)) for k, v in entries.items()}, separators=(",", ":"))
        with open(self.path, "ab") as f:
            f.write(b"\n" + line.encode() + b"\n")  # leading newline: ends a torn line a kill left behind
            f.flush()
            os.fsync(f.fileno())
        if new:
            fsync_dir(self.path.parent)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def verify_files(folder: Path, files: dict[str, dict], checksum: bool = True) -> tuple[list[str], list[str]]:
    """Check the files a manifest records (``files``, as :func:`describe_files` wrote them)
    under `folder`: problems, each naming a file, and the folders that could be checked only
    by total size and count (recorded before their files were). Without `checksum` only
    existence and sizes are compared: a stat per file, no reading."""
    problems: list[str] = []
    unverified: list[str] = []
    for name, entry in sorted(files.items()):
        if not name.endswith("/"):
            problems += [p for p in [check_sha256(folder / name, name, entry, checksum)] if p]
            continue
        sub = folder / name.rstrip("/")
        if "contents" not in entry:
            problems += _check_folder_totals(sub, name, entry)
            unverified.append(name)
            continue
        bad = [p for rel, e in sorted(entry["contents"].items())
               if (p := check_sha256(sub / rel, name + rel, e, checksum))]
        problems += bad
        sidecar = entry.get("checksums")
        if sidecar and not any(p.startswith(f"{name}{sidecar}:") for p in bad):
            try:
                problems += verify_sidecar(sub, Sidecar.read(sub), prefix=name, checksum=checksum)
            except IntegrityError as e:
                problems.append(f"{name}{sidecar}: {e}")
    return problems, unverified


def _check_folder_totals(folder: Path, name: str, entry: dict) -> list[str]:
    """The size and file count an older manifest recorded for a folder."""
    if not folder.is_dir():
        return [f"{name}: missing"]
    files = [f for f in folder.rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    if (size, len(files)) != (entry.get("size", size), entry.get("files", len(files))):
        return [f"{name}: {len(files)} files, {size} bytes; recorded {entry.get('files')} files, {entry.get('size')} bytes"]
    return []


def describe_files(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """Every file of an artifact, with its size and sha256. Top-level files are entries; a
    folder is one entry with its total size and file count, and its files under ``contents``,
    except those a sidecar (a cache's chunk checksums, taken while writing) records: a large
    cache is not read a second time here."""
    out: dict[str, dict] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name in skip:
            continue
        if entry.is_file():
            out[entry.name] = {"size": entry.stat().st_size, "sha256": file_sha256(entry)}
        elif entry.is_dir():
            sidecar = Sidecar.read(entry) if (entry / SIDECAR).is_file() else None
            covered = (sidecar.files.keys() | sidecar.absent) if sidecar else set()
            contents, size, count = {}, 0, 0
            for f in sorted(entry.rglob("*")):
                if not f.is_file():
                    continue
                rel, n = f.relative_to(entry).as_posix(), f.stat().st_size
                size, count = size + n, count + 1
                if rel not in covered:
                    contents[rel] = {"size": n, "sha256": file_sha256(f)}
            out[entry.name + "/"] = {"size": size, "files": count, "contents": contents,
                                     **({"checksums": SIDECAR} if sidecar else {})}
    return out
