"""The artifact store on a URL root: ``file://`` (a local folder, atomic rename) and
``memory://`` (an fsspec filesystem without rename: upload, manifest last, local mirror)."""

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from stores.artifacts import ArtifactBroken, ArtifactStore, BrokenArtifact, Manifest, content_key
from stores.remote import MIRROR_ENV, RemoteError, RemoteRoot, is_remote, open_zarr




@pytest.fixture(params=["file", "memory"])
def root_url(request, tmp_path, memory_url):
    return f"file://{tmp_path}/root" if request.param == "file" else memory_url


def _stage(store: ArtifactStore, stage: str = "s", **config) -> Manifest:
    """Stage a payload of two files (one in a subfolder) and return its manifest (unpublished)."""
    key = content_key(stage, "v", config, {})
    st = store.staging(stage, key)
    (st / "payload.bin").write_bytes(b"abc" * 100)
    (st / "sub").mkdir(exist_ok=True)
    (st / "sub" / "part.json").write_text('{"x": 1}')
    return Manifest(stage=stage, key=key, config=config, inputs={}, code_version="v", metrics={"m": 1})


def test_url_roots_are_told_apart(tmp_path):
    assert not is_remote(tmp_path) and not is_remote(str(tmp_path)) and not is_remote(f"file://{tmp_path}")
    assert is_remote("memory://b/x") and is_remote("s3://bucket/exitflow")
    local = ArtifactStore(f"file://{tmp_path}/r")
    assert local.remote is None and local.root == tmp_path / "r" and local.location == str(tmp_path / "r")


def test_store_contract(root_url):
    store = ArtifactStore(root_url)
    m = _stage(store)
    assert not store.exists("s", m.key) and list(store.listing()) == []
    path = store.publish(m)
    assert store.exists("s", m.key)
    assert (path / "payload.bin").read_bytes() == b"abc" * 100 and (path / "sub" / "part.json").is_file()
    assert store.manifest("s", m.key).metrics == {"m": 1}
    assert [a.key for a in store.listing()] == [m.key] == [a.key for a in store.listing("s")]
    assert store.size("s", m.key) >= 308
    assert store.verify("s", m.key).ok and store.verify("s", m.key, checksums=False).ok
    assert store.get_pointer("current") is None
    store.set_pointer("current", "s", m.key, note="x")
    assert store.get_pointer("current") == {"stage": "s", "key": m.key, "note": "x"}
    # a second store on the same root (another process, another machine's mirror) sees the same
    other = ArtifactStore(root_url, writable=False)
    assert other.exists("s", m.key) and other.get_pointer("current")["key"] == m.key
    store.delete("s", m.key)
    assert not store.exists("s", m.key) and list(store.listing()) == []


def test_remote_publish_commits_with_the_manifest_last(memory_url):
    store = ArtifactStore(memory_url)
    m = _stage(store)
    store.publish(m)
    remote = RemoteRoot(memory_url)
    objects = remote.objects(RemoteRoot.artifact("s", m.key))
    assert set(objects) == {"payload.bin", "sub/part.json", "manifest.json"}
    committed = json.loads(remote.read(f"{RemoteRoot.artifact('s', m.key)}/manifest.json"))
    assert committed["objects"] == {"payload.bin": 300, "sub/part.json": 8}  # every file with its size
    assert (store.root / "staging" / "s" / m.key).exists() is False  # the staged folder became the mirror copy
    assert (store.root / "artifacts" / "s" / m.key / "manifest.json").is_file()


def test_interrupted_upload_is_invisible_and_a_retry_publishes(memory_url, monkeypatch):
    store = ArtifactStore(memory_url)
    m = _stage(store)
    remote = RemoteRoot(memory_url)
    remote.write(f"{RemoteRoot.artifact('s', m.key)}/leftover.bin", b"from an older attempt")
    put = RemoteRoot._put
    calls = []

    def failing_put(self, local, rel):
        calls.append(rel)
        if len(calls) == 2:
            raise OSError("connection reset (simulated)")
        put(self, local, rel)

    monkeypatch.setattr(RemoteRoot, "_put", failing_put)
    with pytest.raises(OSError, match="simulated"):
        store.publish(m)
    assert remote.objects(RemoteRoot.artifact("s", m.key))  # a file did arrive...
    reader = ArtifactStore(memory_url, writable=False)
    assert not reader.exists("s", m.key) and list(reader.listing()) == []  # ...but nobody sees it
    monkeypatch.setattr(RemoteRoot, "_put", put)
    store.publish(m)  # the staging folder is still there: the retry uploads it again
    assert reader.exists("s", m.key)
    assert "leftover.bin" not in remote.objects(RemoteRoot.artifact("s", m.key))  # strays cleaned


