"""What a hidden-state cache holds on disk: its schema, the encodings of its rows, its progress
file and the names of its chunk files. :mod:`stores.cache` writes and reads caches with these.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.sources import layer_key
from stores.files import write_atomic
from stores.integrity import SIDECAR, ChecksumLog, Sidecar, check_file, crc32_fd

ROW = "row"
"""Pseudo-column accepted by `CacheReader.iter_batches`: the int64 global row index of each row."""
COLUMNS = ("input_ids", "targets", "doc_ids", "positions")
"""Per-token int32 columns stored beside the hidden states."""

STORAGE_DTYPES = ("float16", "bfloat16", "int8")
PROGRESS_FILE = "progress.json"
FORMAT = "exitflow.cache/1"
_FLOAT16_MAX = 65504.0
_INT8_MAX = 127
_STORED_DTYPE = {"float16": np.dtype("float16"), "bfloat16": np.dtype("uint16"), "int8": np.dtype("int8")}


class CacheError(RuntimeError):
    """The cache folder cannot be used as asked; the message names the path and the fix."""


class CacheMismatchError(CacheError):
    """An existing cache folder was written for other inputs (another key or schema)."""


class NonFiniteError(CacheError):
    """Hidden states hold NaN/inf, or would after the cast to the storage dtype."""


class CacheCorrupt(CacheError):
    """A file of a finished cache is missing, truncated or changed since it was written."""


@dataclass(frozen=True)
class CacheSchema:
    """Shape and encoding of one cache; stored in the group attributes and checked on resume."""

    num_tokens: int
    """Rows in every array (tokens of the split that was extracted)."""
    hidden_size: int
    """Width of every hidden-state row."""
    layers: tuple[int, ...]
    """Exit layers; each has an array ``layer_<l>``. The final-norm state is always stored as ``final``."""
    storage_dtype: str
    """``float16`` | ``bfloat16`` (stored as uint16 bits) | ``int8`` (per-row absmax scale)."""
    chunk_rows: int
    """Rows per zarr chunk; a whole number of sequences, about 4096, so resumes land on sequence boundaries."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(layer) for layer in self.layers))
        problems = []
        if not isinstance(self.num_tokens, (int, np.integer)) or self.num_tokens <= 0:
            problems.append(f"num_tokens={self.num_tokens!r} must be a positive int")
        if not isinstance(self.hidden_size, (int, np.integer)) or self.hidden_size <= 0:
            problems.append(f"hidden_size={self.hidden_size!r} must be a positive int")
        if not isinstance(self.chunk_rows, (int, np.integer)) or self.chunk_rows <= 0:
            problems.append(f"chunk_rows={self.chunk_rows!r} must be a positive int (a multiple of seq_len, ~4096)")
        if len(set(self.layers)) != len(self.layers):
            problems.append(f"layers={self.layers} has duplicates")
        if self.storage_dtype not in STORAGE_DTYPES:
            problems.append(f"storage_dtype={self.storage_dtype!r} must be one of {', '.join(STORAGE_DTYPES)}")
        if problems:
            raise CacheError("invalid CacheSchema:\n  - " + "\n  - ".join(problems))

    def hidden_arrays(self) -> list[str]:
        return [layer_key(layer) for layer in self.layers] + ["final"]

    def bytes_per_token_per_layer(self) -> float:
        if self.storage_dtype == "int8":
            return float(self.hidden_size + 4)  # int8 row + float32 scale
        return float(2 * self.hidden_size)

    @property
    def num_chunks(self) -> int:
        return -(-self.num_tokens // self.chunk_rows)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CacheSchema:
        return cls(
            num_tokens=int(d["num_tokens"]),
            hidden_size=int(d["hidden_size"]),
            layers=tuple(d["layers"]),
            storage_dtype=str(d["storage_dtype"]),
            chunk_rows=int(d["chunk_rows"]),
        )

    def _stored_arrays(self) -> list[str]:
        """Every zarr array of the group: hidden arrays, their int8 scales, then the columns."""
        names = self.hidden_arrays()
        if self.storage_dtype == "int8":
            names = names + [f"{n}.scale" for n in self.hidden_arrays()]
        return names + list(COLUMNS)

    def chunk_file(self, name: str, index: int) -> str:
        """The chunk file of array `name` holding chunk `index`, relative to the group folder
        (chunk keys use the ``/`` separator: ``c/<i>`` for columns, ``c/<i>/0`` for rows)."""
        return f"{name}/c/{index}" if _is_1d(name) else f"{name}/c/{index}/0"

    def chunk_bytes(self, name: str) -> int:
        """Size of every chunk file of array `name`: chunks are stored uncompressed and whole
        (the last one padded with the fill value)."""
        if _is_1d(name):
            return self.chunk_rows * 4  # int32 columns, float32 scales
        return self.chunk_rows * self.hidden_size * _STORED_DTYPE[self.storage_dtype].itemsize

    def chunks_of(self, rows: slice | np.ndarray | None) -> range | list[int]:
        """Indices of the chunks holding `rows` (all of them for None)."""
        cr = self.chunk_rows
        if rows is None:
            return range(self.num_chunks)
        if isinstance(rows, slice):
            start, stop, _ = rows.indices(self.num_tokens)
            return range(start // cr, -(-stop // cr))
        return np.unique(np.asarray(rows) // cr).tolist()

    def chunk_files(self) -> list[tuple[str, int, str]]:
        """(array, chunk index, file) of every chunk of the cache."""
        return [(n, i, self.chunk_file(n, i)) for n in self._stored_arrays() for i in range(self.num_chunks)]


def _is_1d(name: str) -> bool:
    return name in COLUMNS or name.endswith(".scale")


# ----------------------------------------------------------------------------- progress file


def _read_progress(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((path / PROGRESS_FILE).read_text())
        if not isinstance(doc, dict):
            raise ValueError(f"holds a {type(doc).__name__}, not an object")
        return doc
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # it is written atomically: only damage after the fact gets here
        raise CacheCorrupt(f"{path / PROGRESS_FILE} is unreadable ({e}); the cache is damaged: delete it "
                           "(its artifact, or the staging folder) and run the extract stage again") from None


def _write_progress(path: Path, rows_done: int, num_tokens: int, complete: bool, checksums: str | None = None) -> None:
    """`checksums`: the sidecar of a finished cache (its readers verify every chunk against it)."""
    doc: dict[str, Any] = {"rows_done": rows_done, "num_tokens": num_tokens, "complete": complete}
    if checksums:
        doc["checksums"] = checksums
    write_atomic(path / PROGRESS_FILE, json.dumps(doc).encode())


# ----------------------------------------------------------------------------- encoding


def _non_finite_message(name: str, bad: int, maxabs: float, what: str, fix: str) -> str:
    return f"hidden array {name!r}: {bad} {what} (max |value| seen {maxabs:.6g}). {fix}"


def _to_float32(name: str, x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Rows as a float32 numpy array. Encoding runs in numpy: on a 2-thread CPU torch's
    elementwise kernels were 10-100x slower here than numpy's (thread start-up per op)."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
        if t.device.type != "cpu":  # widen on the device: the copy is cheap, numpy has no bfloat16
            t = t.to(torch.float32).cpu()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: widen the bits
            return (t.contiguous().view(torch.int16).numpy().view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        if not t.is_floating_point():
            raise CacheError(f"hidden array {name!r} has dtype {t.dtype}; pass float32/float16/bfloat16 rows")
        x = t.numpy()
    a = np.asarray(x)
    if a.dtype.kind != "f":
        raise CacheError(f"hidden array {name!r} has dtype {a.dtype}; pass float32/float16/bfloat16 rows")
    return a.astype(np.float32, copy=False)


def _absmax(x: np.ndarray) -> float:
    """max |x|; NaN if any NaN, inf if any inf. Two reductions, no temporary array."""
    return float(max(x.max(), -x.min())) if x.size else 0.0


def _encode_hidden(name: str, x: np.ndarray | torch.Tensor, storage_dtype: str) -> dict[str, np.ndarray]:
    """[n, hidden] float rows -> stored arrays ({name: ..., and name.scale for int8})."""
    xf = _to_float32(name, x)  # [n, hidden]
    m = _absmax(xf)
    if not np.isfinite(m):
        finite = np.isfinite(xf)
        raise NonFiniteError(_non_finite_message(
            name, int((~finite).sum()), _absmax(xf[finite]), "NaN/inf values came out of the backbone",
            "The cache would be garbage. If the backbone runs in float16, run it in float32 or "
            "bfloat16 (`model.dtype=float32`); storing wider does not help here, the values "
            "are already broken before `extract.storage_dtype=bfloat16` could apply.",
        ))
    if storage_dtype == "float16":
        with np.errstate(over="ignore"):  # overflow is counted below, with a better message
            h = xf.astype(np.float16)  # [n, hidden]
        if m > _FLOAT16_MAX:  # only values past the max can round to inf; count exactly on the cast
            bad = int(((h.view(np.uint16) & 0x7C00) == 0x7C00).sum())
            if bad:
                raise NonFiniteError(_non_finite_message(
                    name, bad, m, f"values overflow float16 (max {_FLOAT16_MAX:g}) when cast",
                    "Some models carry activations beyond the float16 range on a few dimensions; store "
                    "bfloat16 instead: `extract.storage_dtype=bfloat16` (or int8).",
                ))
        return {name: h}
    if storage_dtype == "bfloat16":
        u = xf.view(np.uint32)
        # round to nearest even, as torch's float32 -> bfloat16 cast does for finite values
        b = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)  # [n, hidden]
        bad = int(((b & 0x7F80) == 0x7F80).sum())
        if bad:
            raise NonFiniteError(_non_finite_message(
                name, bad, m, "values overflow bfloat16 when cast",
                "Store int8 with a per-row scale instead: `extract.storage_dtype=int8`.",
            ))
        return {name: b}
    # int8: per-row absmax scale, so one outlier dimension costs precision only in its own row
    absmax = np.abs(xf).max(axis=1)  # [n]
    scale = np.where(absmax > 0, absmax / _INT8_MAX, 1.0).astype(np.float32)  # [n]
    q = np.clip(np.rint(xf / scale[:, None]), -_INT8_MAX, _INT8_MAX).astype(np.int8)  # [n, hidden]
    return {name: q, f"{name}.scale": scale}


def _encode_column(name: str, x: np.ndarray | torch.Tensor) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim != 1:
        raise CacheError(f"column {name!r} has shape {a.shape}; pass one int per row, shape [n]")
    if a.dtype.kind not in "iub":
        raise CacheError(f"column {name!r} has dtype {a.dtype}; pass integers")
    if a.size and a.dtype.itemsize > 4 and (a.min() < np.iinfo(np.int32).min or a.max() > np.iinfo(np.int32).max):
        raise CacheError(f"column {name!r} holds values outside int32 ({a.min()}..{a.max()})")
    return a.astype(np.int32, copy=False)


def _decode_hidden(storage_dtype: str, raw: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """Stored rows -> float32 [n, hidden]."""
    if storage_dtype == "float16":
        return raw.astype(np.float32)
    if storage_dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32) * scale[:, None]


def chunk_problems(path: Path, schema: CacheSchema, sidecar: Sidecar | None) -> list[str]:
    """Chunk files of the cache at `path` that are missing or have another size than recorded
    (a stat each). Without a `sidecar` (a cache from before checksums) only files that exist
    are checked, against the size every chunk has: a missing one may be all fill value."""
    problems = []
    for name, _, rel in schema.chunk_files():
        if sidecar is None:
            try:
                size = (path / rel).stat().st_size
            except FileNotFoundError:
                continue
            problem = f"{rel}: {size} bytes, a chunk has {schema.chunk_bytes(name)}" \
                if size != schema.chunk_bytes(name) else None
        elif rel in sidecar.files or rel in sidecar.absent:
            problem = check_file(path / rel, rel, sidecar.entry(rel), checksum=False)
        else:
            problem = f"{rel}: no checksum recorded in {SIDECAR}"
        if problem:
            problems.append(problem)
    return problems


def chunk_checksum(path: Path, rel: str, sync: bool = False) -> tuple[int, str] | None:
    """Size and checksum of chunk file `rel` of the cache at `path` (fsynced first with `sync`),
    None when zarr did not store it (all fill value). Right after a write the bytes are in the
    page cache."""
    try:
        fd = os.open(path / rel, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        if sync:
            os.fsync(fd)
        return crc32_fd(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- shard records
# A sharded extraction writes disjoint, chunk-aligned row ranges of one cache from several
# processes. Each range keeps its own progress file and checksum log beside the cache's, so it
# resumes alone; whoever finishes the cache folds them into progress.json and checksums.json
# and removes them, so a finished cache looks the same however it was written.

SHARD_PROGRESS = "progress.shard-{start}-{stop}.json"
SHARD_LOG = "checksums.shard-{start}-{stop}.log"


class NamedChecksumLog(ChecksumLog):
    """A checksum log under another name than the cache's own (one per shard)."""

    def __init__(self, folder: Path, name: str):
        self.path = Path(folder) / name


@dataclass(frozen=True)
class DoneRange:
    """Rows [start, start + rows_done) a progress record counts as durably written, and the
    checksum log that holds their chunks' checksums."""

    start: int
    rows_done: int
    log: ChecksumLog

    @property
    def stop(self) -> int:
        return self.start + self.rows_done


def shard_files(path: Path) -> list[Path]:
    """Every shard progress file and shard checksum log of the cache at `path`."""
    return sorted([*path.glob("progress.shard-*.json"), *path.glob("checksums.shard-*.log")])


def done_ranges(path: Path) -> list[DoneRange]:
    """What the cache's own progress file and every shard's progress file count as written."""
    out = []
    progress = _read_progress(path)
    if progress:
        out.append(DoneRange(0, int(progress.get("rows_done", 0)), ChecksumLog(path)))
    for p in path.glob("progress.shard-*.json"):
        doc = _read_json(p)
        start, stop = int(doc["start"]), int(doc["stop"])
        out.append(DoneRange(start, int(doc["rows_done"]),
                             NamedChecksumLog(path, SHARD_LOG.format(start=start, stop=stop))))
    return out


def done_from(ranges: list[DoneRange], start: int) -> int:
    """Rows written without a gap from row `start` on, by any record (an aligned chunk boundary:
    every record counts whole chunks, or runs to the end of the cache)."""
    end, grew = start, True
    while grew:
        grew = False
        for r in ranges:
            if r.start <= end < r.stop:
                end, grew = r.stop, True
    return end - start


def logged_sums(ranges: list[DoneRange], schema: CacheSchema) -> dict[str, tuple[int, str] | None]:
    """The logged checksum of every chunk some record counts, from that record's own log (the
    cache's own log wins where several count a chunk: its entry is the newest)."""
    out: dict[str, tuple[int, str] | None] = {}
    cr = schema.chunk_rows
    for r in sorted(ranges, key=lambda r: isinstance(r.log, NamedChecksumLog), reverse=True):
        counted = range(r.start // cr, -(-r.stop // cr))
        logged = r.log.load()
        for name in schema._stored_arrays():
            for i in counted:
                rel = schema.chunk_file(name, i)
                if rel in logged:
                    out[rel] = logged[rel]
    return out


def write_shard_progress(path: Path, start: int, stop: int, rows_done: int, complete: bool) -> None:
    doc = {"start": start, "stop": stop, "rows_done": rows_done, "complete": complete}
    write_atomic(path / SHARD_PROGRESS.format(start=start, stop=stop), json.dumps(doc).encode())


def _read_json(p: Path) -> dict[str, Any]:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:  # written atomically: only damage after the fact gets here
        raise CacheCorrupt(f"{p} is unreadable ({e}); delete the staging folder and run the extract stage "
                           "again") from None
