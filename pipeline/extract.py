"""The extract stage: run the frozen backbone over a packed split and hand every token's
hidden states to a row writer (the zarr cache in practice, any object with the
:class:`RowWriter` protocol in tests).

The backbone forward dominates. On a GPU, writing runs on a background thread so the next
batch's forward overlaps the previous batch's cast, checks and disk writes. On a CPU the
forward already uses every core: a writer thread would only pre-empt torch's OpenMP workers
(which then stall at their barriers), so the few milliseconds of writing run inline.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch
from pipeline.progress import ProgressBar

from pipeline.backbone import Backbone
from pipeline.data import PackedSplit
from pipeline.sources import layer_key

log = logging.getLogger(__name__)

# Bump when the extracted values or layout change: it is part of every cache key.
EXTRACT_CODE_VERSION = "extract-2"
"""Part of every cache's content key; bump when the cache or its teacher file changes for the
same inputs (extract-2: the teacher file describes the final norm's type, eps and offset)."""


class RowWriter(Protocol):
    rows_done: int

    def append(self, rows: dict[str, np.ndarray | torch.Tensor]) -> None: ...


@dataclass(frozen=True)
class ExtractResult:
    tokens: int
    """Tokens extracted by this call (excludes those a resumed run skipped)."""
    resumed_from: int
    """Rows already in the cache when this call started."""
    seconds: float
    tokens_per_s: float


def chunk_rows_for(seq_len: int, target_rows: int) -> int:
    """Rows per chunk: a whole number of sequences close to the target, so a resumed run
    restarts on a sequence boundary."""
    return seq_len * max(1, round(target_rows / seq_len))


def shard_sequences(n_seq: int, seq_len: int, chunk_rows: int, batch_size: int, shards: int) -> list[tuple[int, int]]:
    """Split sequences [0, n_seq) into at most `shards` contiguous ranges of about equal size.

    Every boundary is a whole number of chunks (so no two shards write one chunk file) and of
    batches (so each shard runs exactly the batches a single process would, and its floats are
    the same bits); the last range ends at `n_seq`.
    """
    if chunk_rows % seq_len:
        raise ValueError(f"chunk_rows={chunk_rows} is not a whole number of {seq_len}-token sequences")
    unit = math.lcm(chunk_rows // seq_len, batch_size)  # sequences
    units = -(-n_seq // unit)
    count = max(1, min(shards, units))
    edges = [min(n_seq, unit * (units * i // count)) for i in range(count + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


class _InlineWriter:
    def __init__(self, writer: RowWriter):
        self._writer = writer

    def put(self, rows: dict) -> None:
        self._writer.append(rows)

    def close(self) -> None:
        pass


class _BackgroundWriter:
    """Runs ``writer.append`` on one thread with a small queue; re-raises its errors."""

    def __init__(self, writer: RowWriter, depth: int = 2):
        self._writer = writer
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (rows := self._q.get()) is not None:
            if self._error is None:
                try:
                    self._writer.append(rows)
                except BaseException as e:  # surfaced in put()/close()
                    self._error = e

    def put(self, rows: dict) -> None:
        if self._error is not None:
            raise self._error
        self._q.put(rows)

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def extract_hidden_states(
    backbone: Backbone,
    split: PackedSplit,
    layers: Sequence[int],
    writer: RowWriter,
    batch_size: int = 8,
    max_sequences: int | None = None,
    progress: bool = True,
) -> ExtractResult:
    """Write, for every token of ``split``, the hidden state after each exit layer, the
    final-norm state (the teacher) and the token columns.

    Continues from ``writer.rows_done`` (a multiple of the sequence length), so a killed run
    resumes where its last whole chunk ended.
    """
    backbone.check_layers(layers)
    n_seq, seq_len = split.input_ids.shape
    if max_sequences is not None:
        n_seq = min(n_seq, max_sequences)
    done_rows = writer.rows_done
    if done_rows % seq_len:
        raise ValueError(f"cache holds {done_rows} rows, not a whole number of {seq_len}-token sequences")
    start = done_rows // seq_len
    if start:
        log.info("resuming extraction at sequence %d of %d (%d tokens already cached)", start, n_seq, done_rows)

    bar = ProgressBar(
        total=n_seq * seq_len, initial=start * seq_len, unit="tok", unit_scale=True,
        desc=f"extract {split.name}", disable=not progress, dynamic_ncols=True,
    )
    sink = _BackgroundWriter(writer) if backbone.device.type == "cuda" else _InlineWriter(writer)
    t0 = time.perf_counter()
    try:
        for s in range(start, n_seq, batch_size):
            e = min(s + batch_size, n_seq)
            ids = torch.from_numpy(split.input_ids[s:e].astype(np.int64))  # [batch, seq]
            per_layer, final = backbone.hidden_states(ids, layers)
            rows: dict[str, np.ndarray | torch.Tensor] = {
                layer_key(layer): per_layer[layer].reshape(-1, backbone.hidden_size).cpu()  # [batch*seq, hidden]
                for layer in layers
            }
            rows["final"] = final.reshape(-1, backbone.hidden_size).cpu()  # [batch*seq, hidden]
            rows["input_ids"] = split.input_ids[s:e].reshape(-1)
            rows["targets"] = split.targets[s:e].reshape(-1)
            rows["doc_ids"] = split.doc_ids[s:e].reshape(-1)
            rows["positions"] = split.positions[s:e].reshape(-1)
            sink.put(rows)
            bar.update((e - s) * seq_len)
    finally:
        try:
            sink.close()
        finally:
            bar.close()
    seconds = time.perf_counter() - t0
    tokens = (n_seq - start) * seq_len
    return ExtractResult(tokens=tokens, resumed_from=done_rows, seconds=seconds,
                         tokens_per_s=tokens / seconds if seconds > 0 else float("nan"))
