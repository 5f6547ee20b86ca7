"""Atomic writes, the file hasher and tensor files with metadata."""

from __future__ import annotations

import hashlib

import pytest
import torch

from stores.files import (
    TensorFileError,
    file_sha256,
    load_tensors,
    load_tensors_with_metadata,
    save_tensors,
    write_atomic,
    write_json_atomic,
)


def test_save_and_load_tensors_with_tied_weights_and_metadata(tmp_path):
    w = torch.randn(5, 3)
    tensors = {"a": w, "tied": w, "b": torch.arange(4, dtype=torch.int64)}
    path = tmp_path / "sub" / "heads.safetensors"
    save_tensors(path, tensors, metadata={"norm_kind": "layer"})
    got, meta = load_tensors_with_metadata(path)
    assert set(got) == set(tensors)
    for k in tensors:
        assert torch.equal(got[k], tensors[k])
    assert meta == {"norm_kind": "layer"}
    assert set(load_tensors(path)) == set(tensors)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["heads.safetensors"]  # no temporary left behind


def test_load_tensors_names_the_missing_or_broken_file(tmp_path):
    with pytest.raises(TensorFileError, match="no tensors"):
        load_tensors(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    save_tensors(bad, {"a": torch.randn(64, 64)})
    bad.write_bytes(bad.read_bytes()[:100])  # truncated
    with pytest.raises(TensorFileError, match="bad.safetensors"):
        load_tensors(bad)


def test_write_atomic_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "x.bin"
    write_atomic(path, b"old")

    def fail(f):
        f.write(b"half")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        write_atomic(path, fail)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]
    write_json_atomic(path, {"b": 1, "a": 2})
    assert path.read_text().index('"a"') < path.read_text().index('"b"')  # sorted keys: stable bytes


def test_file_sha256_matches_hashlib(tmp_path):
    data = bytes(range(256)) * 40_000  # spans several read blocks
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()
