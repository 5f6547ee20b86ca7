"""A float32 vocabulary head against the packed ternary head (BitNet b1.58) on this CPU.

Shapes are SmolLM2's head (V x H = 49152 x 576) with seeded random weights: latency and memory
do not depend on the values, and head quality is the quantize trainer's report, not this one's.
Variants, timed in this process on the same inputs, alternating, so machine noise hits all:

- float32: `F.linear` with the float matrix (the baseline every ratio is against);
- ternary packed: `PackedBitLinear` loaded from its safetensors file (int8 weights, int8
  activations, int8 x int8 -> int32 matmul), with and without the Hadamard rotation;
- BitLinear fake-quant: the training forward (float weights re-quantized per call), shown only
  to make clear it is not an inference path.

Peak and resident memory are measured in a fresh subprocess per variant and batch (RSS from
getrusage and /proc), so one variant's buffers never pollute another's. Bytes on disk are
the safetensors files' sizes.

    python benchmarks/bench_ternary.py [--calls 20] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.ternary import BitLinear, PackedBitLinear, pack_bitlinear

BASELINE = "float32"
PACKED = ("ternary_packed", "ternary_packed_hadamard")


def _save_heads(weight: torch.Tensor, folder: Path) -> dict[str, Path]:
    """The float head and both packed heads as safetensors files; returns variant -> path."""
    paths = {BASELINE: folder / "float32.safetensors"}
    save_file({"weight": weight}, paths[BASELINE])
    for name, hadamard in zip(PACKED, (False, True)):
        paths[name] = folder / f"{name}.safetensors"
        save_file(pack_bitlinear(BitLinear.from_linear(weight, hadamard=hadamard)), paths[name])
    return paths


def _load_head(variant: str, path: Path):
    """A callable x [m, H] -> logits [m, V] for a variant read from its file."""
    if variant == BASELINE:
        weight = load_file(path)["weight"]  # [V, H]
        return lambda x: F.linear(x, weight)
    return PackedBitLinear.from_packed(load_file(path))


def _time_calls(fn, x: torch.Tensor, calls: int) -> float:
    """Milliseconds per call, over `calls` back-to-back calls."""
    with torch.no_grad():
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(x)
        return (time.perf_counter() - t0) / calls * 1e3


_MEM_CHILD = """
import ctypes, gc, os, sys, tempfile
import torch
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, os.path.join(sys.argv[1], "benchmarks"))
from bench_ternary import _load_head, _save_heads
from pathlib import Path
torch.set_num_threads(int(sys.argv[5]))
try:
    _trim = ctypes.CDLL("libc.so.6").malloc_trim
except OSError:
    _trim = lambda pad: 0
def status_mb(key):  # per address space, reset at exec (getrusage's maxrss keeps the parent's)
    gc.collect()
    _trim(0)  # freed heap goes back to the OS, so RSS counts what is held, not allocator slack
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024
x = torch.randn(int(sys.argv[4]), int(sys.argv[6]), generator=torch.Generator().manual_seed(0))
with tempfile.TemporaryDirectory() as tmp:  # a tiny head of the same kind pages in the kernels' code first
    tiny = _save_heads(torch.randn(64, int(sys.argv[6])), Path(tmp))[sys.argv[2]]
    with torch.no_grad():
        _load_head(sys.argv[2], tiny)(x)
base, base_peak = status_mb("VmRSS"), status_mb("VmHWM")
head = _load_head(sys.argv[2], Path(sys.argv[3]))
loaded = status_mb("VmRSS")
with torch.no_grad():
    for _ in range(5):
        y = head(x)
