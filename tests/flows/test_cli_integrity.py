"""Damaged artifacts on a real tiny extraction, seen through the stages and the CLI: a stage
stops with the file named instead of training on zeros or failing deep in zarr; `exitflow ls`,
`show` and `verify` say what is broken; a re-run or `verify --delete` repairs it; a read-only
root can still be inspected."""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
from pathlib import Path

import pytest
from test_extract_stage import _cfg, run_extract

from flows.cli import main
from flows.stages.base import StageContext, run_stage
from flows.stages.extract import cache_path
from flows.stages.train_heads import TrainHeadsStage
from stores.artifacts import ArtifactBroken, ArtifactStore, Manifest, content_key
from stores.cache import CacheCorrupt, CacheReader

HEADS = ("heads.epochs=1", "heads.batch_tokens=256", "heads.warmup_steps=2", "heads.negatives=64",
         "heads.topk=16", "heads.efficient_loss=false")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_model_dir, corpus_dir):
    """A root with a train cache (16 chunks per array) and a report artifact beside it."""
    root = tmp_path_factory.mktemp("pristine")
    cfg = _cfg(tiny_model_dir, corpus_dir, *HEADS)
    store = ArtifactStore(root)
    key = run_extract(cfg, store)
    report = content_key("report", "t", {}, {})
    (store.staging("report", report) / "report.html").write_text("<html></html>")
    store.publish(Manifest(stage="report", key=report, config={}, inputs={"train_cache": key}, code_version="t"))
    return cfg, root, key


@pytest.fixture
def copy(pristine, tmp_path):
    cfg, root, key = pristine
    shutil.copytree(root, tmp_path / "root")
    return cfg, ArtifactStore(tmp_path / "root"), key


def cli(capsys, root: Path, *args: str) -> tuple[int, str]:
    code = main(["--root", str(root), *args])
    out = capsys.readouterr()
    return code, out.out + out.err


def train_heads(cfg, store: ArtifactStore, cache: str) -> str:
    return run_stage(TrainHeadsStage(), StageContext(cfg, store, progress=False), {"cache": cache})


def test_a_deleted_chunk_stops_training_and_verify_delete_repairs_it(copy, capsys):
    cfg, store, key = copy
    (cache_path(store, key) / "layer_2/c/1/0").unlink()
    with pytest.raises(CacheCorrupt, match=rf"layer_2/c/1/0: missing .*`exitflow verify {key}`.*--delete"):
        train_heads(cfg, store, key)  # used to train on the zeros zarr reads for a missing chunk
    assert not list(store.iter_manifests("train_heads"))
    code, out = cli(capsys, store.root, "ls")
    assert code == 0 and "BROKEN" in out and "cache.zarr/layer_2/c/1/0: missing" in out
    code, out = cli(capsys, store.root, "verify")
    assert code == 1 and f"BROKEN  extract      {key[:16]}  cache.zarr/layer_2/c/1/0: missing" in out
    assert "ok      report" in out
    code, out = cli(capsys, store.root, "verify", key[:10], "--delete")
    assert code == 1 and "deleted" in out and not store.path("extract", key).exists()
    assert run_extract(cfg, store) == key
    assert cli(capsys, store.root, "verify", key[:10])[0] == 0


def test_a_truncated_chunk_is_named_by_the_reader_ls_and_show(copy, capsys):
    cfg, store, key = copy
    chunk = cache_path(store, key) / "final/c/0/0"
    chunk.write_bytes(chunk.read_bytes()[:1000])
    with pytest.raises(CacheCorrupt, match=r"final/c/0/0: 1000 bytes, recorded \d+"):
        CacheReader(cache_path(store, key)).hidden("final")  # used to be a raw `cannot reshape array`
    code, out = cli(capsys, store.root, "ls")
    assert code == 0 and "BROKEN" in out and "final/c/0/0: 1000 bytes" in out
    code, out = cli(capsys, store.root, "show", key[:8])
    assert code == 1 and '"status": "BROKEN: cache.zarr/final/c/0/0: 1000 bytes' in out


