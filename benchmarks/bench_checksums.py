"""What chunk checksums cost the cache writer and the first read of a cache.

The writer takes size and CRC-32 of each chunk right after it fsyncs it (the bytes are in the
page cache) and logs them durably before counting the rows; a reader checks each chunk's
checksum the first time it reads it. Timing the same code with and without them end to end is
dominated by disk noise on a small VM (the same read varies 0.7-3.3 s here), so the checksum
work is timed where it happens, against the whole write or read around it: synthetic float16
rows of SmolLM2-135M's width and no model in the loop, the worst case (any forward pass only
adds to the denominator). Also: raw throughput of candidate checksums on one chunk.

    python benchmarks/bench_checksums.py [--tokens 65536] [--repeats 5]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import stores.cache as cache_module  # noqa: E402
from stores.cache import CacheReader, CacheSchema, CacheWriter  # noqa: E402
from stores.integrity import ChecksumLog  # noqa: E402

HIDDEN, LAYERS, CHUNK, BATCH = 576, (6, 12, 18, 24), 4096, 2048


class _Stopwatch:
    """Total seconds spent inside the wrapped functions."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t0
        return timed


def _algorithms(buf: bytes, repeats: int) -> dict[str, float]:
    """GB/s of each checksum over one chunk-sized buffer (best of several)."""
    fns = {"crc32 (zlib)": zlib.crc32, "sha256": lambda b: hashlib.sha256(b).digest(),
           "blake2b": lambda b: hashlib.blake2b(b).digest()}
    out = {}
    for name, fn in fns.items():
        best = min(_timed(lambda: fn(buf)) for _ in range(repeats * 4))
        out[name] = round(len(buf) / best / 1e9, 2)
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _write(path: Path, schema: CacheSchema, rows: dict[str, np.ndarray]) -> None:
    with CacheWriter(path, schema, {"key": "bench"}) as w:
        for a in range(0, schema.num_tokens, BATCH):
            w.append({k: v[a:a + BATCH] for k, v in rows.items()})
        w.finish()


def _read(path: Path) -> None:
    reader = CacheReader(path)
    for _ in reader.iter_batches(reader.schema.hidden_arrays(), BATCH, shuffle=False):
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    n = args.tokens
    schema = CacheSchema(num_tokens=n, hidden_size=HIDDEN, layers=LAYERS, storage_dtype="float16", chunk_rows=CHUNK)
    rows = {name: rng.standard_normal((n, HIDDEN), dtype=np.float32) for name in schema.hidden_arrays()}
    rows.update({c: np.arange(n, dtype=np.int32) for c in ("input_ids", "targets", "doc_ids", "positions")})

    crc, log, check = _Stopwatch(), _Stopwatch(), _Stopwatch()
    cache_module.crc32_fd = crc.wrap(cache_module.crc32_fd)
    ChecksumLog.append = log.wrap(ChecksumLog.append)
    cache_module.check_file = check.wrap(cache_module.check_file)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            path = Path(tmp) / f"c{r}.zarr"
            os.sync()  # no writeback of an earlier run lands in this one
            crc.seconds = log.seconds = check.seconds = 0.0
            write = _timed(lambda: _write(path, schema, rows))
            written = (crc.seconds, log.seconds)
            read = _timed(lambda: _read(path))  # a new reader: every chunk checked once
            runs.append({"write": write, "crc": written[0], "log": written[1], "read": read, "check": check.seconds})
            if r:
                shutil.rmtree(path)
        chunk = (Path(tmp) / "c0.zarr" / "final/c/0/0").read_bytes()
    med = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
    result = {
        "benchmark": "checksums", "machine": platform.machine(), "python": platform.python_version(),
        "cpus": os.cpu_count(), "tokens": n, "hidden_size": HIDDEN, "hidden_arrays": len(schema.hidden_arrays()),
        "chunk_rows": CHUNK, "chunk_mb": round(len(chunk) / 2**20, 2), "repeats": args.repeats,
        "checksum_gb_per_s": _algorithms(chunk, args.repeats),
        "write_tokens_per_s": round(n / med["write"]),
        "write_checksum_share": round((med["crc"] + med["log"]) / med["write"], 4),
        "write_checksum_us_per_token": round((med["crc"] + med["log"]) / n * 1e6, 2),
        "write_log_us_per_token": round(med["log"] / n * 1e6, 3),
        "first_read_tokens_per_s": round(n / med["read"]),
        "first_read_checksum_share": round(med["check"] / med["read"], 4),
        "first_read_checksum_us_per_token": round(med["check"] / n * 1e6, 2),
        "runs": [{k: round(v, 4) for k, v in run.items()} for run in runs],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "checksums.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        "# Chunk checksums benchmark", "",
        f"Synthetic float16 rows, hidden {HIDDEN}, {len(schema.hidden_arrays())} hidden arrays + 4 int32 columns, "
        f"{n} tokens, chunks of {CHUNK} rows ({result['chunk_mb']} MB per hidden chunk), {os.cpu_count()} CPUs, "
        f"median of {args.repeats} runs. No model in the loop: the worst case, a forward pass only adds time "
        "around the same checksum work.", "",
        "| measure | value |", "| --- | --- |",
        f"| cache writer, tokens/s (with checksums) | {result['write_tokens_per_s']:,} |",
        f"| checksum + durable log, per token | {result['write_checksum_us_per_token']} us "
        f"(log {result['write_log_us_per_token']} us) |",
        f"| share of the writer's time | {result['write_checksum_share']:.1%} |",
        f"| first read of every hidden array, tokens/s (with checks) | {result['first_read_tokens_per_s']:,} |",
        f"| chunk checks on first read, per token | {result['first_read_checksum_us_per_token']} us |",
        f"| share of the first read's time (later reads by the same reader: none) | "
        f"{result['first_read_checksum_share']:.1%} |", "",
        "Checksum throughput on one chunk: " + ", ".join(f"{k} {v} GB/s" for k, v in result["checksum_gb_per_s"].items()),
        "",
    ]
    (out / "checksums.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
