"""Extraction throughput against the bare backbone forward, and cache bytes per token.

Both run in this process on the same tokens and batch size, alternating, so machine noise
hits both; the result is their ratio. Target: extraction >= 0.9x the bare forward, and
<= 2 x hidden bytes per token per layer at float16 (about half that with int8).

And sharded extraction (the extract stage with ``extract.workers=2``: a Dask LocalCluster of two
single-threaded worker processes) against the same stage in one process, on the same tokens:
its throughput end to end (cluster start and one backbone load per worker included) and over
the shards' own compute time, and whether the two published caches are the same bytes. On a
2-core machine a ratio near 1 is expected: one process already uses both cores.

    python benchmarks/bench_extract.py [--tokens 8192] [--repeats 3] [--dask-tokens 8192]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.backbone import load_backbone  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data import load_corpus, pack_split  # noqa: E402
from pipeline.extract import chunk_rows_for, extract_hidden_states  # noqa: E402
from stores.cache import CacheSchema, CacheWriter  # noqa: E402


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _time_bare(backbone, ids: torch.Tensor, batch: int) -> float:
    t0 = time.perf_counter()
    for s in range(0, ids.shape[0], batch):
        backbone.forward_bare(ids[s:s + batch])
    return time.perf_counter() - t0


def _time_extract(backbone, packed, layers, n_seq, batch, dtype, folder: Path) -> tuple[float, Path]:
    seq_len = packed.input_ids.shape[1]
    schema = CacheSchema(num_tokens=n_seq * seq_len, hidden_size=backbone.hidden_size, layers=tuple(layers),
                         storage_dtype=dtype, chunk_rows=chunk_rows_for(seq_len, 4096))
    path = folder / f"cache-{dtype}-{time.monotonic_ns()}.zarr"
    t0 = time.perf_counter()
    with CacheWriter(path, schema, {"key": "bench"}) as w:
        extract_hidden_states(backbone, packed, layers, w, batch_size=batch, max_sequences=n_seq, progress=False)
        w.finish()
    return time.perf_counter() - t0, path


_MEM_CHILD = """
import resource, sys, tempfile
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from pipeline.backbone import load_backbone
from pipeline.config import load_config
from pipeline.data import load_corpus, pack_split
from pipeline.extract import chunk_rows_for, extract_hidden_states
from stores.cache import CacheSchema, CacheWriter
cfg = load_config(sys.argv[2] or None)
tokens = int(sys.argv[3])
bb = load_backbone(cfg.model)
packed = pack_split(load_corpus(cfg.data), bb.tokenizer, "train", cfg.data)
seq = cfg.data.seq_len
n_seq = min(packed.input_ids.shape[0], tokens // seq)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
schema = CacheSchema(n_seq * seq, bb.hidden_size, tuple(cfg.extract.layers), "float16", chunk_rows_for(seq, 4096))
with tempfile.TemporaryDirectory() as tmp, CacheWriter(Path(tmp) / "c.zarr", schema, {"key": "mem"}) as w:
    extract_hidden_states(bb, packed, cfg.extract.layers, w, batch_size=cfg.extract.batch_size, max_sequences=n_seq, progress=False)
    w.finish()
print(n_seq * seq, before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _peak_rss(config: str, tokens: int) -> dict:
    """Peak RSS of a fresh process extracting `tokens` tokens (KiB, as getrusage reports)."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", _MEM_CHILD, str(ROOT), config or "", str(tokens)],
                         capture_output=True, text=True, check=True).stdout.split()
    n, before, after = (int(x) for x in out[-3:])
    return {"tokens": n, "peak_rss_mb_after_load": round(before / 1024, 1), "peak_rss_mb": round(after / 1024, 1)}


def _dask_vs_single(config: str | None, tokens: int) -> dict:
    """The extract stage with 2 Dask workers vs 1 process on the same `tokens` tokens."""
    from prefect.testing.utilities import prefect_test_harness  # a temporary Prefect API for the shard flow

    from flows.stages.base import StageContext, run_stage
    from flows.stages.extract import ExtractStage
    from stores.artifacts import ArtifactStore

    out: dict = {"tokens_requested": tokens}
    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness(server_startup_timeout=120):
        stores, keys = {}, {}
        for workers in (1, 2):
            cfg = load_config(config, [f"extract.max_tokens={tokens}", f"extract.workers={workers}"])
            stores[workers] = ArtifactStore(Path(tmp) / f"workers-{workers}")
            t0 = time.perf_counter()
            keys[workers] = run_stage(ExtractStage("train"), StageContext(cfg, stores[workers], progress=False), {})
            out[f"stage_seconds_{workers}"] = round(time.perf_counter() - t0, 2)
        one, two = (stores[w].manifest("extract", keys[w]) for w in (1, 2))
        sharded = two.extra["sharded"]
        per_worker: dict[int, float] = {}
        for shard in sharded["ran"]:
            per_worker[shard["pid"]] = per_worker.get(shard["pid"], 0.0) + shard["seconds"]
        n = one.metrics["tokens"]
        files = {w: {p.relative_to(stores[w].path("extract", keys[w])).as_posix(): p.read_bytes()
                     for p in stores[w].path("extract", keys[w]).rglob("*") if p.is_file() and p.name != "manifest.json"}
                 for w in (1, 2)}
        out.update({
            "tokens": n, "same_key": keys[1] == keys[2], "same_bytes": files[1] == files[2],
            "shards": sharded["shards"], "workers": sharded["workers"],
            "single_tokens_per_s": one.metrics["tokens_per_s"],
            "dask_tokens_per_s": two.metrics["tokens_per_s"],
            "dask_compute_tokens_per_s": round(n / max(per_worker.values()), 1),
        })
    out["dask_over_single"] = round(out["dask_tokens_per_s"] / out["single_tokens_per_s"], 3)
    out["dask_compute_over_single"] = round(out["dask_compute_tokens_per_s"] / out["single_tokens_per_s"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML config (default: the built-in defaults)")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per timed pass")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    ap.add_argument("--memory-tokens", type=int, nargs=2, default=[4096, 24576],
                    help="token counts of the two peak-memory runs (streaming: same peak)")
    ap.add_argument("--dask-tokens", type=int, default=8192, help="tokens of the 2 Dask workers vs 1 process row (0: skip)")
    args = ap.parse_args()

    cfg = load_config(args.config)
    backbone = load_backbone(cfg.model)
    corpus = load_corpus(cfg.data)
    packed = pack_split(corpus, backbone.tokenizer, "train", cfg.data)
    seq_len, batch, layers = cfg.data.seq_len, cfg.extract.batch_size, cfg.extract.layers
    n_seq = min(packed.input_ids.shape[0], max(batch, args.tokens // seq_len))
    tokens = n_seq * seq_len
    ids = torch.from_numpy(packed.input_ids[:n_seq].astype("int64"))
    backbone.forward_bare(ids[:batch])  # warm-up

    bare, ext = [], []
    bytes_per = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            bare.append(_time_bare(backbone, ids, batch))
            secs, path = _time_extract(backbone, packed, layers, n_seq, batch, "float16", Path(tmp))
            ext.append(secs)
            bytes_per["float16"] = _dir_bytes(path / f"layer_{layers[0]}") / tokens
        secs, path = _time_extract(backbone, packed, layers, n_seq, batch, "int8", Path(tmp))
        bytes_per["int8"] = (_dir_bytes(path / f"layer_{layers[0]}") + _dir_bytes(path / f"layer_{layers[0]}.scale")) / tokens

    bare_tps = tokens / statistics.median(bare)
    ext_tps = tokens / statistics.median(ext)
    ratios = [b / e for b, e in zip(bare, ext)]
    hidden = backbone.hidden_size
    result = {
        "benchmark": "extract",
        "model": cfg.model.source, "device": str(backbone.device), "dtype": str(backbone.dtype),
        "threads": torch.get_num_threads(), "machine": platform.machine(),
        "tokens": tokens, "batch_size": batch, "seq_len": seq_len, "layers": layers, "repeats": args.repeats,
        "bare_forward_tokens_per_s": round(bare_tps, 1),
        "extract_tokens_per_s": round(ext_tps, 1),
        "extract_over_bare": round(statistics.median(ratios), 3),
        "extract_over_bare_runs": [round(r, 3) for r in ratios],
        "target_extract_over_bare": 0.9,
        "hidden_size": hidden,
        "bytes_per_token_per_layer": {k: round(v, 1) for k, v in bytes_per.items()},
        "bytes_over_hidden": {k: round(v / hidden, 3) for k, v in bytes_per.items()},
        "target_bytes_over_hidden": {"float16": 2.0, "int8": 1.0},
    }
    small, large = (_peak_rss(args.config, t) for t in args.memory_tokens)
    result["memory"] = {"small": small, "large": large,
                        "growth_mb": round(large["peak_rss_mb"] - small["peak_rss_mb"], 1),
                        "cache_bytes_large_mb": round(large["tokens"] * (len(layers) + 1) * bytes_per["float16"] / 2**20, 1)}
    dask = result["dask"] = _dask_vs_single(args.config, args.dask_tokens) if args.dask_tokens else None
    result["meets_targets"] = bool(result["extract_over_bare"] >= 0.9 and result["bytes_over_hidden"]["float16"] <= 2.0
                                   and result["bytes_over_hidden"]["int8"] <= 1.1
                                   and (dask is None or (dask["same_key"] and dask["same_bytes"])))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "extract.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        "# Extraction benchmark", "",
        f"{cfg.model.source} on {result['device']} ({result['dtype']}, {result['threads']} threads), "
        f"{tokens} tokens, batch {batch} x {seq_len}, layers {layers}, median of {args.repeats} alternating runs.", "",
        "| measure | value | target |", "| --- | --- | --- |",
        f"| bare backbone forward | {bare_tps:,.0f} tokens/s | |",
        f"| extraction (forward + cache writes) | {ext_tps:,.0f} tokens/s | |",
        f"| extraction / bare forward | {result['extract_over_bare']:.3f}x | >= 0.9x |",
        f"| cache bytes / token / layer, float16 | {bytes_per['float16']:.0f} ({result['bytes_over_hidden']['float16']:.2f} x hidden) | <= 2 x hidden |",
        f"| cache bytes / token / layer, int8 | {bytes_per['int8']:.0f} ({result['bytes_over_hidden']['int8']:.2f} x hidden) | about 1 x hidden |",
        f"| peak RSS, {small['tokens']} tokens | {small['peak_rss_mb']:.0f} MB | |",
        f"| peak RSS, {large['tokens']} tokens | {large['peak_rss_mb']:.0f} MB "
        f"(growth {result['memory']['growth_mb']:+.0f} MB; the cache written is {result['memory']['cache_bytes_large_mb']:.0f} MB) | no growth with tokens |",
    ]
    if dask:
        md += [
            f"| 2 Dask workers vs 1 process, end to end ({dask['tokens']} tokens, {dask['shards']} shards; cluster "
            f"start and a backbone load per worker included) | {dask['dask_tokens_per_s']:,.0f} vs "
            f"{dask['single_tokens_per_s']:,.0f} tokens/s = {dask['dask_over_single']:.3f}x | ~1x on 2 cores |",
            f"| 2 Dask workers vs 1 process, shard compute only | {dask['dask_compute_tokens_per_s']:,.0f} vs "
            f"{dask['single_tokens_per_s']:,.0f} tokens/s = {dask['dask_compute_over_single']:.3f}x | ~1x on 2 cores |",
            f"| sharded cache = single-process cache (key, every byte) | "
            f"{'yes' if dask['same_key'] and dask['same_bytes'] else 'NO'} | yes |",
        ]
    md += ["", f"Meets targets: **{'yes' if result['meets_targets'] else 'no'}**", ""]
    (out / "extract.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
