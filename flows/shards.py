"""Sharded extraction: the extract stage's sequences, cut into chunk-aligned shards, run as
Prefect tasks on Prefect's Dask task runner.

With ``extract.workers > 1`` the shards run on a Dask ``LocalCluster`` of that many
single-threaded worker processes; with ``extract.cluster`` on the workers of a running Dask
scheduler. Each shard task writes its own rows of the one cache the stage created in its staging
folder (:class:`stores.cache_shards.ShardWriter`) and resumes alone after a crash; the stage then
finishes the cache as a single writer would, so the published cache, its key and its checksums
are the same however many workers wrote it. Workers are separate processes (or machines): a task
gets its shard's token rows and the config, loads the backbone once per worker process, and
needs the artifact root on a filesystem it shares with the stage.
"""

from __future__ import annotations

import functools
import os
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect_dask import DaskTaskRunner

from pipeline.backbone import Backbone, load_backbone
from pipeline.config import ConfigError, ExtractConfig, ModelConfig
from pipeline.data import PackedSplit
from pipeline.model_files import BackboneError
from pipeline.progress import ProgressBar
from pipeline.extract import extract_hidden_states, shard_sequences
from stores.artifacts import ArtifactStore
from stores.cache import CacheSchema
from stores.cache_shards import ShardWriter, shard_rows_done

SHARDS_PER_WORKER = 2
"""Shards per worker: a worker that finishes early takes another shard, and a shard lost to a
crash costs less to redo."""
CONNECT_TIMEOUT_S = 10
"""How long to wait for the scheduler at ``extract.cluster`` before calling it unreachable."""


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker process needs to extract one shard (pickled to it by Dask)."""

    index: int
    root: str
    cache: str
    model: str
    """The ModelConfig as JSON: the key of the worker's backbone cache."""
    identity: dict
    """The backbone identity the cache's key was planned with; the worker's must equal it."""
    layers: tuple[int, ...]
    batch_size: int
    schema: dict
    attrs: dict
    start_row: int
    stop_row: int
    split: PackedSplit
    """Only this shard's sequences."""


@dataclass(frozen=True)
class ShardResult:
    """What one shard task did, and where: the manifest records it per shard."""

    index: int
    start_row: int
    stop_row: int
    resumed_from: int
    """Rows of the shard already written when it started (by an earlier, interrupted run)."""
    tokens: int
    seconds: float
    pid: int
    worker: str
    backbone_loads: int
    """Backbone loads this worker process had made when the shard ended: 1, for one model."""


@functools.lru_cache(maxsize=1)
def worker_backbone(model: str, root: str) -> Backbone:
    """The backbone, loaded once per worker process and model: every shard it runs reuses it
    (its cache misses count the loads)."""
    return load_backbone(ModelConfig.model_validate_json(model), ArtifactStore(root).file_hasher())


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except ValueError:  # not inside a Dask worker
        return "local"


@task(name="extract-shard", cache_policy=NO_CACHE, persist_result=False)
def extract_shard_task(job: ShardJob) -> dict:
    backbone = worker_backbone(job.model, job.root)
    if backbone.identity != job.identity:
        raise BackboneError(f"shard {job.index}: worker {_worker_address()} loads a backbone with another identity "
                            f"than the one the cache was planned with; give every worker the same model files")
    t0 = time.perf_counter()
    with ShardWriter(Path(job.cache), CacheSchema.from_dict(job.schema), job.attrs, job.start_row,
                     job.stop_row) as writer:
        done = extract_hidden_states(backbone, job.split, job.layers, writer, batch_size=job.batch_size,
                                     progress=False)
        writer.finish()
    return asdict(ShardResult(job.index, job.start_row, job.stop_row, done.resumed_from, done.tokens,
                              round(time.perf_counter() - t0, 3), os.getpid(), _worker_address(),
                              worker_backbone.cache_info().misses))


_PENDING: dict[str, list[ShardJob]] = {}
"""Jobs handed from :func:`extract_in_shards` to the flow it starts in this process (their token
arrays stay out of the flow's parameters, which Prefect stores)."""


@flow(name="extract-shards")
def extract_shards_flow(batch: str, shards: list[str]) -> list[dict]:
    """Run the shard tasks of `batch` on the flow's task runner; `shards` names them for the UI.
    Waits for every shard, so the ones that can finish do, then raises for those that failed."""
    jobs = _PENDING[batch]
    futures = [extract_shard_task.with_options(task_run_name=f"extract-shard-{j.index}-rows-{j.start_row}-"
                                               f"{j.stop_row}").submit(j) for j in jobs]
    wait(futures)
    results, failed = [], []
    for job, future in zip(jobs, futures):
        try:
            results.append(future.result())
        except Exception as e:  # noqa: BLE001 - every failed shard is named below
            failed.append(f"shard {job.index} (rows {job.start_row}-{job.stop_row}): {type(e).__name__}: {e}")
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(jobs)} extraction shards failed: {'; '.join(failed)}. "
                           "Run again: finished shards are kept, the others resume at their last whole chunk")
    return results


