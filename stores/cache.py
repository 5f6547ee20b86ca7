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
- ``checksums.json``: size and CRC-32 of every chunk file (or that it holds only fill values and
  is not stored), taken by the writer as it flushes each chunk (``checksums.log`` until the
  cache is finished; see :mod:`stores.integrity`). A reader checks at open that every chunk file
  is there with its size, and each chunk's checksum the first time it reads it, so a deleted or
  damaged chunk stops the stage instead of reading as zeros.

Arrays are preallocated and written in whole, aligned chunks without compression: appending
piecemeal rewrites the last chunk each time, and float16 activations barely compress
(see NOTES.md, "zarr, measured").
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from stores.cache_format import (  # noqa: F401  (the public names of a cache live here too)
    _STORED_DTYPE, COLUMNS, FORMAT, PROGRESS_FILE, ROW, STORAGE_DTYPES, CacheCorrupt, CacheError,
    CacheMismatchError, CacheSchema, NonFiniteError, _decode_hidden, _encode_column, _encode_hidden,
    _read_progress, _write_progress, chunk_checksum, chunk_problems, done_from, done_ranges, logged_sums,
    shard_files,
)
from stores.integrity import SIDECAR, ChecksumLog, Entry, IntegrityError, Sidecar, check_file, summarize

log = logging.getLogger(__name__)
_warned_unverifiable: set[str] = set()

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
        self._sealed = self._finished and bool(progress.get("checksums"))
        self._log = ChecksumLog(self.path)
        self._sums: dict[str, Entry] = {} if self._sealed else self._recover_sums()

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
                chunk_key_encoding={"name": "default", "separator": "/"},  # CacheSchema.chunk_file relies on it
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
        self._check_identity(stored)
        for name in self.schema._stored_arrays():
            if name not in self._group:
                raise CacheError(f"{self.path} lacks array {name!r}; the cache is damaged, delete the folder")
        # rows any shard of a sharded run wrote count too, as far as they join without a gap
        rows_done = max(int((progress or {}).get("rows_done", 0)), done_from(done_ranges(self.path), 0))
        if rows_done % self.schema.chunk_rows and rows_done != self.schema.num_tokens:
            raise CacheError(f"{self.path}/{PROGRESS_FILE} says rows_done={rows_done}, not a chunk boundary "
                             f"(chunk_rows={self.schema.chunk_rows}); the cache is damaged, delete the folder")
        # chunk files are written to `<key>.<uuid>.partial` and renamed; a kill leaves these behind
        for leftover in self.path.rglob("*.partial"):
            leftover.unlink(missing_ok=True)
        if rows_done:
            log.info("cache %s: resuming at row %d of %d", self.path, rows_done, self.schema.num_tokens)
        return rows_done

    def _check_identity(self, stored: dict) -> None:
        """The folder was created for this run's key and schema; else CacheMismatchError."""
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

    def _recover_sums(self) -> dict[str, Entry]:
        """The checksums of the chunks `rows_done` counts: from the log, else (a staging cache
        from before checksums were kept, or a log lost to a power cut) from the files."""
        if not self._rows_done:
            self._log.remove()
            return {}
        logged = logged_sums(done_ranges(self.path), self.schema)  # this cache's log and its shards'
        done = -(-self._rows_done // self.schema.chunk_rows)
        return {rel: logged[rel] if rel in logged else chunk_checksum(self.path, rel)
                for _, i, rel in self.schema.chunk_files() if i < done}

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
        if end > self._rows_total:
            raise CacheError(f"append to {self.path}: {end} rows would exceed {self._holds}")
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
        start, stop = self._row0 + self._rows_done, self._row0 + self._rows_done + n_write
        for name, parts in self._buffer.items():
            data = parts[0] if len(parts) == 1 else np.concatenate(parts)
            self._arrays[name][start:stop] = data[:n_write]  # aligned region: whole chunks only
            rest = data[n_write:]
            self._buffer[name] = [rest] if len(rest) else []
        self._buffered -= n_write
        self._sync_chunks(start, stop)
        self._rows_done += n_write
        self._save_progress(complete=False)

    _row0 = 0
    """Row of the cache where this writer's rows begin (a shard's start)."""

    @property
    def _rows_total(self) -> int:
        """Rows this writer writes: the whole cache (a shard writer: its range)."""
        return self.schema.num_tokens

    @property
    def _holds(self) -> str:
        """The rows this writer holds, for messages."""
        return f"num_tokens={self.schema.num_tokens}"

    def _save_progress(self, complete: bool) -> None:
        _write_progress(self.path, self._rows_done, self.schema.num_tokens, complete=complete)

    def _sync_chunks(self, start: int, stop: int) -> None:
        """Flush the chunk files of rows [start, stop) to disk and log their checksums durably,
        so that progress never counts rows a power cut could still lose, or rows without a
        checksum. (A killed process loses nothing already written.)"""
        cr = self.schema.chunk_rows
        entries = {rel: chunk_checksum(self.path, rel, sync=True)
                   for name in self._buffer for i in range(start // cr, -(-stop // cr))
                   for rel in [self.schema.chunk_file(name, i)]}
        self._log.append(entries)
        self._sums.update(entries)

    def finish(self) -> None:
        if self._finished:
            if not self._sealed:
                self._seal()
            self._remove_shard_files()  # a kill right after sealing may have left them
            return
        if self._closed:
            raise CacheError(f"cache {self.path} is closed; cannot finish")
        total = self._rows_done + self._buffered
        if total != self._rows_total:
            raise CacheError(f"cache {self.path}: got {total} rows, expected {self._holds}; "
                             "the extraction produced a different token count than planned")
        self._flush(final=True)
        self._seal()
        self._finished = True

    def _seal(self) -> None:
        """Fold the log into the sidecar, then mark the cache complete and naming it."""
        for _, _, rel in self.schema.chunk_files():
            if rel not in self._sums:  # only a cache finished before checksums were kept
                self._sums[rel] = chunk_checksum(self.path, rel)
        Sidecar.from_entries(self._sums).write(self.path)
        _write_progress(self.path, self._rows_done, self.schema.num_tokens, complete=True, checksums=SIDECAR)
        self._log.remove()
        self._sealed = True
        self._remove_shard_files()

    def _remove_shard_files(self) -> None:
        """The shard records, once progress.json and checksums.json hold what they said."""
        for p in shard_files(self.path):
            p.unlink(missing_ok=True)

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
    """Reads a finished cache: whole arrays, row selections, or shuffled batches of whole chunks.

    Every chunk file must be there with its recorded size when the reader opens (a stat each),
    and each chunk's checksum is verified the first time this reader reads it; a missing or
    changed chunk raises :class:`CacheCorrupt`. Caches written before checksums were kept are
    read with a warning (chunk sizes are still checked).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            raise CacheError(f"{self.path} is not a hidden-state cache (no zarr group); run the extract stage first")
        self.attrs: dict = {}
        try:
            group = zarr.open_group(store=str(self.path), mode="r")
            stored = group.attrs.asdict()
        except (ValueError, KeyError, TypeError, OSError) as e:  # zarr's errors are ValueErrors
            raise self._corrupt(f"its group metadata is unreadable ({type(e).__name__}: {e})") from None
        self.attrs = dict(stored.get("attrs", {}))
        progress = _read_progress(self.path)
        if "schema" not in stored or not progress or not progress.get("complete"):
            done = (progress or {}).get("rows_done", 0)
            raise CacheError(f"cache {self.path} is incomplete ({done} rows written); "
                             "re-run the extract stage to finish it")
        self.schema = CacheSchema.from_dict(stored["schema"])
        self.num_tokens = self.schema.num_tokens
        self.hidden_size = self.schema.hidden_size
        self.layers = self.schema.layers
        try:
            self._arrays = {n: group[n] for n in self.schema._stored_arrays()}
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise self._corrupt(f"an array's metadata is missing or unreadable ({type(e).__name__}: {e})") from None
        self._sidecar = self._open_checksums(progress)
        self._verified: set[str] = set()

    # -- integrity

    def _corrupt(self, problem: str) -> CacheCorrupt:
        key = self.attrs.get("key") or self.path.parent.name
        split = f" --split {self.attrs['split']}" if self.attrs.get("split") else ""
        return CacheCorrupt(
            f"cache {self.path} is damaged: {problem}. Run `exitflow verify {key}` to check the whole artifact; "
            f"to repair, delete it (`exitflow verify {key} --delete`, or remove its folder) and re-run its stage "
            f"(`exitflow run extract{split}`)")

    def _open_checksums(self, progress: dict) -> Sidecar | None:
        """The chunk checksums, after checking that every chunk file is there with its size."""
        sidecar = None
        if progress.get("checksums"):
            try:
                sidecar = Sidecar.read(self.path)
            except IntegrityError as e:
                raise self._corrupt(str(e)) from None
        elif str(self.path.resolve()) not in _warned_unverifiable:
            _warned_unverifiable.add(str(self.path.resolve()))
            log.warning("cache %s was written before chunk checksums were kept: its chunks cannot be verified "
                        "(only their sizes are checked); re-extract it to get them", self.path)
        problems = chunk_problems(self.path, self.schema, sidecar)
        if problems:
            raise self._corrupt(summarize(problems))
        return sidecar

    def _verify(self, name: str, rows: slice | np.ndarray | None) -> None:
        """Checksum every chunk of array `name` that `rows` touches, once per reader."""
        if self._sidecar is None:
            return
        for i in self.schema.chunks_of(rows):
            rel = self.schema.chunk_file(name, i)
            if rel in self._verified:
                continue
            problem = check_file(self.path / rel, rel, self._sidecar.entry(rel), checksum=True)
            if problem:
                raise self._corrupt(problem)
            self._verified.add(rel)

    # -- random access

    def _check(self, name: str, kind: str) -> None:
        names = self.schema.hidden_arrays() if kind == "hidden" else list(COLUMNS)
        if name not in names:
            raise CacheError(f"cache {self.path} has no {kind} array {name!r}; available: {', '.join(names)}")

    def _read(self, name: str, rows: slice | np.ndarray | None) -> np.ndarray:
        self._verify(name, rows)
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