print(base, base_peak, loaded, status_mb("VmRSS"), status_mb("VmHWM"))
"""


def _memory(variant: str, path: Path, batch: int, threads: int, hidden: int) -> dict:
    """Resident and peak memory (MB) of a fresh process that loads one head and runs it."""
    out = subprocess.run([sys.executable, "-c", _MEM_CHILD, str(ROOT), variant, str(path), str(batch),
                          str(threads), str(hidden)], capture_output=True, text=True, check=True).stdout.split()
    base, _, loaded, after, peak = (float(v) for v in out[-5:])
    return {"rss_mb_before_load": round(base, 1), "rss_mb_loaded": round(loaded, 1),
            "rss_mb_after_forward": round(after, 1), "peak_rss_mb": round(peak, 1),
            "head_resident_mb": round(after - base, 1), "head_peak_mb": round(peak - base, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64], help="tokens per call")
    ap.add_argument("--calls", type=int, default=20, help="calls per timed run")
    ap.add_argument("--repeats", type=int, default=5, help="alternating timed runs per variant (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()[0]
    weight = torch.randn(args.vocab, args.hidden, generator=torch.Generator().manual_seed(0)) * 0.02  # [V, H]
    fake = BitLinear.from_linear(weight, norm=False).eval()
    with tempfile.TemporaryDirectory() as tmp:
        paths = _save_heads(weight, Path(tmp))
        disk = {name: p.stat().st_size for name, p in paths.items()}
        heads = {name: _load_head(name, p) for name, p in paths.items()}
        heads["bitlinear_fake_quant"] = fake
        xs = {b: torch.randn(b, args.hidden, generator=torch.Generator().manual_seed(b)) for b in args.batches}

        with torch.no_grad():  # exactness of the integer path on the largest batch
            xb = xs[max(args.batches)]
            ref, got = fake(xb), heads["ternary_packed"](xb)  # [b, V]
        exact = {"max_abs_diff_over_max_logit": float((ref - got).abs().max() / ref.abs().max()),
                 "argmax_agreement": float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
                 "rows": int(xb.shape[0])}

        ms: dict[str, dict[int, list[float]]] = {name: {b: [] for b in args.batches} for name in heads}
        for head in heads.values():  # warm-up: oneDNN primitive creation, allocator
            for b in args.batches:
                _time_calls(head, xs[b], 2)
        for _ in range(args.repeats):
            for b in args.batches:
                for name, head in heads.items():
                    calls = max(2, args.calls // 4) if name == "bitlinear_fake_quant" else args.calls
                    ms[name][b].append(_time_calls(head, xs[b], calls))

        memory = {name: {b: _memory(name, paths[name], b, args.threads, args.hidden) for b in args.batches}
                  for name in paths}

    latency = {name: {str(b): {"ms_per_call": round(statistics.median(runs[b]), 3),
                               "ms_per_token": round(statistics.median(runs[b]) / b, 4),
                               "runs_ms": [round(r, 3) for r in runs[b]],
                               "speedup_vs_float32": round(statistics.median(ms[BASELINE][b])
                                                           / statistics.median(runs[b]), 2)}
                      for b in args.batches} for name, runs in ms.items()}
    result = {
        "benchmark": "ternary",
        "shape": [args.vocab, args.hidden], "threads": args.threads, "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
        "load_average_at_start": round(load_at_start, 2),
        "calls": args.calls, "repeats": args.repeats, "baseline": BASELINE,
        "latency": latency,
        "memory_mb": {name: {str(b): {**m, "resident_ratio_vs_float32": round(
            memory[BASELINE][b]["head_resident_mb"] / max(m["head_resident_mb"], 1e-3), 2)}
            for b, m in per.items()} for name, per in memory.items()},
        "bytes_on_disk": disk,
        "disk_ratio_vs_float32": {name: round(disk[BASELINE] / v, 2) for name, v in disk.items()},
        "packed_vs_fake_quant": exact,
        "target_disk_ratio": 12.0,
    }
    result["meets_targets"] = bool(result["disk_ratio_vs_float32"]["ternary_packed"] >= 12.0
                                   and all(latency["ternary_packed"][str(b)]["speedup_vs_float32"] >= 1.0
                                           for b in args.batches)
                                   and exact["argmax_agreement"] == 1.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ternary.json").write_text(json.dumps(result, indent=2) + "\n")

    md = ["# Ternary head benchmark", "",
          (f"Vocabulary head {args.vocab} x {args.hidden} (SmolLM2's shape, seeded random weights) on "
          f"{platform.machine()} CPU ({result['cpu_capability']}, {args.threads} threads, torch {torch.__version__}); "
          f"median of {args.repeats} alternating runs of {args.calls} calls; load average {load_at_start:.2f} at start "
          "(the machine is shared)."), "",
          "| variant | batch | ms / call | ms / token | speed-up vs float32 | resident MB (head) | float32 / this | peak MB (head) |",
          "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in latency:
        for b in args.batches:
            lat, mem = latency[name][str(b)], memory.get(name, {}).get(b)
            ratio = memory[BASELINE][b]["head_resident_mb"] / mem["head_resident_mb"] if mem else 0.0
            mem_cells = (f"{mem['head_resident_mb']:.0f} | {ratio:.1f}x | {mem['head_peak_mb']:.0f}" if mem
                         else "n/a | | n/a")
            md.append(f"| {name} | {b} | {lat['ms_per_call']:.2f} | {lat['ms_per_token']:.3f} | "
                      f"{lat['speedup_vs_float32']:.2f}x | {mem_cells} |")
    md += ["", "| file | bytes on disk | float32 / this |", "| --- | --- | --- |"]
    md += [f"| {name} | {v:,} | {result['disk_ratio_vs_float32'][name]:.1f}x |" for name, v in disk.items()]
    md += ["", (f"Packed vs fake-quant BitLinear on {exact['rows']} rows: max |diff| / max |logit| = "
           f"{exact['max_abs_diff_over_max_logit']:.1e}, argmax agreement {exact['argmax_agreement']:.3f}."), "",
           ("Resident MB (head): RSS after load and 5 forwards minus RSS before load, in a fresh process per "
           "row (after malloc_trim, so freed heap is not counted); it includes the last [batch, V] output. "
           "Peak MB (head): the process's high-water RSS (VmHWM) minus RSS before load: load-time buffers and "
           "the forward's temporaries too."), "",
           (f"Meets targets (disk >= 12x smaller, packed not slower, same argmax): "
           f"**{'yes' if result['meets_targets'] else 'no'}**"), ""]
    (out / "ternary.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