def test_fresh_mirror_downloads_and_checks(memory_url, tmp_path, monkeypatch):
    store = ArtifactStore(memory_url)
    m = _stage(store)
    store.publish(m)
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "mirror2"))
    elsewhere = ArtifactStore(memory_url)
    assert elsewhere.root != store.root
    assert not (elsewhere.root / "artifacts" / "s" / m.key).exists()
    path = elsewhere.path("s", m.key)
    assert path.is_relative_to(tmp_path / "mirror2")
    assert (path / "payload.bin").read_bytes() == b"abc" * 100
    assert elsewhere.verify("s", m.key).ok
    # same size, other bytes: the download's checksum check refuses it
    remote = RemoteRoot(memory_url)
    remote.write(f"{RemoteRoot.artifact('s', m.key)}/payload.bin", b"xyz" * 100)
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "mirror3"))
    third = ArtifactStore(memory_url)
    with pytest.raises(RemoteError, match="damaged.*payload.bin"):
        third.path("s", m.key)
    assert not (third.root / "artifacts" / "s" / m.key).exists()  # nothing half-copied stays
    assert not third.verify("s", m.key).ok
    # a missing object: the quick check (as `exitflow ls` runs it) names it without a download
    remote.fs.rm_file(remote._path(f"{RemoteRoot.artifact('s', m.key)}/sub/part.json"))
    quick = third.verify("s", m.key, checksums=False)
    assert not quick.ok and "sub/part.json: missing" in quick.summary()


def test_unreadable_remote_manifest_is_broken(memory_url):
    store = ArtifactStore(memory_url)
    key = content_key("s", "v", {}, {})
    RemoteRoot(memory_url).write(f"{RemoteRoot.artifact('s', key)}/manifest.json", b"{not json")
    assert not store.exists("s", key)
    with pytest.raises(ArtifactBroken):
        store.exists("s", key, strict=True)
    [found] = store.listing()
    assert isinstance(found, BrokenArtifact) and "not JSON" in found.reason
    assert f"at {memory_url}/artifacts/s/{key}" in found.message()  # the URL, not the mirror folder


def test_an_unreadable_root_is_an_error_not_a_missing_artifact(memory_url, monkeypatch):
    store = ArtifactStore(memory_url)

    def denied(self, path, **kwargs):
        raise PermissionError("access denied (simulated)")

    monkeypatch.setattr(type(store.remote.fs), "cat_file", denied)
    with pytest.raises(RemoteError, match="cannot read .*credentials"):
        store.exists("s", content_key("s", "v", {}, {}))


def test_zarr_over_fsspec_reads_the_published_group(memory_url):
    store = ArtifactStore(memory_url)
    key = content_key("extract", "v", {}, {})
    st = store.staging("extract", key)
    group = zarr.open_group(str(st / "cache.zarr"), mode="w")
    x = group.create_array("layer_1", shape=(10, 4), dtype="float16", chunks=(4, 4))
    x[:] = np.arange(40, dtype=np.float16).reshape(10, 4)
    group.attrs["schema"] = {"num_tokens": 10}
    store.publish(Manifest(stage="extract", key=key, config={}, inputs={}, code_version="v"))
    remote = open_zarr(f"{memory_url}/artifacts/extract/{key}/cache.zarr")
    local = zarr.open_group(str(store.path("extract", key) / "cache.zarr"), mode="r")
    np.testing.assert_array_equal(remote["layer_1"][:], local["layer_1"][:])
    assert dict(remote.attrs) == dict(local.attrs)
    with pytest.raises(RemoteError, match="not inside a published artifact"):
        open_zarr(f"{memory_url}/artifacts/extract/{'0' * 64}/cache.zarr")


def test_exitflow_home_may_be_a_url(memory_url, monkeypatch):
    monkeypatch.setenv("EXITFLOW_HOME", memory_url)
    store = ArtifactStore()
    assert store.remote is not None and store.location == memory_url


def test_mirror_is_per_url(tmp_path, monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path))
    a, b = ArtifactStore("memory://one/root"), ArtifactStore("memory://two/root")
    assert a.root.parent == b.root.parent == Path(tmp_path) and a.root != b.root
