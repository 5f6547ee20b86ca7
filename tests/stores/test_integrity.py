"""Damage after the fact: checksums recorded while writing, checked when reading; broken
artifacts listed instead of failing a whole root; names that cannot leave the root."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
from test_cache import make_data, make_schema, write_cache

import stores.cache as cache_module
from stores.artifacts import ArtifactBroken, ArtifactStore, BrokenArtifact, Manifest, StoreError, content_key
from stores.cache import CacheCorrupt, CacheReader, CacheWriter
from stores.integrity import LOG, SIDECAR, Sidecar, crc32_file


@pytest.fixture
def cache(tmp_path) -> Path:
    path = tmp_path / "c.zarr"
    write_cache(path, make_schema(), make_data(make_schema()))
    return path


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- the cache


def test_every_chunk_is_recorded_while_writing(cache):
    schema = make_schema()
    sidecar = Sidecar.read(cache)
    assert set(sidecar.files) | sidecar.absent == {rel for _, _, rel in schema.chunk_files()}
    for rel, (size, digest) in sidecar.files.items():
        assert crc32_file(cache / rel) == (size, digest) and size == schema.chunk_bytes(rel.split("/")[0])
    assert json.loads((cache / "progress.json").read_text())["checksums"] == SIDECAR
    assert not (cache / LOG).exists()  # folded into the sidecar


def test_a_deleted_chunk_stops_the_reader_instead_of_reading_zeros(cache):
    (cache / "layer_1/c/2/0").unlink()
    with pytest.raises(CacheCorrupt, match=r"layer_1/c/2/0: missing .*exitflow verify k1.*--delete"):
        CacheReader(cache)


def test_a_truncated_chunk_is_named_not_a_reshape_error(cache):
    chunk = cache / "final/c/1/0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(CacheCorrupt, match=r"final/c/1/0: 100 bytes, recorded 1024"):
        CacheReader(cache)


def test_changed_bytes_are_caught_on_first_read_once_per_reader(cache, monkeypatch):
    _flip_a_byte(cache / "layer_3/c/4/0")
    reader = CacheReader(cache)  # same size: the open-time check passes
    np.testing.assert_array_equal(reader.column("doc_ids", slice(0, 64)), np.arange(64))
    with pytest.raises(CacheCorrupt, match=r"layer_3/c/4/0: crc32 \w+, recorded \w+"):
        reader.hidden("layer_3", slice(100, 140))
    calls = []
    real = cache_module.check_file
    monkeypatch.setattr(cache_module, "check_file", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    reader.hidden("layer_1")
    reader.hidden("layer_1", np.array([3, 40, 41]))
    assert sorted(calls) == sorted(f"layer_1/c/{i}/0" for i in range(7))  # each chunk once


def test_a_chunk_of_fill_values_is_recorded_absent(tmp_path):
    schema = make_schema()
    data = make_data(schema)
    data["doc_ids"][:32] = 0  # zarr stores no chunk that is all fill value
    write_cache(tmp_path / "c", schema, data)
    assert "doc_ids/c/0" in Sidecar.read(tmp_path / "c").absent
    np.testing.assert_array_equal(CacheReader(tmp_path / "c").column("doc_ids"), data["doc_ids"])
    (tmp_path / "c/doc_ids/c/0").write_bytes(np.ones(32, np.int32).tobytes())
    with pytest.raises(CacheCorrupt, match="doc_ids/c/0: present, but recorded as absent"):
        CacheReader(tmp_path / "c")


@pytest.mark.parametrize("log_damage", ["none", "torn", "lost"])
def test_a_resumed_write_keeps_its_checksums(tmp_path, cache, log_damage):
    schema, data = make_schema(), make_data(make_schema())
    path = tmp_path / "resumed"
    write_cache(path, schema, data, stop=150, finish=False).close()  # killed after 4 whole chunks
    log = path / LOG
    if log_damage == "torn":
        log.write_bytes(log.read_bytes() + b'{"layer_1/c/4/0":[10')
    elif log_damage == "lost":  # a power cut, or a staging cache from before checksums were kept
        log.unlink()
    w = CacheWriter(path, schema, {"key": "k1", "note": "test"})
    assert w.rows_done == 128
    for a in range(128, 200, 23):
        w.append({k: v[a:a + 23] for k, v in data.items()})
    w.finish()
    assert Sidecar.read(path) == Sidecar.read(cache)
    CacheReader(path).hidden("final")


def test_a_cache_without_checksums_reads_with_one_warning(cache, caplog):
    (cache / SIDECAR).unlink()
    progress = json.loads((cache / "progress.json").read_text())
    del progress["checksums"]
    (cache / "progress.json").write_text(json.dumps(progress))
    with caplog.at_level(logging.WARNING, logger="stores.cache"):
        CacheReader(cache).hidden("layer_1")
        CacheReader(cache).hidden("layer_1")
    assert [r.message for r in caplog.records].count(next(r.message for r in caplog.records)) == 1
    assert "cannot be verified" in caplog.records[0].message
    chunk = cache / "layer_1/c/0/0"
    chunk.write_bytes(chunk.read_bytes()[:10])  # sizes are still checked
    with pytest.raises(CacheCorrupt, match="layer_1/c/0/0: 10 bytes"):
        CacheReader(cache)


def test_unreadable_progress_or_sidecar_is_corruption(cache):
    (cache / SIDECAR).write_text("{")
    with pytest.raises(CacheCorrupt, match="checksums.json is unreadable"):
        CacheReader(cache)
    (cache / "progress.json").write_text("garbage")
    with pytest.raises(CacheCorrupt, match="progress.json is unreadable"):
        CacheReader(cache)


# ----------------------------------------------------------------------------- the store


def _publish(store: ArtifactStore, i: int, stage: str = "extract", cache: Path | None = None, prefix: str = "") -> str:
    key = prefix + content_key(stage, "v", {"i": i}, {})[len(prefix):]
    staging = store.staging(stage, key)
    (staging / "teacher.safetensors").write_bytes(b"w" * (10 + i))
    if cache is not None:
        os.replace(cache, staging / "cache.zarr")
    store.publish(Manifest(stage=stage, key=key, config={"i": i}, inputs={}, code_version="v"))
    return key


def test_manifest_records_every_file_and_names_the_chunk_sidecar(tmp_path, cache):
    store = ArtifactStore(tmp_path / "root")
    key = _publish(store, 0, cache=cache)
    files = store.manifest("extract", key).files
    assert files["teacher.safetensors"]["size"] == 10 and len(files["teacher.safetensors"]["sha256"]) == 64
    folder = files["cache.zarr/"]
    assert folder["checksums"] == SIDECAR
    assert {"zarr.json", "layer_1/zarr.json", "progress.json", SIDECAR} <= set(folder["contents"])
    assert not any("/c/" in rel for rel in folder["contents"])  # chunks: the sidecar's, not hashed again
    assert store.verify("extract", key).ok


def test_verify_names_each_damaged_file(tmp_path, cache):
    store = ArtifactStore(tmp_path / "root")
    key = _publish(store, 0, cache=cache)
    folder = store.path("extract", key)
    assert store.verify("extract", key).problems == []
    (folder / "teacher.safetensors").write_bytes(b"x" * 10)  # same size, other bytes
    (folder / "cache.zarr/layer_1/c/0/0").unlink()
    _flip_a_byte(folder / "cache.zarr/final/c/3/0")
    (folder / "cache.zarr/layer_3/zarr.json").write_text("{}")
    problems = store.verify("extract", key).problems
    assert problems == ["cache.zarr/layer_3/zarr.json: 2 bytes, recorded " f"{len((folder / 'cache.zarr/layer_1/zarr.json').read_bytes())}",
                        "cache.zarr/final/c/3/0: crc32 " + crc32_file(folder / "cache.zarr/final/c/3/0")[1]
                        + ", recorded " + Sidecar.read(folder / "cache.zarr").files["final/c/3/0"][1],
                        "cache.zarr/layer_1/c/0/0: missing (recorded 1024 bytes)",
                        "teacher.safetensors: sha256 differs from the manifest's"]
    quick = store.verify("extract", key, checksums=False)  # what ls checks: presence and sizes
    assert quick.problems == [problems[0], problems[2]]


def test_a_garbage_manifest_breaks_one_artifact_not_the_root(tmp_path, caplog):
    store = ArtifactStore(tmp_path)
    good, bad = _publish(store, 1), _publish(store, 2)
    (store.path("extract", bad) / "manifest.json").write_text("garbage")
    assert [m.key for m in store.iter_manifests()] == [good]
    assert "skipping extract artifact" in caplog.text
    (broken,) = [a for a in store.listing() if isinstance(a, BrokenArtifact)]
    assert broken.key == bad and "manifest.json is not JSON" in broken.reason
    assert not store.exists("extract", bad)
    for read in (lambda: store.manifest("extract", bad), lambda: store.resolve(bad[:8]),
                 lambda: store.exists("extract", bad, strict=True)):
        with pytest.raises(ArtifactBroken, match=rf"{bad[:16]} .*is broken.*exitflow verify {bad[:16]}"):
            read()
    assert store.verify("extract", bad).problems == [broken.reason]
    (store.path("extract", bad) / "manifest.json").write_text(json.dumps({"stage": "extract", "key": good}))
    assert "lacks config" in store.find(bad).reason


def test_publish_replaces_a_folder_without_manifest(tmp_path):
    store = ArtifactStore(tmp_path)
    key = _publish(store, 3)
    (store.path("extract", key) / "manifest.json").unlink()
    (store.path("extract", key) / "stale").write_text("x")
    assert not store.exists("extract", key)
    _publish(store, 3)
    assert store.exists("extract", key) and not (store.path("extract", key) / "stale").exists()
    assert not list((tmp_path / "staging").rglob("*.safetensors"))  # nothing left aside
    (store.path("extract", key) / "marker").write_text("theirs")
    _publish(store, 3)  # complete: same key, same content, the first one stays
    assert (store.path("extract", key) / "marker").exists()


def test_a_read_only_store_reads_and_refuses_writes(tmp_path):
    key = _publish(ArtifactStore(tmp_path), 4)
    store = ArtifactStore(tmp_path, writable=False)
    assert store.manifest("extract", key).key == key and store.verify("extract", key).ok
    for write in (lambda: store.staging("extract", key), lambda: store.delete("extract", key),
                  lambda: store.set_pointer("current", "extract", key), lambda: store.memo_put("m", "k", {})):
        with pytest.raises(StoreError, match="read-only"):
            write()
    assert store.exists("extract", key)
    assert not ArtifactStore(tmp_path / "absent", writable=False).root.exists()  # reading creates nothing


def test_empty_and_ambiguous_prefixes(tmp_path):
    store = ArtifactStore(tmp_path)
    for i in range(13):
        _publish(store, i, ("extract", "report")[i % 2], prefix="abc")
    with pytest.raises(StoreError, match="empty key prefix"):
        store.find("")
    with pytest.raises(StoreError, match="empty key prefix"):
        store.resolve("")
    with pytest.raises(StoreError, match=r"'abc' is ambiguous \(13 artifacts\)") as e:
        store.find("abc")
    listed = [line.split() for line in str(e.value).splitlines()[1:]]
    assert len(listed) == 11 and listed[-1] == ["...", "and", "3", "more"]
    assert all(stage in ("extract", "report") and len(key) == 16 and key.startswith("abc") and created.startswith("20")
               for stage, key, created in listed[:10])


@pytest.mark.parametrize("bad", ["../x", "a/b", "/etc", "", "ABC", "f" * 64 + "/..", ".", "k1"])
def test_keys_and_pointer_names_cannot_leave_the_root(tmp_path, bad):
    store = ArtifactStore(tmp_path / "root")
    key = content_key("s", "v", {}, {})
    calls = [lambda: store.path("extract", bad), lambda: store.staging("extract", bad),
             lambda: store.exists("extract", bad), lambda: store.manifest("extract", bad),
             lambda: store.set_pointer("current", "extract", bad), lambda: store.resolve(bad)]
    if bad != "k1":  # a fine stage or pointer name, but no key
        calls += [lambda: store.path(bad, key), lambda: store.set_pointer(bad, "extract", key),
                  lambda: store.get_pointer(bad)]
    for call in calls:
        with pytest.raises(StoreError, match=re.escape(repr(bad)) if bad else "''|empty key prefix"):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]
    assert not [p for p in (tmp_path / "root").rglob("*") if p.is_file()]
