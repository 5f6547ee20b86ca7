"""A fully cached `exitflow run pipeline`: how long a re-run costs when nothing changed.

Every stage is a cache hit, so what is left is fixed cost: Python imports, planning each
stage's content key, one Prefect task call per stage and the server those calls talk to.
Variants, alternated per repeat so machine noise hits all:

- imports: `python -c "import flows.dag"` (the floor every run pays; the baseline of the ratios);
- temporary server: `exitflow run pipeline` with no server running (the CLI starts one per run, as a
  child process it controls, while it imports and plans; flows/server_process.py);
- served: the same with `exitflow serve` running for the root (the CLI reuses its server).

Run it on a root the pipeline already filled (`make demo`); a warm-up run fills what is missing.

    python benchmarks/bench_cached.py [--root .exitflow] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASELINE = "imports"


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout + proc.stderr


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, default=Path(os.environ.get("EXITFLOW_HOME", ROOT / ".exitflow")))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--port", type=int, default=4310)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    from flows.serve import start, stop

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1")
    run = [sys.executable, "-m", "flows.cli", "--root", str(args.root), "run", "pipeline"]
    commands = {BASELINE: [sys.executable, "-c", "import flows.dag"], "temporary server": run, "served": run}

    print("warm-up run (fills whatever the root lacks)...", flush=True)
    _, out = _timed(run, env)
    times: dict[str, list[float]] = {name: [] for name in commands}
    served = False
    try:
        for r in range(args.repeats):
            for name, cmd in commands.items():
                if name == "served" and not served:
                    start(args.root, port=args.port, report_port=args.port + 1)
                    served = True
                elif name != "served" and served:
                    stop(args.root, quiet=True)
                    served = False
                seconds, out = _timed(cmd, env)
                if name != BASELINE and ("using the Prefect server" in out) != (name == "served"):
                    raise SystemExit(f"{name}: the run did not use the expected server:\n{out[-2000:]}")
                times[name].append(seconds)
                print(f"repeat {r + 1} {name}: {seconds:.1f} s", flush=True)
    finally:
        if served:
            stop(args.root, quiet=True)

    base = statistics.median(times[BASELINE])
    rows = [{"variant": name, "median_s": round(statistics.median(t), 2), "min_s": round(min(t), 2),
             "runs": [round(x, 2) for x in t], "vs_imports": round(statistics.median(t) / base, 2)}
            for name, t in times.items()]
    result = {"benchmark": "cached pipeline run", "root": str(args.root), "repeats": args.repeats,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cached_run.json").write_text(json.dumps(result, indent=2) + "\n")
    md = ["# A fully cached `exitflow run pipeline`", "",
          f"Every stage a cache hit on the embedded default; {args.repeats} repeats, alternated; "
          f"{os.cpu_count()} CPUs. `imports` is `python -c \"import flows.dag\"`, the floor.", "",
          "| variant | median s | min s | x imports |", "| --- | --- | --- | --- |"]
    md += [f"| {r['variant']} | {r['median_s']} | {r['min_s']} | {r['vs_imports']} |" for r in rows]
    (args.out / "cached_run.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
