"""The zarr hidden-state cache: encodings, whole-chunk writes, resume, and the shuffling reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from stores.cache import (
    COLUMNS,
    CacheError,
    CacheMismatchError,
    CacheReader,
    CacheSchema,
    CacheWriter,
    NonFiniteError,
)

HIDDEN = 16
CHUNK = 32


def make_schema(num_tokens: int = 200, dtype: str = "float16", chunk_rows: int = CHUNK) -> CacheSchema:
    return CacheSchema(num_tokens=num_tokens, hidden_size=HIDDEN, layers=(1, 3), storage_dtype=dtype,
                       chunk_rows=chunk_rows)


def make_data(schema: CacheSchema, seed: int = 0) -> dict[str, np.ndarray]:
    """Full-size source rows; doc_ids holds the global row index so tests can trace rows."""
    rng = np.random.default_rng(seed)
    n = schema.num_tokens
    data: dict[str, np.ndarray] = {}
    for name in schema.hidden_arrays():
        x = rng.standard_normal((n, HIDDEN)).astype(np.float32) * rng.uniform(0.1, 300, (n, 1)).astype(np.float32)
        x[5] = 0.0  # a zero row (int8 scale must be 1)
        x[7, 3] = 20000.0  # an outlier dimension, as SmolLM2's middle layers have
        data[name] = x
    data["input_ids"] = rng.integers(0, 49152, n).astype(np.int64)
    data["targets"] = rng.integers(0, 49152, n).astype(np.int64)
    data["doc_ids"] = np.arange(n, dtype=np.int64)
    data["positions"] = np.arange(n, dtype=np.int64) % 50
    return data


def write_cache(path: Path, schema: CacheSchema, data: dict[str, np.ndarray], *, batch: int = 23,
                key: str = "k1", start: int = 0, stop: int | None = None, finish: bool = True) -> CacheWriter:
    stop = schema.num_tokens if stop is None else stop
    w = CacheWriter(path, schema, {"key": key, "note": "test"})
    for a in range(start, stop, batch):
        b = min(a + batch, stop)
        w.append({k: v[a:b] for k, v in data.items()})
    if finish:
        w.finish()
    return w


def stored_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != "progress.json"}


@pytest.fixture(scope="module")
def ragged_cache(tmp_path_factory) -> Path:
    """200 rows in chunks of 32: six whole chunks and a short one."""
    path = tmp_path_factory.mktemp("cache") / "ragged"
    schema = make_schema()
    write_cache(path, schema, make_data(schema))
    return path


# ----------------------------------------------------------------------------- schema


def test_schema_names_and_sizes():
    s = make_schema()
    assert s.hidden_arrays() == ["layer_1", "layer_3", "final"]
    assert make_schema(dtype="float16").bytes_per_token_per_layer() == 2 * HIDDEN
    assert make_schema(dtype="bfloat16").bytes_per_token_per_layer() == 2 * HIDDEN
    assert make_schema(dtype="int8").bytes_per_token_per_layer() == HIDDEN + 4


def test_schema_collects_every_problem():
    with pytest.raises(CacheError) as e:
        CacheSchema(num_tokens=0, hidden_size=8, layers=(2, 2), storage_dtype="float8", chunk_rows=0)
    msg = str(e.value)
    for part in ("num_tokens", "chunk_rows", "duplicates", "float8"):
        assert part in msg


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_round_trip(tmp_path, dtype):
    schema = make_schema(dtype=dtype)
    data = make_data(schema)
    write_cache(tmp_path / "c", schema, data, batch=23)  # 23 does not divide the chunk of 32
    r = CacheReader(tmp_path / "c")
    assert r.schema == schema and r.attrs == {"key": "k1", "note": "test"}
    assert (r.num_tokens, r.hidden_size, r.layers) == (200, HIDDEN, (1, 3))
    for name in schema.hidden_arrays():
        x, got = data[name], r.hidden(name)
        assert got.dtype == np.float32 and got.shape == x.shape
        if dtype == "float16":
            np.testing.assert_array_equal(got, x.astype(np.float16).astype(np.float32))
        elif dtype == "bfloat16":
            want = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
            np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
        else:
            scale = np.abs(x).max(axis=1) / 127
            assert np.all(np.abs(got - x) <= scale[:, None] / 2 * (1 + 1e-5) + 1e-30)
            np.testing.assert_array_equal(got[5], 0.0)
            zarr_scale = zarr.open_group(str(tmp_path / "c"), mode="r")[f"{name}.scale"]
            assert zarr_scale[5] == 1.0
    for name in COLUMNS:
        got = r.column(name)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, data[name])


def test_accepts_torch_tensors_of_any_float_dtype(tmp_path):
    schema = make_schema(num_tokens=64, dtype="bfloat16")
    data = make_data(schema)
    w = CacheWriter(tmp_path / "c", schema, {"key": "k"})
    rows = {k: torch.from_numpy(v) for k, v in data.items()}
    rows["layer_1"] = rows["layer_1"].to(torch.bfloat16)
    rows["layer_3"] = rows["layer_3"].to(torch.float16)
    w.append(rows)
    w.finish()
    r = CacheReader(tmp_path / "c")
    for name in schema.hidden_arrays():
        want = rows[name].to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(r.hidden(name), want)


def test_bfloat16_rounding_matches_torch_on_ties_and_extremes(tmp_path):
    schema = make_schema(num_tokens=32, dtype="bfloat16")
    data = make_data(schema)
    bits = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x3F80FFFF, 0x00000001, 0x80400000, 0x7F7F0000,
                     0x00000000, 0x80000000], dtype=np.uint32)
    data["final"][0, : len(bits)] = bits.view(np.float32)
    write_cache(tmp_path / "c", schema, data)
    want = torch.from_numpy(data["final"]).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(CacheReader(tmp_path / "c").hidden("final").view(np.uint32), want.view(np.uint32))

    data["final"][1, 0] = 3.4e38  # finite in float32, rounds to inf in bfloat16
    w = CacheWriter(tmp_path / "d", schema, {"key": "k"})
    with pytest.raises(NonFiniteError, match="overflow bfloat16.*storage_dtype=int8"):
        w.append(data)


def test_row_selections(ragged_cache):
    r = CacheReader(ragged_cache)
    full = r.hidden("final")
    idx = np.array([150, 3, 3, 77, 199])
    np.testing.assert_array_equal(r.hidden("final", idx), full[idx])
    np.testing.assert_array_equal(r.hidden("final", slice(40, 90)), full[40:90])
    np.testing.assert_array_equal(r.column("doc_ids", idx), idx)
    with pytest.raises(CacheError, match="layer_1, layer_3, final"):
        r.hidden("layer_2")
    with pytest.raises(CacheError, match="input_ids"):
        r.column("layer_1")


# ----------------------------------------------------------------------------- whole-chunk writes


def test_writes_only_whole_aligned_chunks(tmp_path, monkeypatch):
    schema = make_schema()
    data = make_data(schema)
    writes: list[tuple[str, int, int]] = []
    progress: list[int] = []
    original = zarr.Array.__setitem__

    def recording_setitem(self, key, value):
        writes.append((self.basename, key.start, key.stop))
        return original(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", recording_setitem)
    w = CacheWriter(tmp_path / "c", schema, {"key": "k"})
    for a in range(0, schema.num_tokens, 7):
        w.append({k: v[a : a + 7] for k, v in data.items()})
        assert w.rows_done % CHUNK == 0 and w.rows_done <= a + 7
        progress.append(json.loads((tmp_path / "c" / "progress.json").read_text())["rows_done"])
    assert w.rows_done == 192
    w.finish()
    assert all(p % CHUNK == 0 for p in progress)

    names = {n for n, _, _ in writes}
    assert names == set(schema.hidden_arrays()) | set(COLUMNS)
    for name in names:
        regions = sorted((a, b) for n, a, b in writes if n == name)
        for a, b in regions:
            assert a % CHUNK == 0 and (b % CHUNK == 0 or b == schema.num_tokens)
        # contiguous, each chunk written exactly once
        assert regions[0][0] == 0 and regions[-1][1] == schema.num_tokens
        assert all(regions[i][1] == regions[i + 1][0] for i in range(len(regions) - 1))
    assert json.loads((tmp_path / "c" / "progress.json").read_text()) == {
        "rows_done": 200, "num_tokens": 200, "complete": True, "checksums": "checksums.json"}


def test_arrays_are_preallocated_uncompressed(tmp_path):
    schema = make_schema(dtype="int8")
    CacheWriter(tmp_path / "c", schema, {"key": "k"}).close()
    g = zarr.open_group(str(tmp_path / "c"), mode="r")
    a = g["layer_1"]
    assert a.shape == (200, HIDDEN) and a.chunks == (CHUNK, HIDDEN) and a.dtype == np.int8
    assert a.compressors == ()
    assert g["final.scale"].shape == (200,) and g["final.scale"].dtype == np.float32
    assert g["input_ids"].dtype == np.int32
    assert g.attrs["attrs"] == {"key": "k"} and g.attrs["schema"]["storage_dtype"] == "int8"


# ----------------------------------------------------------------------------- errors


def test_float16_overflow_names_the_fix(tmp_path):
    schema = make_schema(num_tokens=64)
    data = make_data(schema)
    bad = {k: v.copy() for k, v in data.items()}
    bad["layer_3"][10, 2] = 70000.0
    w = CacheWriter(tmp_path / "c", schema, {"key": "k"})
    with pytest.raises(NonFiniteError) as e:
        w.append(bad)
    msg = str(e.value)
    assert "layer_3" in msg and " 1 " in msg and "70000" in msg
    assert "extract.storage_dtype=bfloat16" in msg
    w.append(data)  # the failed append buffered nothing
    w.finish()
    # bfloat16 stores the same value without complaint
    write_cache(tmp_path / "bf", make_schema(num_tokens=64, dtype="bfloat16"), bad)
    assert CacheReader(tmp_path / "bf").hidden("layer_3")[10, 2] == 70144.0  # nearest bfloat16


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_input_fails_in_every_mode(tmp_path, dtype, value):
    schema = make_schema(num_tokens=32, dtype=dtype)
    data = make_data(schema)
    data["final"][3, :4] = value
    w = CacheWriter(tmp_path / "c", schema, {"key": "k"})
    with pytest.raises(NonFiniteError, match=r"'final': 4 NaN/inf"):
        w.append(data)


def test_append_validates_names_shapes_and_count(tmp_path):
    schema = make_schema(num_tokens=64)
    data = make_data(schema)
    w = CacheWriter(tmp_path / "c", schema, {"key": "k"})
    with pytest.raises(CacheError, match="missing \\['targets'\\]"):
        w.append({k: v[:4] for k, v in data.items() if k != "targets"})
    with pytest.raises(CacheError, match="same n"):
        w.append({k: v[:4] if k != "doc_ids" else v[:5] for k, v in data.items()})
    with pytest.raises(CacheError, match="exceed num_tokens=64"):
        w.append({k: np.concatenate([v, v[:1]]) for k, v in data.items()})
    w.append({k: v[:40] for k, v in data.items()})
    with pytest.raises(CacheError, match="got 40 rows.*num_tokens=64"):
        w.finish()


def test_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not a hidden-state cache"):
        CacheWriter(tmp_path / "c", make_schema(), {"key": "k"})


# ----------------------------------------------------------------------------- resume


def test_resume_equals_a_clean_write(tmp_path):
    schema = make_schema()
    data = make_data(schema)
    write_cache(tmp_path / "clean", schema, data)

    path = tmp_path / "resumed"
    w = write_cache(path, schema, data, stop=110, batch=23, finish=False)
    assert w.rows_done == 96  # 3 whole chunks; 14 buffered rows are lost with the process
    w.close()
    # a kill mid-write leaves a torn chunk beyond rows_done and a stray temp file: both must vanish
    for torn in (path / "layer_1" / "c" / "3" / "0", path / "final" / "c" / "4" / "0.deadbeef.partial"):
        torn.parent.mkdir(parents=True, exist_ok=True)
        torn.write_bytes(b"garbage")
    with pytest.raises(CacheError, match="incomplete \\(96 rows"):
        CacheReader(path)

    w2 = CacheWriter(path, schema, {"key": "k1", "note": "test"})
    assert w2.rows_done == 96
    write_cache(path, schema, data, start=w2.rows_done, batch=17)
    assert stored_files(path) == stored_files(tmp_path / "clean")
    r = CacheReader(path)
    np.testing.assert_array_equal(r.hidden("layer_1"), CacheReader(tmp_path / "clean").hidden("layer_1"))


def test_reopening_a_finished_cache_is_a_no_op(tmp_path):
    schema = make_schema(num_tokens=64)
    write_cache(tmp_path / "c", schema, make_data(schema))
    w = CacheWriter(tmp_path / "c", schema, {"key": "k1"})
    assert w.rows_done == 64
    w.finish()
    with pytest.raises(CacheError, match="finished"):
        w.append({k: v[:1] for k, v in make_data(schema).items()})


def test_resume_with_other_inputs_is_refused(tmp_path):
    schema = make_schema()
    write_cache(tmp_path / "c", schema, make_data(schema), stop=100, finish=False).close()
    with pytest.raises(CacheMismatchError) as e:
        CacheWriter(tmp_path / "c", schema, {"key": "k2"})
    assert "'k1'" in str(e.value) and "'k2'" in str(e.value) and "Delete the folder" in str(e.value)
    with pytest.raises(CacheMismatchError, match="chunk_rows: stored 32, this run 64"):
        CacheWriter(tmp_path / "c", make_schema(chunk_rows=64), {"key": "k1"})


def test_interrupted_creation_is_redone(tmp_path):
    path = tmp_path / "c"
    g = zarr.open_group(str(path), mode="w")  # killed after the first array, before the identity attrs
    g.create_array("layer_1", shape=(5, 3), chunks=(5, 3), dtype="float32")
    schema = make_schema(num_tokens=64)
    data = make_data(schema)
    write_cache(path, schema, data)
    np.testing.assert_array_equal(CacheReader(path).hidden("layer_1"), data["layer_1"].astype(np.float16))


def test_reader_refuses_missing_and_unfinished(tmp_path):
    with pytest.raises(CacheError, match="no zarr group"):
        CacheReader(tmp_path / "nothing")
    schema = make_schema()
    CacheWriter(tmp_path / "c", schema, {"key": "k"}).close()
    with pytest.raises(CacheError, match=str(tmp_path / "c")):
        CacheReader(tmp_path / "c")


# ----------------------------------------------------------------------------- batches


def rows_of(batches) -> list[np.ndarray]:
    return [b["doc_ids"] for b in batches]


def test_epoch_covers_every_row_once_and_data_follows(ragged_cache):
    r = CacheReader(ragged_cache)
    final = r.hidden("final")
    batches = list(r.iter_batches(["final", "doc_ids"], 24, buffer_chunks=2, seed=1, epoch=0))
    assert len(batches) == r.num_batches(24) == 9
    assert [len(b["doc_ids"]) for b in batches] == [24] * 8 + [8]
    seen = np.concatenate(rows_of(batches))
    np.testing.assert_array_equal(np.sort(seen), np.arange(200))
    assert not np.array_equal(seen, np.arange(200))
    for b in batches:
        assert b["final"].dtype == np.float32 and b["doc_ids"].dtype == np.int32
        np.testing.assert_array_equal(b["final"], final[b["doc_ids"]])

    dropped = list(r.iter_batches(["doc_ids"], 24, buffer_chunks=2, seed=1, drop_last=True))
    assert len(dropped) == r.num_batches(24, drop_last=True) == 8


def test_order_is_deterministic_per_seed_and_epoch(ragged_cache):
    r = CacheReader(ragged_cache)

    def order(seed, epoch):
        return np.concatenate(rows_of(r.iter_batches(["doc_ids"], 16, seed=seed, epoch=epoch, buffer_chunks=3)))

    np.testing.assert_array_equal(order(0, 0), order(0, 0))
    assert not np.array_equal(order(0, 0), order(0, 1))
    assert not np.array_equal(order(0, 0), order(1, 0))
    seq = np.concatenate(rows_of(r.iter_batches(["doc_ids"], 16, shuffle=False)))
    np.testing.assert_array_equal(seq, np.arange(200))


def test_buffer_bounds_the_chunks_behind_each_batch(tmp_path, ragged_cache):
    # a batch mixes at most its own buffer's chunks and the carried-over remainder of the previous one
    r = CacheReader(ragged_cache)
    for b in r.iter_batches(["doc_ids"], 24, buffer_chunks=2, seed=3):
        assert len(np.unique(b["doc_ids"] // CHUNK)) <= 4
    # when batches tile the buffer exactly, nothing carries over: at most buffer_chunks chunks
    schema = make_schema(num_tokens=256)
    write_cache(tmp_path / "even", schema, make_data(schema))
    r = CacheReader(tmp_path / "even")
    spans = [np.unique(b["doc_ids"] // CHUNK) for b in r.iter_batches(["doc_ids"], 16, buffer_chunks=2, seed=3)]
    assert all(len(s) <= 2 for s in spans)
    assert max(len(s) for s in spans) == 2  # and rows really are mixed across the buffer's chunks


def test_reads_are_whole_chunks_once_per_epoch(ragged_cache, monkeypatch):
    r = CacheReader(ragged_cache)
    reads: list[tuple[str, int, int]] = []
    original = zarr.Array.__getitem__

    def recording_getitem(self, key):
        reads.append((self.basename, key.start, key.stop))
        return original(self, key)

    monkeypatch.setattr(zarr.Array, "__getitem__", recording_getitem)
    list(r.iter_batches(["layer_3", "final", "targets"], 10, buffer_chunks=3, seed=5))
    assert len(reads) == 3 * 7
    for _, a, b in reads:
        assert a % CHUNK == 0 and (b == a + CHUNK or b == 200)
    assert len(set(reads)) == len(reads)


def test_start_batch_resumes_the_same_sequence(ragged_cache):
    r = CacheReader(ragged_cache)
    names = ["layer_1", "doc_ids"]
    for drop_last in (False, True):
        full = list(r.iter_batches(names, 24, buffer_chunks=2, seed=7, epoch=2, drop_last=drop_last))
        for k in (0, 1, 3, 4, len(full) - 1, len(full)):
            rest = list(r.iter_batches(names, 24, buffer_chunks=2, seed=7, epoch=2, drop_last=drop_last,
                                       start_batch=k))
            assert len(rest) == len(full) - k
            for a, b in zip(rest, full[k:]):
                np.testing.assert_array_equal(a["doc_ids"], b["doc_ids"])
                np.testing.assert_array_equal(a["layer_1"], b["layer_1"])


def test_iter_batches_rejects_unknown_names(ragged_cache):
    with pytest.raises(CacheError, match="available"):
        next(CacheReader(ragged_cache).iter_batches(["layer_9"], 8))


def test_iter_batches_row_pseudo_column_matches_data(tmp_path):
    """`row` gives each row's global index, so labels computed once can be joined to batches."""
    schema = CacheSchema(num_tokens=1000, hidden_size=8, layers=(1,), storage_dtype="float16", chunk_rows=128)
    rng = np.random.default_rng(0)
    data = rng.standard_normal((1000, 8)).astype(np.float32)
    ids = np.arange(1000, dtype=np.int32)
    with CacheWriter(tmp_path / "c.zarr", schema, {"key": "k"}) as w:
        w.append({"layer_1": data, "final": data, "input_ids": ids, "targets": ids, "doc_ids": ids, "positions": ids})
        w.finish()
    r = CacheReader(tmp_path / "c.zarr")
    seen = []
    for b in r.iter_batches(["layer_1", "input_ids", "row"], 100, buffer_chunks=2, seed=3):
        assert b["row"].dtype == np.int64
        np.testing.assert_array_equal(b["input_ids"], b["row"])
        np.testing.assert_array_equal(b["layer_1"], data[b["row"]].astype(np.float16).astype(np.float32))
        seen.append(b["row"])
    assert sorted(np.concatenate(seen).tolist()) == list(range(1000))


