"""Exit gates by input features against their heads' entropy: held-out train AUROC and eval
AUROC of each `gates.features` variant, trained on the same labels, beside the entropy AUROC
and a logistic regression on the confidence features alone.

Reuses the artifacts of a run under --root: the train and eval caches and the heads of its
newest train_gates artifact (or the keys given). Labels every train token once (the costly
part: every head and the teacher score the full vocabulary), then trains each variant on
them in the same process.

    python benchmarks/bench_gates.py --root .exitflow [--variants hidden,hidden+confidence] [--max-tokens N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline.train_gates as tg  # noqa: E402
from flows.stages.extract import load_teacher, open_cache  # noqa: E402
from flows.stages.train_heads import load_trained_heads  # noqa: E402
from pipeline.config import GatesConfig  # noqa: E402
from pipeline.gates import fit_confidence_prior, gate_exit_probabilities, load_gates  # noqa: E402
from pipeline.scoring import auroc, collect_exit_labels, evaluate_gate_scores  # noqa: E402
from stores.artifacts import ArtifactStore  # noqa: E402

VARIANTS = "hidden,hidden+confidence,hidden+confidence+change"


def _newest_gates_inputs(store: ArtifactStore) -> dict[str, str]:
    manifests = sorted(store.iter_manifests("train_gates"), key=lambda m: m.created)
    if not manifests:
        raise SystemExit(f"no train_gates artifact under {store.root}; run `exitflow run train_gates` first or "
                         "pass --train, --eval and --heads")
    return manifests[-1].inputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=".exitflow")
    ap.add_argument("--train"), ap.add_argument("--eval"), ap.add_argument("--heads")
    ap.add_argument("--variants", default=VARIANTS)
    ap.add_argument("--max-tokens", type=int, default=None, help="label at most this many train tokens")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gates.json"))
    args = ap.parse_args()
    store = ArtifactStore(args.root)
    found = _newest_gates_inputs(store) if not (args.train and args.eval and args.heads) else {}
    train_key, eval_key = args.train or found["cache"], args.eval or found["eval_cache"]
    heads_key = args.heads or found["heads"]
    reader, teacher = open_cache(store, train_key), load_teacher(store, train_key)
    heads, heads_m = load_trained_heads(store, heads_key, teacher)
    layers = heads_m.config["layers"]
    ev_reader = open_cache(store, eval_key)
    ev = collect_exit_labels(heads, teacher, ev_reader)

    labelled: dict[str, tg.GateLabels] = {}
    label_rows = tg.label_gate_rows

    def once(*a, **k):  # every variant trains on the same labels
        if "labels" not in labelled:
            t = time.time()
            labelled["labels"] = label_rows(*a, **k)
            print(f"labelled {int(labelled['labels'].usable.sum())} train rows in {time.time() - t:.0f} s", flush=True)
        return labelled["labels"]

    tg.label_gate_rows = once
    results: dict = {"train_cache": train_key, "eval_cache": eval_key, "heads": heads_key, "eval_tokens": ev.num_tokens,
                     "entropy": {layer: auroc(ev.correct[layer], -ev.entropy[layer]) for layer in layers},
                     "variants": {}}
    for features in args.variants.split(","):
        cfg = GatesConfig(features=features, max_tokens=args.max_tokens)
        t = time.time()
        res = tg.train_gates(cfg, heads, layers, int(reader.attrs["num_layers"]), teacher, reader, progress=False)
        gates = load_gates(cfg, teacher, res.state)
        evals = evaluate_gate_scores(ev, gate_exit_probabilities(gates, ev_reader, features=ev.features))
        results["variants"][features] = {"eval": {layer: e.gate_auroc for layer, e in evals.items()},
                                         "heldout": res.auroc, "heldout_entropy": res.entropy_auroc,
                                         "seconds": time.time() - t}
        print(features, {layer: round(e.gate_auroc, 4) for layer, e in evals.items()}, flush=True)
    labels = labelled["labels"]
    results["confidence_logistic"] = {}
    for k, layer in enumerate(layers):  # the prior alone: what the three confidence features give
        x = torch.from_numpy(labels.features[labels.usable, k, :3])
        mean, std = x.mean(0), x.std(0) + 1e-6
        w, b = fit_confidence_prior((x - mean) / std, torch.from_numpy(labels.table[labels.usable, k]))
        score = ((torch.from_numpy(ev.features[layer][:, :3]) - mean) / std) @ w + b
        results["confidence_logistic"][layer] = auroc(ev.correct[layer], score.numpy())
    print("entropy", {layer: round(v, 4) for layer, v in results["entropy"].items()})
    print("confidence logistic", {layer: round(v, 4) for layer, v in results["confidence_logistic"].items()})
    Path(args.out).write_text(json.dumps(results, indent=1, default=lambda x: float(x) if np.isscalar(x) else str(x)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
