"""Writing one shard of a hidden-state cache: a chunk-aligned range of its rows, from a process of
its own, into a cache another process created.

A sharded extraction lays out the cache once (:class:`stores.cache.CacheWriter` creates the
preallocated arrays and attributes), then every shard writes rows [start, stop) with a
:class:`ShardWriter`. Ranges are aligned to whole chunks, so no two shards ever write the same
chunk file, and each shard keeps its own progress file and checksum log
(``progress.shard-<start>-<stop>.json``, ``checksums.shard-<start>-<stop>.log``): a shard that
was killed resumes alone, at its last whole chunk. Once every shard is done, opening the cache
with a ``CacheWriter`` again and calling ``finish()`` folds the shard records into the same
``progress.json`` and ``checksums.json`` a single writer leaves, and removes them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import zarr

from stores.cache import CacheWriter
from stores.cache_format import (
    SHARD_LOG,
    SHARD_PROGRESS,
    CacheError,
    CacheSchema,
    NamedChecksumLog,
    done_from,
    done_ranges,
    write_shard_progress,
)

log = logging.getLogger(__name__)


def shard_rows_done(path: Path, start: int, stop: int) -> int:
    """Rows of [start, stop) already written by any run, without a gap from `start` (0 when the
    cache is not created yet)."""
    if not (Path(path) / "zarr.json").exists():
        return 0
    return min(done_from(done_ranges(Path(path)), start), stop - start)


class ShardWriter(CacheWriter):
    """Appends rows [start, stop) of a cache that exists, resuming where any earlier run left them.

    ``rows_done`` and ``append`` count from `start`, so the caller feeds the shard's own rows
    exactly as it would feed a whole cache to a :class:`CacheWriter`. ``finish()`` marks the
    shard complete; it does not finish the cache.
    """

    def __init__(self, path: Path, schema: CacheSchema, attrs: dict, start: int, stop: int):
        self.path, self.schema, self.attrs = Path(path), schema, dict(attrs)
        cr = schema.chunk_rows
        if not (0 <= start < stop <= schema.num_tokens) or start % cr or (stop % cr and stop != schema.num_tokens):
            raise CacheError(f"shard rows [{start}, {stop}) of {self.path} are not whole chunks of {cr} rows inside "
                             f"[0, {schema.num_tokens}); shard on multiples of chunk_rows")
        if not (self.path / "zarr.json").exists():
            raise CacheError(f"{self.path} is not created yet; create the cache with CacheWriter before its shards")
        self._row0, self._stop = start, stop
        self._group = zarr.open_group(store=str(self.path), mode="r+")
        stored = self._group.attrs.asdict()
        if "schema" not in stored:
            raise CacheError(f"{self.path} was not completely created; open it with CacheWriter first")
        self._check_identity(stored)
        self._arrays = {n: self._group[n] for n in schema._stored_arrays()}
        self._buffer = {n: [] for n in schema._stored_arrays()}
        self._buffered = 0
        self._closed = False
        self._sums = {}
        self._log = NamedChecksumLog(self.path, SHARD_LOG.format(start=start, stop=stop))
        self._rows_done = shard_rows_done(self.path, start, stop)
        self._finished = self._rows_done == stop - start
        self._sealed = self._finished
        self._drop_partial_chunks()
        if self._rows_done and not self._finished:
            log.info("cache %s: shard [%d, %d) resumes at row %d", self.path, start, stop, start + self._rows_done)

    def _drop_partial_chunks(self) -> None:
        """Chunk files are written as `<key>.<uuid>.partial` and renamed; a killed shard leaves
        these behind. Only this shard's own chunks: the other shards may be writing theirs."""
        cr = self.schema.chunk_rows
        for name in self.schema._stored_arrays():
            for i in range(self._row0 // cr, -(-self._stop // cr)):
                chunk = self.path / self.schema.chunk_file(name, i)
                for leftover in chunk.parent.glob(f"{chunk.name}.*.partial"):
                    leftover.unlink(missing_ok=True)

    @property
    def _rows_total(self) -> int:
        return self._stop - self._row0

    @property
    def _holds(self) -> str:
        return f"the {self._rows_total} rows of shard [{self._row0}, {self._stop})"

    def _save_progress(self, complete: bool) -> None:
        write_shard_progress(self.path, self._row0, self._stop, self._rows_done, complete)

    def finish(self) -> None:
        """Write the buffered rows and mark the shard complete (the cache is finished later, once)."""
        if self._finished:
            return
        if self._closed:
            raise CacheError(f"shard [{self._row0}, {self._stop}) of {self.path} is closed; cannot finish")
        if self._rows_done + self._buffered != self._rows_total:
            raise CacheError(f"cache {self.path}: got {self._rows_done + self._buffered} rows, expected {self._holds}")
        self._flush(final=True)
        self._save_progress(complete=True)
        self._finished = True


__all__ = ["ShardWriter", "shard_rows_done", "SHARD_PROGRESS", "SHARD_LOG"]
