"""Sources: the online source gives the cache's rows; array names come from one place; the
training modules import neither zarr nor prefect."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.sources import OnlineSource, check_layers, layer_key


def test_layer_key_is_the_caches_array_name():
    assert layer_key(6) == "layer_6" and layer_key(np.int64(12)) == "layer_12"


def test_check_layers_sorts_and_refuses_empty_or_duplicates():
    assert check_layers([3, 1, 2]) == [1, 2, 3]
    with pytest.raises(ValueError, match="no exit layers"):
        check_layers([])
    with pytest.raises(ValueError, match=r"\[1, 1\] contain duplicates"):
        check_layers([1, 1])


def test_online_source_yields_the_cached_rows(tiny):
    online = OnlineSource(tiny.backbone, tiny.split, [1, 2, 3], sequences_per_forward=8, max_sequences=tiny.n_seq)
    assert online.num_tokens == tiny.reader.num_tokens
    names = ["layer_1", "layer_3", "final", "targets", "row"]
    batches = list(online.iter_batches(names, 200, seed=3, epoch=1))
    assert [len(b["row"]) for b in batches] == [200] * (online.num_tokens // 200) + [online.num_tokens % 200]
    rows = np.concatenate([b["row"] for b in batches])
    assert np.array_equal(np.sort(rows), np.arange(online.num_tokens))  # every row once
    assert not np.array_equal(rows, np.arange(online.num_tokens))  # shuffled
    for name in ("layer_1", "layer_3", "final"):
        got = np.concatenate([b[name] for b in batches])
        np.testing.assert_allclose(got, tiny.reader.hidden(name, rows), rtol=2e-3, atol=2e-3)  # float16 cache
    np.testing.assert_array_equal(np.concatenate([b["targets"] for b in batches]), tiny.reader.column("targets", rows))

    # keyed by row, the shuffled cache gives the same rows as the shuffled online source
    cached = list(tiny.reader.iter_batches(names, 200, seed=3, epoch=1))
    crow = np.concatenate([b["row"] for b in cached])
    assert np.array_equal(np.sort(crow), np.arange(online.num_tokens))
    for name in ("layer_1", "final"):
        by_row_cache = np.concatenate([b[name] for b in cached])[np.argsort(crow)]
        by_row_online = np.concatenate([b[name] for b in batches])[np.argsort(rows)]
        np.testing.assert_allclose(by_row_cache, by_row_online, rtol=2e-3, atol=2e-3)

    # same (seed, epoch) -> same order; start_batch skips exactly; another epoch reshuffles
    again = list(online.iter_batches(["row"], 200, seed=3, epoch=1, start_batch=3))
    assert all(np.array_equal(a["row"], b["row"]) for a, b in zip(again, batches[3:]))
    assert len(again) == len(batches) - 3
    other = np.concatenate([b["row"] for b in online.iter_batches(["row"], 200, seed=3, epoch=2)])
    assert not np.array_equal(other, rows)
    with pytest.raises(ValueError, match="layer_2.*available"):
        next(OnlineSource(tiny.backbone, tiny.split, [1], max_sequences=2).iter_batches(["layer_2"], 8))


def test_training_modules_import_neither_zarr_nor_prefect():
    modules = ["pipeline.sources", "pipeline.fit", "pipeline.scoring", "pipeline.train_heads", "pipeline.train_gates"]
    code = f"import sys; import {', '.join(modules)}; bad = {{'zarr', 'prefect'}} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