# ----------------------------------------------------------------------------- shards


def _write_shard(path: Path, schema: CacheSchema, data: dict[str, np.ndarray], start: int, stop: int,
                 upto: int | None = None, batch: int = 23) -> None:
    """Rows [start, stop) through a ShardWriter that resumes whatever is there; stops (as if
    killed: no finish, nothing flushed) after row `upto` when given."""
    from stores.cache_shards import ShardWriter

    w = ShardWriter(path, schema, {"key": "k1", "note": "test"}, start, stop)
    end = stop if upto is None else upto
    for a in range(start + w.rows_done, end, batch):
        w.append({k: v[a:min(a + batch, end)] for k, v in data.items()})
    if upto is None:
        w.finish()


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_shards_killed_and_resumed_finish_into_the_single_writer_cache(tmp_path, dtype):
    """Four chunk-aligned shards (the last one ragged) written out of order, two of them killed
    part-way and resumed, then finished by a CacheWriter: every file equals a single writer's,
    and no shard record is left."""
    schema = make_schema(num_tokens=200, dtype=dtype)  # 7 chunks of 32, the last one ragged
    data = make_data(schema)
    write_cache(tmp_path / "single", schema, data)
    path = tmp_path / "sharded"
    CacheWriter(path, schema, {"key": "k1", "note": "test"}).close()  # the layout, created once
    ranges = [(0, 64), (64, 128), (128, 160), (160, 200)]
    _write_shard(path, schema, data, *ranges[3])
    _write_shard(path, schema, data, *ranges[1], upto=100)  # killed: one whole chunk durable
    _write_shard(path, schema, data, *ranges[0], upto=20)  # killed before its first chunk
    assert json.loads((path / "progress.shard-64-128.json").read_text())["rows_done"] == 32
    for start, stop in ranges[:3]:
        _write_shard(path, schema, data, start, stop)
    with CacheWriter(path, schema, {"key": "k1", "note": "test"}) as w:
        assert w.rows_done == 200
        w.finish()
    assert stored_files(path) == stored_files(tmp_path / "single")
    assert (path / "progress.json").read_bytes() == (tmp_path / "single" / "progress.json").read_bytes()
    reader = CacheReader(path)
    np.testing.assert_array_equal(reader.column("doc_ids"), np.arange(200))


