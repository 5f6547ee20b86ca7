import json
import os

import pytest

from stores.artifacts import ArtifactNotFound, ArtifactStore, Manifest, StoreError, content_key


def test_content_key_sensitive_to_every_part():
    base = content_key("extract", "v1", {"a": 1, "b": [1, 2]}, {"x": "k"})
    assert base == content_key("extract", "v1", {"b": [1, 2], "a": 1}, {"x": "k"})  # order-free
    assert base != content_key("train_heads", "v1", {"a": 1, "b": [1, 2]}, {"x": "k"})
    assert base != content_key("extract", "v2", {"a": 1, "b": [1, 2]}, {"x": "k"})
    assert base != content_key("extract", "v1", {"a": 2, "b": [1, 2]}, {"x": "k"})
    assert base != content_key("extract", "v1", {"a": 1, "b": [1, 2]}, {"x": "j"})


def test_publish_is_atomic_and_listed(tmp_path):
    store = ArtifactStore(tmp_path)
    key = content_key("s", "v", {}, {})
    st = store.staging("s", key)
    (st / "payload.bin").write_bytes(b"abc")
    assert not store.exists("s", key)  # staged work is never complete
    store.publish(Manifest(stage="s", key=key, config={}, inputs={}, code_version="v", metrics={"m": 1}))
    assert store.exists("s", key)
    assert not (tmp_path / "staging" / "s" / key).exists()
    m = store.manifest("s", key)
    assert m.files["payload.bin"]["size"] == 3 and len(m.files["payload.bin"]["sha256"]) == 64
    assert [x.key for x in store.iter_manifests()] == [key]
    assert store.resolve(key[:6]).key == key
    with pytest.raises(ArtifactNotFound):
        store.resolve("0" * 64)


def test_pointer_roundtrip(tmp_path):
    store = ArtifactStore(tmp_path)
    assert store.get_pointer("current") is None
    store.set_pointer("current", "calibrate", "abc", note="x")
    assert store.get_pointer("current") == {"stage": "calibrate", "key": "abc", "note": "x"}


def test_file_hasher_memoises(tmp_path):
    store = ArtifactStore(tmp_path / "root")
    f = tmp_path / "w.bin"
    f.write_bytes(b"x" * 1000)
    h = store.file_hasher()
    first = h(f)
    memo = json.loads((tmp_path / "root" / "hashes.json").read_text())
    assert list(memo.values()) == [first]
    f.write_bytes(b"y" * 1000)
    os.utime(f, ns=(1, 1))
    assert h(f) != first


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_root(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(StoreError, match="not writable"):
        ArtifactStore(ro / "sub")


def test_root_under_a_file_is_unwritable(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StoreError, match="EXITFLOW_HOME"):
        ArtifactStore(f / "root")