def test_a_garbage_manifest_breaks_only_its_artifact(copy, capsys):
    cfg, store, key = copy
    (store.path("extract", key) / "manifest.json").write_text("garbage")
    code, out = cli(capsys, store.root, "ls")
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert code == 0 and "BROKEN" in rows["extract"] and "manifest.json is not JSON" in rows["extract"]
    assert rows["report"].split()[2] == "ok"
    code, out = cli(capsys, store.root, "show", key[:8])
    assert code == 1 and f"extract artifact {key[:16]}" in out and "is broken: manifest.json is not JSON" in out
    with pytest.raises(ArtifactBroken, match=rf"extract artifact {key[:16]} .*`exitflow verify {key[:16]}`"):
        train_heads(cfg, store, key)
    assert cli(capsys, store.root, "verify")[0] == 1
    assert run_extract(cfg, store) == key and store.exists("extract", key)  # a re-run replaces it


def test_a_deleted_manifest_is_rebuilt_by_a_rerun(copy, capsys):
    cfg, store, key = copy
    (store.path("extract", key) / "manifest.json").unlink()
    assert not store.exists("extract", key)
    assert run_extract(cfg, store) == key  # used to keep the folder and discard the fresh copy
    assert store.manifest("extract", key).metrics["tokens"] == CacheReader(cache_path(store, key)).num_tokens
    assert cli(capsys, store.root, "verify")[0] == 0


def test_show_refuses_an_empty_prefix_and_lists_an_ambiguous_one(copy, capsys):
    cfg, store, key = copy
    code, out = cli(capsys, store.root, "show", "")
    assert code == 2 and "empty key prefix" in out  # used to show the only artifact
    twin = key[:4] + content_key("report", "twin", {}, {})[4:]
    store.staging("report", twin)
    store.publish(Manifest(stage="report", key=twin, config={}, inputs={}, code_version="t"))
    code, out = cli(capsys, store.root, "show", key[:4])
    assert code == 2 and "ambiguous (2 artifacts)" in out
    assert f"extract      {key[:16]}  20" in out and f"report       {twin[:16]}  20" in out
    code, out = cli(capsys, store.root, "show", "../artifacts")
    assert code == 2 and "'../artifacts' is not valid" in out


# ----------------------------------------------------------------------------- read-only root


def _read_only(monkeypatch, root: Path) -> None:
    """Every write under `root` fails as on a read-only mount (EROFS), whoever runs the test."""
    top = str(root.resolve())

    def under(path) -> bool:
        try:
            return os.path.abspath(os.fsdecode(path)).startswith(top)
        except TypeError:
            return False

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    real_os_open, real_open = os.open, builtins.open

    def os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND) and under(path):
            refuse(path)
        return real_os_open(path, flags, *a, **k)

    def open_(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and under(file):
            refuse(file)
        return real_open(file, mode, *a, **k)

    def mkdir(path, *a, **k):
        if under(path):
            if os.path.exists(path):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(path))
            refuse(path)
        return real_mkdir(path, *a, **k)

    real_mkdir = os.mkdir
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir)
    for name in ("unlink", "remove", "rmdir", "rename", "replace", "utime", "chmod"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, _real=real, **k: refuse(a[0]) if any(map(under, a[:2]))
                            else _real(*a, **k))


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_a_read_only_root_can_be_listed_shown_verified_and_reported(copy, capsys, monkeypatch):
    cfg, store, key = copy
    before = _snapshot(store.root)
    _read_only(monkeypatch, store.root)
    for args in (["ls"], ["show", key[:8]], ["verify"], ["verify", key[:8]], ["report"], ["config"]):
        code, out = cli(capsys, store.root, *args)
        assert code == 0, (args, out)  # ls and show used to refuse: the root's write probe failed
    assert _snapshot(store.root) == before
    monkeypatch.undo()
    (cache_path(store, key) / "targets/c/3").unlink()
    _read_only(monkeypatch, store.root)
    code, out = cli(capsys, store.root, "verify", "--delete")
    assert code == 2 and "BROKEN" in out and "is not writable" in out and store.path("extract", key).is_dir()