def test_a_single_writer_resumes_after_the_shards_joined_to_row_0(tmp_path):
    """A sharded run interrupted, then a run in one process: it starts where the finished shards
    that join row 0 end, and its cache is a single writer's."""
    schema = make_schema(num_tokens=200)
    data = make_data(schema)
    write_cache(tmp_path / "single", schema, data)
    path = tmp_path / "mixed"
    CacheWriter(path, schema, {"key": "k1", "note": "test"}).close()
    _write_shard(path, schema, data, 0, 64)
    _write_shard(path, schema, data, 64, 128, upto=100)
    _write_shard(path, schema, data, 160, 200)
    w = CacheWriter(path, schema, {"key": "k1", "note": "test"})
    assert w.rows_done == 96
    for a in range(96, 200, 23):
        w.append({k: v[a:min(a + 23, 200)] for k, v in data.items()})
    w.finish()
    assert stored_files(path) == stored_files(tmp_path / "single")


def test_a_shard_must_be_whole_chunks_of_a_created_cache(tmp_path):
    from stores.cache_shards import ShardWriter

    schema = make_schema(num_tokens=200)
    with pytest.raises(CacheError, match="not created yet"):
        ShardWriter(tmp_path / "c", schema, {"key": "k1"}, 0, 64)
    CacheWriter(tmp_path / "c", schema, {"key": "k1"}).close()
    with pytest.raises(CacheError, match=r"shard rows \[0, 50\).*multiples of chunk_rows"):
        ShardWriter(tmp_path / "c", schema, {"key": "k1"}, 0, 50)
    with pytest.raises(CacheMismatchError):
        ShardWriter(tmp_path / "c", schema, {"key": "other"}, 0, 64)
