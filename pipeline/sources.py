"""Where training and scoring read hidden states from: the `BatchSource` protocol, the online
source (the backbone run on the fly), and the names of the arrays a source serves.

A stage reads a *source*, never a path: the zarr cache's reader in the pipeline, `OnlineSource`
for users without the disk for a cache and as the benchmark's baseline, or an in-memory object
in tests. So `pipeline` never imports zarr.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Protocol, Sequence

import numpy as np
import torch

if TYPE_CHECKING:  # only for annotations: importing the backbone module pulls in transformers
    from pipeline.backbone import Backbone
    from pipeline.data import PackedSplit


def layer_key(layer: int) -> str:
    """The name of an exit layer's hidden states in a source (and the cache's array name)."""
    return f"layer_{int(layer)}"


def check_layers(layers: Sequence[int]) -> list[int]:
    """Exit layers sorted, each once; raises on an empty or duplicated list."""
    out = sorted(int(layer) for layer in layers)
    if not out:
        raise ValueError("no exit layers given; pass at least one layer, e.g. [6, 12]")
    if len(set(out)) != len(out):
        raise ValueError(f"exit layers {list(layers)} contain duplicates; give each layer once")
    return out


def batch_tensor(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A batch array as a tensor on `device` (no copy on the CPU when already contiguous)."""
    return torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)


class BatchSource(Protocol):
    """Per-token rows in batches. `stores.cache.CacheReader` and `OnlineSource` satisfy it.

    Names: ``layer_<l>`` (`layer_key`, float32 [b, H]), ``final`` (final-norm state, float32
    [b, H]), ``targets`` (int32 [b], -1 = no next token), ``row`` (int64 [b], global row index).
    Every row appears exactly once per epoch; the order is a function of (seed, epoch) alone,
    which is what makes a resumed run replay the same batches.
    """

    num_tokens: int

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
    ) -> Iterator[dict[str, np.ndarray]]: ...

    def num_batches(self, batch_rows: int, drop_last: bool = False) -> int: ...


class OnlineSource:
    """The batches a cache would give, computed by running the frozen backbone every time.

    For users without the disk for a cache, and as the benchmark's baseline: one epoch online
    costs one backbone forward over every token, which the cache pays once. Rows are the
    cache's (``row = sequence * seq_len + position``, sequences in split order).

    Shuffling permutes whole sequences by (seed, epoch), runs them `sequences_per_forward` at a
    time, permutes the rows of each forward and cuts the stream into batches; `buffer_chunks`
    is accepted for the protocol and ignored (a forward group is the shuffle buffer).
    `start_batch` skips the forwards of skipped batches.
    """

    _COLUMNS = ("input_ids", "targets", "doc_ids", "positions")

    def __init__(self, backbone: "Backbone", split: "PackedSplit", layers: Sequence[int],
                 sequences_per_forward: int = 8, max_sequences: int | None = None):
        if sequences_per_forward <= 0:
            raise ValueError(f"sequences_per_forward={sequences_per_forward} must be positive, e.g. 8")
        self.layers = tuple(check_layers(layers))
        backbone.check_layers(self.layers)
        n_seq, seq_len = split.input_ids.shape
        backbone.check_seq_len(seq_len)
        if max_sequences is not None:
            if max_sequences <= 0:
                raise ValueError(f"max_sequences={max_sequences} must be positive or None")
            n_seq = min(n_seq, max_sequences)
        if n_seq == 0:
            raise ValueError(f"split {split.name!r} holds no sequences; nothing to read")
        self.backbone = backbone
        self.split = split
        self.sequences_per_forward = int(sequences_per_forward)
        self.num_sequences = int(n_seq)
        self.seq_len = int(seq_len)
        self.num_tokens = self.num_sequences * self.seq_len
        self.hidden_size = int(backbone.hidden_size)

    def names(self) -> list[str]:
        return [layer_key(layer) for layer in self.layers] + ["final", *self._COLUMNS, "row"]

    def num_batches(self, batch_rows: int, drop_last: bool = False) -> int:
        return self.num_tokens // batch_rows if drop_last else -(-self.num_tokens // batch_rows)

    def _rows(self, names: Sequence[str], seqs: np.ndarray) -> dict[str, np.ndarray]:
        """All requested arrays for sequences `seqs` [g], flattened to [g * seq_len] rows."""
        out: dict[str, np.ndarray] = {}
        layers = [layer for layer in self.layers if layer_key(layer) in names]
        if layers or "final" in names:
            ids = torch.from_numpy(self.split.input_ids[seqs].astype(np.int64))  # [g, seq]
            per_layer, final = self.backbone.hidden_states(ids, layers)  # {l: [g, seq, H]}, [g, seq, H]
            for layer in layers:
                out[layer_key(layer)] = per_layer[layer].reshape(-1, self.hidden_size).float().cpu().numpy()
            if "final" in names:
                out["final"] = final.reshape(-1, self.hidden_size).float().cpu().numpy()  # [g*seq, H]
        for name in self._COLUMNS:
            if name in names:
                out[name] = getattr(self.split, name)[seqs].reshape(-1).astype(np.int32)  # [g*seq]
        if "row" in names:
            pos = np.arange(self.seq_len, dtype=np.int64)
            out["row"] = (seqs.astype(np.int64)[:, None] * self.seq_len + pos).reshape(-1)  # [g*seq]
        return out

    def iter_batches(self, names: Sequence[str], batch_rows: int, *, shuffle: bool = True, buffer_chunks: int = 4,
                     seed: int = 0, epoch: int = 0, drop_last: bool = False,
                     start_batch: int = 0) -> Iterator[dict[str, np.ndarray]]:
        names = list(names)
        if not names:
            raise ValueError("iter_batches got no names; ask for e.g. ['layer_6', 'final', 'targets']")
        unknown = [n for n in names if n not in self.names()]
        if unknown:
            raise ValueError(f"OnlineSource has no array(s) {unknown}; available: {', '.join(self.names())} "
                             "(add the layer to `layers` when building the source)")
        if batch_rows <= 0 or start_batch < 0:
            raise ValueError(f"batch_rows={batch_rows} must be positive and start_batch={start_batch} >= 0")
        rng = np.random.default_rng([seed, epoch]) if shuffle else None
        order = rng.permutation(self.num_sequences) if rng is not None else np.arange(self.num_sequences)
        skip = start_batch * batch_rows  # rows of the stream before the first wanted batch
        done = 0  # rows of the stream passed so far
        buf: dict[str, np.ndarray] | None = None
        for g in range(0, self.num_sequences, self.sequences_per_forward):
            seqs = order[g : g + self.sequences_per_forward]
            n = len(seqs) * self.seq_len
            perm = rng.permutation(n) if rng is not None else None  # drawn even when skipped: later groups stay equal
            if done + n <= skip:
                done += n
                continue
            data = self._rows(names, seqs)
            cut = max(0, skip - done)
            data = {k: (v[perm] if perm is not None else v)[cut:] for k, v in data.items()}
            done += n
            buf = data if buf is None else {k: np.concatenate([buf[k], data[k]]) for k in names}
            n_full = len(buf[names[0]]) // batch_rows
            for j in range(n_full):
                yield {k: buf[k][j * batch_rows : (j + 1) * batch_rows] for k in names}
            buf = {k: buf[k][n_full * batch_rows :] for k in names}
        if buf is not None and len(buf[names[0]]) and not drop_last:
            yield buf
