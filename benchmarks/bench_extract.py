"""Extraction throughput against the bare backbone forward, and cache bytes per token.

Both run in this process on the same tokens and batch size, alternating, so machine noise
hits both; the result is their ratio. Target: extraction >= 0.9x the bare forward, and
<= 2 x hidden bytes per token per layer at float16 (about half that with int8).

    python benchmarks/bench_extract.py [--tokens 8192] [--repeats 3]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs/default.yaml"))
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per timed pass")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
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
    result["meets_targets"] = bool(result["extract_over_bare"] >= 0.9 and result["bytes_over_hidden"]["float16"] <= 2.0
                                   and result["bytes_over_hidden"]["int8"] <= 1.1)
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
        "", f"Meets targets: **{'yes' if result['meets_targets'] else 'no'}**", "",
    ]
    (out / "extract.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
