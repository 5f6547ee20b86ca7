"""Hidden-state cache: a zarr v3 group of per-token rows, written once, read many times.

The backbone is frozen, so its hidden states are computed once and every exit head and gate
trains from this cache instead. Layout of the group folder:

- ``layer_<l>`` and ``final``: ``[num_tokens, hidden]`` hidden states in the storage dtype
  (float16; bfloat16 as raw ``uint16`` bits, since zarr 3 has no bfloat16; or int8 with a
  per-row float32 scale in ``<name>.scale``).
- ``input_ids``, ``targets``, ``doc_ids``, ``positions``: ``[num_tokens]`` int32 columns.
- group attributes: ``schema`` (a :class:`CacheSchema`) and ``attrs`` (the caller's dict,
  with the content ``key`` that says which inputs produced the cache).
- ``progress.json``: rows durably written. It is replaced atomically and only after the
  chunks it counts are on disk, so a killed run resumes at a chunk boundary and rewrites
  whatever was in flight.

Arrays are preallocated and written in whole, aligned chunks without compression: appending
piecemeal rewrites the last chunk each time, and float16 activations barely compress
(see NOTES.md, "zarr, measured").
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from pipeline.sources import layer_key
from stores.files import write_atomic

log = logging.getLogger(__name__)

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


# ----------------------------------------------------------------------------- progress file


def _read_progress(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / PROGRESS_FILE).read_text())
    except FileNotFoundError:
        return None


def _write_progress(path: Path, rows_done: int, num_tokens: int, complete: bool) -> None:
    doc = {"rows_done": rows_done, "num_tokens": num_tokens, "complete": complete}
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


# ----------------------------------------------------------------------------- writer


class CacheWriter:
    """Appends rows into a preallocated cache and resumes an interrupted one.

    Usage: ``with CacheWriter(path, schema, {"key": key}) as w:`` skip the first
    ``w.rows_done`` rows of the input, ``w.append(...)`` the rest, then ``w.finish()``.
    Rows buffered but not yet written as a whole chunk are lost if the process dies; they
    are not counted in ``rows_done``.
    """

    def __init__(self, path: Path, schema: CacheSchema, attrs: dict):
        self.path = Path(path)
        self.schema = schema
        self.attrs = dict(attrs)
        try:
            json.dumps(self.attrs)
        except TypeError as e:
            raise CacheError(f"cache attrs for {self.path} must be JSON-serialisable: {e}") from None
        self._closed = False
        self._finished = False
        self._buffer: dict[str, list[np.ndarray]] = {n: [] for n in schema._stored_arrays()}
        self._buffered = 0
        if (self.path / "zarr.json").exists():
            self._group = zarr.open_group(store=str(self.path), mode="r+")
            self._rows_done = self._resume()
        else:
            if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
                raise CacheError(
                    f"{self.path} exists and is not a hidden-state cache; delete it or choose another cache root"
                )
            self._group = zarr.open_group(store=str(self.path), mode="w")
            self._create()
            self._rows_done = 0
        self._arrays = {n: self._group[n] for n in schema._stored_arrays()}
        progress = _read_progress(self.path) or {}
        self._finished = self._rows_done == schema.num_tokens and bool(progress.get("complete"))

    # -- creation and resume

    def _create(self) -> None:
        s = self.schema
        for name in s._stored_arrays():
            if name in COLUMNS or name.endswith(".scale"):
                shape, chunks = (s.num_tokens,), (s.chunk_rows,)
                dtype = np.dtype("int32") if name in COLUMNS else np.dtype("float32")
                attributes: dict[str, Any] = {}
            else:
                shape, chunks = (s.num_tokens, s.hidden_size), (s.chunk_rows, s.hidden_size)
                dtype = _STORED_DTYPE[s.storage_dtype]
                attributes = {"logical_dtype": s.storage_dtype}
                if s.storage_dtype == "bfloat16":
                    attributes["encoding"] = "raw bfloat16 bits as uint16 (zarr 3 has no bfloat16)"
                if s.storage_dtype == "int8":
                    attributes["encoding"] = f"value = q * {name}.scale[row]"
            self._group.create_array(
                name, shape=shape, chunks=chunks, dtype=dtype, compressors=None, fill_value=0,
                attributes=attributes, overwrite=True,
                chunk_key_encoding={"name": "default", "separator": "/"},  # _fsync_chunks relies on it
            )
        # identity last: a folder without it is an interrupted creation and is simply redone
        self._group.update_attributes({"format": FORMAT, "schema": s.to_dict(), "attrs": self.attrs})
        _write_progress(self.path, 0, s.num_tokens, complete=False)

    def _resume(self) -> int:
        stored = self._group.attrs.asdict()
        progress = _read_progress(self.path)
        if "schema" not in stored:
            foreign = {p.name for p in self.path.iterdir()} - {"zarr.json", *self.schema._stored_arrays()}
            if progress is not None or foreign or stored.get("format") not in (None, FORMAT):
                raise CacheError(f"{self.path} holds a zarr group that is not a hidden-state cache; "
                                 "delete it or choose another cache root")
            log.info("cache %s: creation was interrupted; creating it again", self.path)
            self._create()
            return 0
        theirs = CacheSchema.from_dict(stored["schema"])
        their_key, our_key = stored.get("attrs", {}).get("key"), self.attrs.get("key")
        if their_key != our_key or theirs != self.schema:
            diffs = [f"{k}: stored {v!r}, this run {getattr(self.schema, k)!r}"
                     for k, v in asdict(theirs).items() if v != getattr(self.schema, k)]
            raise CacheMismatchError(
                f"{self.path} belongs to other inputs: stored key {their_key!r}, this run's key {our_key!r}"
                + (f"; schema differs ({'; '.join(diffs)})" if diffs else "")
                + ". Delete the folder or use another cache root."
            )
        for name in self.schema._stored_arrays():
            if name not in self._group:
                raise CacheError(f"{self.path} lacks array {name!r}; the cache is damaged, delete the folder")
        rows_done = int((progress or {}).get("rows_done", 0))
        if rows_done % self.schema.chunk_rows and rows_done != self.schema.num_tokens:
            raise CacheError(f"{self.path}/{PROGRESS_FILE} says rows_done={rows_done}, not a chunk boundary "
                             f"(chunk_rows={self.schema.chunk_rows}); the cache is damaged, delete the folder")
        # chunk files are written to `<key>.<uuid>.partial` and renamed; a kill leaves these behind
        for leftover in self.path.rglob("*.partial"):
            leftover.unlink(missing_ok=True)
        if rows_done:
            log.info("cache %s: resuming at row %d of %d", self.path, rows_done, self.schema.num_tokens)
        return rows_done

    # -- writing

    @property
    def rows_done(self) -> int:
        """Rows durably written: a multiple of chunk_rows, or num_tokens once finished."""
        return self._rows_done

    def append(self, rows: dict[str, np.ndarray | torch.Tensor]) -> None:
        if self._closed or self._finished:
            raise CacheError(f"cache {self.path} is {'finished' if self._finished else 'closed'}; cannot append")
        expected = set(self.schema.hidden_arrays()) | set(COLUMNS)
        if set(rows) != expected:
            missing, extra = sorted(expected - set(rows)), sorted(set(rows) - expected)
            raise CacheError(f"append to {self.path}: missing {missing}, unexpected {extra}; "
                             f"give exactly {sorted(expected)}")
        n = None
        for name in sorted(rows):
            shape = tuple(rows[name].shape)
            want = (shape[0] if shape else None,) + ((self.schema.hidden_size,) if name not in COLUMNS else ())
            if shape != want or (n is not None and shape[0] != n):
                raise CacheError(
                    f"append to {self.path}: {name!r} has shape {shape}; expected "
                    f"[n, {self.schema.hidden_size}] for hidden arrays and [n] for columns, same n for all"
                )
            n = shape[0]
        assert n is not None
        end = self._rows_done + self._buffered + n
        if end > self.schema.num_tokens:
            raise CacheError(f"append to {self.path}: {end} rows would exceed num_tokens={self.schema.num_tokens}")
        encoded: dict[str, np.ndarray] = {}
        for name in self.schema.hidden_arrays():
            encoded.update(_encode_hidden(name, rows[name], self.schema.storage_dtype))
        for name in COLUMNS:
            encoded[name] = _encode_column(name, rows[name])
        for name, a in encoded.items():  # only after every check passed: a failed append buffers nothing
            self._buffer[name].append(a)
        self._buffered += n
        if self._buffered >= self.schema.chunk_rows:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        """Write every whole buffered chunk (or everything, at the end), then record progress."""
        cr = self.schema.chunk_rows
        n_write = self._buffered if final else (self._buffered // cr) * cr
        if n_write == 0:
            return
        start, stop = self._rows_done, self._rows_done + n_write
        for name, parts in self._buffer.items():
            data = parts[0] if len(parts) == 1 else np.concatenate(parts)
            self._arrays[name][start:stop] = data[:n_write]  # aligned region: whole chunks only
            rest = data[n_write:]
            self._buffer[name] = [rest] if len(rest) else []
        self._buffered -= n_write
        self._fsync_chunks(start, stop)
        self._rows_done = stop
        _write_progress(self.path, stop, self.schema.num_tokens, complete=False)

    def _fsync_chunks(self, start: int, stop: int) -> None:
        """Flush the chunk files of rows [start, stop) to disk, so that progress never counts
        rows a power cut could still lose. (A killed process loses nothing already written.)"""
        cr = self.schema.chunk_rows
        for name in self._buffer:
            for i in range(start // cr, -(-stop // cr)):
                key = self.path / name / "c" / str(i)
                if name not in COLUMNS and not name.endswith(".scale"):
                    key = key / "0"
                try:
                    fd = os.open(key, os.O_RDONLY)
                except FileNotFoundError:  # an all-zero chunk is not stored (reads as the fill value)
                    continue
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def finish(self) -> None:
        if self._finished:
            return
        if self._closed:
            raise CacheError(f"cache {self.path} is closed; cannot finish")
        total = self._rows_done + self._buffered
        if total != self.schema.num_tokens:
            raise CacheError(f"cache {self.path}: got {total} rows, schema says num_tokens={self.schema.num_tokens}; "
                             "the extraction produced a different token count than planned")
        self._flush(final=True)
        _write_progress(self.path, self._rows_done, self.schema.num_tokens, complete=True)
        self._finished = True

    def close(self) -> None:
        if self._buffered and not self._finished:
            log.debug("cache %s: closing with %d unwritten buffered rows", self.path, self._buffered)
        self._closed = True

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- reader


class CacheReader:
    """Reads a finished cache: whole arrays, row selections, or shuffled batches of whole chunks."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            raise CacheError(f"{self.path} is not a hidden-state cache (no zarr group); run the extract stage first")
        group = zarr.open_group(store=str(self.path), mode="r")
        stored = group.attrs.asdict()
        progress = _read_progress(self.path)
        if "schema" not in stored or not progress or not progress.get("complete"):
            done = (progress or {}).get("rows_done", 0)
            raise CacheError(f"cache {self.path} is incomplete ({done} rows written); "
                             "re-run the extract stage to finish it")
        self.schema = CacheSchema.from_dict(stored["schema"])
        self.attrs: dict = dict(stored.get("attrs", {}))
        self.num_tokens = self.schema.num_tokens
        self.hidden_size = self.schema.hidden_size
        self.layers = self.schema.layers
        self._arrays = {n: group[n] for n in self.schema._stored_arrays()}

    # -- random access

    def _check(self, name: str, kind: str) -> None:
        names = self.schema.hidden_arrays() if kind == "hidden" else list(COLUMNS)
        if name not in names:
            raise CacheError(f"cache {self.path} has no {kind} array {name!r}; available: {', '.join(names)}")

    def _read(self, name: str, rows: slice | np.ndarray | None) -> np.ndarray:
        arr = self._arrays[name]
        if rows is None:
            return arr[:]
        if isinstance(rows, slice):
            return arr[rows]
        return arr.oindex[np.asarray(rows)]

    def hidden(self, name: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """Decoded float32 [n, hidden]."""
        self._check(name, "hidden")
        scale = self._read(f"{name}.scale", rows) if self.schema.storage_dtype == "int8" else None
        return _decode_hidden(self.schema.storage_dtype, self._read(name, rows), scale)

    def column(self, name: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """int32 [n]."""
        self._check(name, "column")
        return self._read(name, rows)

    # -- batches

    def num_batches(self, batch_rows: int, drop_last: bool = False) -> int:
        return self.num_tokens // batch_rows if drop_last else -(-self.num_tokens // batch_rows)

    def _load(self, names: Sequence[str], rows: slice | np.ndarray) -> dict[str, np.ndarray]:
        return {n: self.column(n, rows) if n in COLUMNS else self.hidden(n, rows) for n in names}

    def iter_batches(
        self,
        names: Sequence[str],
        batch_rows: int,
        *,
        shuffle: bool = True,
        buffer_chunks: int = 4,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
        start_batch: int = 0,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Yield {name: rows} batches; every row exactly once per epoch (but the last, with drop_last).

        Shuffling never reads a random row: chunk order is permuted, `buffer_chunks` whole
        chunks are loaded (one contiguous read per chunk per array), rows are permuted inside
        that buffer, and the rows short of a whole batch carry over into the next buffer.
        The plan is computed on row indices, so `start_batch` skips buffers without reading them.
        """
        want_row = ROW in names  # pseudo-column: the global row index, for labels kept beside the cache
        names = [n for n in names if n != ROW]
        for n in names:
            self._check(n, "column" if n in COLUMNS else "hidden")
        if batch_rows <= 0 or buffer_chunks <= 0:
            raise CacheError(f"batch_rows={batch_rows} and buffer_chunks={buffer_chunks} must be positive")
        cr, total = self.schema.chunk_rows, self.num_tokens
        rng = np.random.default_rng([seed, epoch]) if shuffle else None
        order = rng.permutation(self.schema.num_chunks) if rng is not None else np.arange(self.schema.num_chunks)

        carry_idx = np.empty(0, dtype=np.int64)  # global rows short of a batch, in yield order
        carry: dict[str, np.ndarray] | None = {}  # their data; None while skipped (not loaded)
        batch_no = 0
        for g in range(0, len(order), buffer_chunks):
            chunks = order[g : g + buffer_chunks]
            ranges = [(int(c) * cr, min((int(c) + 1) * cr, total)) for c in chunks]
            buf_idx = np.concatenate([carry_idx] + [np.arange(a, b, dtype=np.int64) for a, b in ranges])
            perm = rng.permutation(len(buf_idx)) if rng is not None else np.arange(len(buf_idx))
            n_full = len(buf_idx) // batch_rows
            rest = perm[n_full * batch_rows :]
            if batch_no + n_full <= start_batch:  # every batch of this buffer is skipped
                carry_idx, carry, batch_no = buf_idx[rest], None, batch_no + n_full
                continue
            if carry is None:  # resuming: fetch the carried rows once (sorted, chunk-grouped reads)
                carry = self._gather(names, carry_idx)
            buf = self._fill_buffer(names, len(buf_idx), carry if len(carry_idx) else None, ranges)
            for j in range(n_full):
                if batch_no >= start_batch:
                    sel = perm[j * batch_rows : (j + 1) * batch_rows]
                    batch = {n: buf[n][sel] for n in names}
                    if want_row:
                        batch[ROW] = buf_idx[sel]
                    yield batch
                batch_no += 1
            carry_idx, carry = buf_idx[rest], {n: buf[n][rest] for n in names}
        if len(carry_idx) and not drop_last and batch_no >= start_batch:
            batch = carry if carry is not None else self._gather(names, carry_idx)
            if want_row:
                batch = {**batch, ROW: carry_idx}
            yield batch

    def _fill_buffer(self, names: Sequence[str], size: int, carry: dict[str, np.ndarray] | None,
                     ranges: list[tuple[int, int]]) -> dict[str, np.ndarray]:
        """Carried rows, then each chunk decoded in place: one contiguous read per chunk per array."""
        buf = {}
        for n in names:
            is_col = n in COLUMNS
            out = np.empty((size,) if is_col else (size, self.hidden_size), np.int32 if is_col else np.float32)
            off = 0
            if carry is not None:
                out[: len(carry[n])] = carry[n]
                off = len(carry[n])
            for a, b in ranges:
                out[off : off + b - a] = self.column(n, slice(a, b)) if is_col else self.hidden(n, slice(a, b))
                off += b - a
            buf[n] = out
        return buf

    def _gather(self, names: Sequence[str], idx: np.ndarray) -> dict[str, np.ndarray]:
        """Rows `idx` in the given order, read in sorted order."""
        if not len(idx):
            return {n: np.empty((0,), np.int32) if n in COLUMNS else np.empty((0, self.hidden_size), np.float32)
                    for n in names}
        order = np.argsort(idx, kind="stable")
        data = self._load(names, idx[order])
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return {n: d[inverse] for n, d in data.items()}
