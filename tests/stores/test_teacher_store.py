"""The stored teacher top-k: .npy files written through memory maps, read back exactly."""

from __future__ import annotations

import numpy as np
import pytest

from stores.teacher_store import (
    IDS_FILE,
    LOGPROBS_FILE,
    TeacherStoreError,
    create_teacher_topk,
    flush_teacher_topk,
    open_teacher_topk,
)


def test_round_trip_through_memory_maps(tmp_path):
    rng = np.random.default_rng(0)
    want_ids = rng.integers(0, 49152, (1000, 8)).astype(np.int32)
    want_lp = -rng.random((1000, 8)).astype(np.float32)
    ids, logprobs = create_teacher_topk(tmp_path / "a", 1000, 8)
    assert isinstance(ids, np.memmap) and ids.dtype == np.int32 and logprobs.dtype == np.float32
    rows = rng.permutation(1000)
    for a in range(0, 1000, 300):  # written by row index, in any order
        ids[rows[a : a + 300]] = want_ids[rows[a : a + 300]]
        logprobs[rows[a : a + 300]] = want_lp[rows[a : a + 300]]
    flush_teacher_topk(ids, logprobs)
    del ids, logprobs

    for mmap in (True, False):
        topk = open_teacher_topk(tmp_path / "a", mmap=mmap)
        assert (topk.num_tokens, topk.k) == (1000, 8)
        assert isinstance(topk.ids, np.memmap) == mmap
        np.testing.assert_array_equal(topk.ids, want_ids)
        np.testing.assert_array_equal(topk.logprobs, want_lp)
    # plain .npy: readable without this package
    np.testing.assert_array_equal(np.load(tmp_path / "a" / IDS_FILE), want_ids)


def test_missing_or_damaged_files_are_refused(tmp_path):
    with pytest.raises(TeacherStoreError, match="teacher_topk stage"):
        open_teacher_topk(tmp_path / "nothing")
    folder = tmp_path / "b"
    create_teacher_topk(folder, 10, 4)
    np.save(folder / LOGPROBS_FILE, np.zeros((10, 4), np.float64))  # wrong dtype
    with pytest.raises(TeacherStoreError, match="float32"):
        open_teacher_topk(folder)
    (folder / IDS_FILE).write_bytes(b"not an npy file")
    with pytest.raises(TeacherStoreError, match="unreadable"):
        open_teacher_topk(folder)
    with pytest.raises(TeacherStoreError, match="positive"):
        create_teacher_topk(folder, 0, 4)