@dataclass(frozen=True)
class ShardedRun:
    shards: list[ShardResult]
    """The shards this run executed (shards an earlier run finished are skipped)."""
    num_shards: int
    workers: int
    resumed_from: int
    """Rows of the cache already written when the run started."""
    seconds: float


def extract_in_shards(ex: ExtractConfig, model: ModelConfig, identity: dict, root: str, cache: Path,
                      schema: CacheSchema, attrs: dict, split: PackedSplit, n_seq: int,
                      progress: bool = True) -> ShardedRun:
    """Extract sequences [0, n_seq) of `split` into the created cache at `cache`, in shards on Dask.
    The progress bar follows the shards' progress files (what is durably written), every second."""
    workers, runner = task_runner(ex)
    seq_len = split.input_ids.shape[1]
    ranges = shard_sequences(n_seq, seq_len, schema.chunk_rows, ex.batch_size, SHARDS_PER_WORKER * workers)
    jobs, resumed = [], 0
    for i, (a, b) in enumerate(ranges):
        done = shard_rows_done(cache, a * seq_len, b * seq_len)
        resumed += done
        if done < (b - a) * seq_len:  # a shard an earlier run finished is not started again
            jobs.append(ShardJob(i, root, str(cache), model.model_dump_json(), identity, tuple(ex.layers),
                                 ex.batch_size, schema.to_dict(), attrs, a * seq_len, b * seq_len,
                                 _slice(split, a, b)))
    t0 = time.perf_counter()
    results: list[dict] = []
    if jobs:
        batch = uuid.uuid4().hex
        _PENDING[batch] = jobs
        rows = [(a * seq_len, b * seq_len) for a, b in ranges]
        try:
            with _watch_shards(cache, rows, f"extract {split.name} ({workers} workers)", progress):
                results = extract_shards_flow.with_options(task_runner=runner)(
                    batch, [f"{j.index}: rows {j.start_row}-{j.stop_row}" for j in jobs])
        finally:
            _PENDING.pop(batch, None)
    return ShardedRun([ShardResult(**r) for r in results], len(ranges), workers, resumed, time.perf_counter() - t0)


@contextmanager
def _watch_shards(cache: Path, rows: list[tuple[int, int]], desc: str, enabled: bool, every_s: float = 1.0):
    """A progress bar over every shard's durably written rows, polled on a thread while the body runs."""
    bar = ProgressBar(total=rows[-1][1], unit="tok", unit_scale=True, desc=desc, disable=not enabled,
                      dynamic_ncols=True)
    stop = threading.Event()

    def poll() -> None:
        while True:
            try:
                done = sum(shard_rows_done(cache, a, b) for a, b in rows)
            except (OSError, ValueError):  # a progress file replaced while read: next time
                done = bar.n
            if done > bar.n:
                bar.update(done - bar.n)
            if stop.wait(every_s):
                return

    watcher = threading.Thread(target=poll, name="shard-progress", daemon=True)
    watcher.start()
    try:
        yield bar
    finally:
        stop.set()
        watcher.join()
        bar.close()


def task_runner(ex: ExtractConfig) -> tuple[int, DaskTaskRunner]:
    """The Dask task runner `ex` asks for, and how many workers it has."""
    if ex.cluster:
        return cluster_workers(ex.cluster), DaskTaskRunner(address=ex.cluster)
    return ex.workers, DaskTaskRunner(cluster_kwargs={"n_workers": ex.workers, "threads_per_worker": 1,
                                                      "processes": True, "dashboard_address": None})


def cluster_workers(address: str) -> int:
    """Workers of the Dask scheduler at `address`; a ConfigError naming it when none answers."""
    from distributed import Client

    fix = ("start one there (`dask scheduler`, then `dask worker <address>` per machine) or unset extract.cluster "
           "to shard over a local cluster of extract.workers processes")
    try:
        with Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False) as client:
            workers = len(client.scheduler_info().get("workers", {}))
    except (OSError, ValueError, TypeError) as e:  # TimeoutError is an OSError
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"extract.cluster={address!r}: no Dask scheduler answers there ({reason}); {fix}") from None
    if not workers:
        raise ConfigError(f"extract.cluster={address!r}: the scheduler has no workers; start some "
                          f"(`dask worker {address}`) or unset extract.cluster")
    return workers


def _slice(split: PackedSplit, a: int, b: int) -> PackedSplit:
    """Sequences [a, b) of `split` (copies: only they travel to the worker)."""
    return PackedSplit(split.name, split.input_ids[a:b].copy(), split.targets[a:b].copy(), split.doc_ids[a:b].copy(),
                       split.positions[a:b].copy(), split.fingerprint, split.num_documents)
