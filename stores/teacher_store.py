"""The teacher's top-k of a cache on disk: two row-indexed .npy files in an artifact folder.

``topk_ids.npy`` (int32 [num_tokens, k]) and ``topk_logprobs.npy`` (float32 [num_tokens, k]).
Plain .npy rather than zarr: the arrays are small (512 bytes per token at k = 64) and are read
by random rows during training, which a memory map serves from the page cache without any
chunk decoding. Completeness is the artifact store's job: the stage fills the files in its
staging folder and publishes the folder only when the pass finished.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.teacher import TeacherTopK
from stores.files import write_json_atomic

IDS_FILE = "topk_ids.npy"
LOGPROBS_FILE = "topk_logprobs.npy"
PROGRESS_FILE = "progress.json"
"""Batches of an unfinished pass already on disk (staging only; removed before publishing)."""


class TeacherStoreError(RuntimeError):
    """The folder does not hold a usable teacher top-k; the message names the path and the fix."""


def create_teacher_topk(folder: Path, num_tokens: int, k: int) -> tuple[np.memmap, np.memmap]:
    """Preallocate both files in `folder` (replacing any earlier attempt) and return them as
    writable memory maps: ids [num_tokens, k] int32, logprobs [num_tokens, k] float32."""
    if num_tokens <= 0 or k <= 0:
        raise TeacherStoreError(f"num_tokens={num_tokens} and k={k} must be positive")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = np.lib.format.open_memmap(folder / IDS_FILE, mode="w+", dtype=np.int32, shape=(num_tokens, k))
    logprobs = np.lib.format.open_memmap(folder / LOGPROBS_FILE, mode="w+", dtype=np.float32, shape=(num_tokens, k))
    return ids, logprobs


def resume_teacher_topk(folder: Path, num_tokens: int, k: int, batch_rows: int) -> tuple[np.memmap, np.memmap, int]:
    """The memory maps of an interrupted pass in `folder` and the batches it had made durable,
    or fresh ones and 0 when there is nothing to resume (or it was for another shape)."""
    folder = Path(folder)
    done = _read_progress(folder)
    want = {"num_tokens": num_tokens, "k": k, "batch_rows": batch_rows}
    if done and all(done.get(key) == v for key, v in want.items()) and (folder / IDS_FILE).is_file() \
            and (folder / LOGPROBS_FILE).is_file():
        ids = np.load(folder / IDS_FILE, mmap_mode="r+")
        logprobs = np.load(folder / LOGPROBS_FILE, mmap_mode="r+")
        if ids.shape == logprobs.shape == (num_tokens, k):
            return ids, logprobs, int(done["batches_done"])
    (folder / PROGRESS_FILE).unlink(missing_ok=True)
    return (*create_teacher_topk(folder, num_tokens, k), 0)


def record_topk_progress(folder: Path, ids: np.memmap, logprobs: np.memmap, batches_done: int,
                         batch_rows: int) -> None:
    """Make the rows written so far durable, then record how many batches they are: a pass
    killed after this resumes at the next batch."""
    flush_teacher_topk(ids, logprobs)
    write_json_atomic(Path(folder) / PROGRESS_FILE, {"batches_done": batches_done, "batch_rows": batch_rows,
                                                      "num_tokens": int(ids.shape[0]), "k": int(ids.shape[1])})


def finish_teacher_topk(folder: Path, *arrays: np.memmap) -> None:
    """Flush the pass's pages and drop its progress record: the folder is a finished top-k."""
    flush_teacher_topk(*arrays)
    (Path(folder) / PROGRESS_FILE).unlink(missing_ok=True)


def _read_progress(folder: Path) -> dict | None:
    try:
        return json.loads((folder / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None


def flush_teacher_topk(*arrays: np.memmap) -> None:
    """Write the memory maps' pages to disk before the folder is published."""
    for a in arrays:
        if isinstance(a, np.memmap):
            a.flush()


def open_teacher_topk(folder: Path, mmap: bool = True) -> TeacherTopK:
    """Read-only view of a stored top-k (memory-mapped by default; `mmap=False` loads it into RAM)."""
    folder = Path(folder)
    paths = [folder / IDS_FILE, folder / LOGPROBS_FILE]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise TeacherStoreError(f"{folder} lacks {missing}; run the teacher_topk stage for this cache first")
    try:
        ids, logprobs = (np.load(p, mmap_mode="r" if mmap else None) for p in paths)
    except ValueError as e:
        raise TeacherStoreError(f"{folder} holds unreadable .npy files ({e}); delete the folder and re-run the stage") from e
    try:
        return TeacherTopK(ids=ids, logprobs=logprobs)
    except ValueError as e:
        raise TeacherStoreError(f"{folder}: {e}") from e
