"""Head training throughput offline (from the cache) against online (the backbone every step),
for the full-vocabulary loss and the efficient per-row top-k loss, and the agreement each
reaches on the eval cache.

In one process, on the same tokens, the same steps and the same heads config:
{offline, online} x {full, efficient} `train_heads`, then `evaluate_heads` on the eval cache
(and the logit lens as reference). Offline efficient training reads the teacher's top-k,
precomputed once per cache; that one-time pass is timed separately, and its cost amortised
over one epoch is reported too. Targets: offline >= 10x online per epoch; the efficient loss
loses <= 1 point of top-1 agreement against the full loss.

Caches are built with the extract stage (`flows.stages.extract`) under --root (gitignored) and reused by later
runs; the teacher top-k is recomputed every run, because its cost is one of the results.

A fifth run, offline with the efficient loss but uniform negatives (`--uniform-negatives`
of them), shows what the frequency proposal of the negatives buys.

    python benchmarks/bench_train.py [--train-tokens 49152] [--eval-tokens 4096] [--steps 48]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.stages.base import StageContext, run_stage  # noqa: E402
from flows.stages.extract import ExtractStage, cache_path, load_teacher  # noqa: E402
from pipeline.backbone import load_backbone  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data import load_corpus, pack_split  # noqa: E402
from pipeline.heads import load_heads
from pipeline.teacher import compute_teacher_topk  # noqa: E402
from pipeline.scoring import evaluate_heads, logit_lens  # noqa: E402
from pipeline.sources import OnlineSource  # noqa: E402
from pipeline.train_heads import train_heads  # noqa: E402
from stores.artifacts import ArtifactStore  # noqa: E402
from stores.cache import CacheReader  # noqa: E402
from stores.teacher_store import create_teacher_topk, flush_teacher_topk, open_teacher_topk  # noqa: E402

TARGET_RATIO = 10.0
TARGET_AGREEMENT_LOSS = 0.01


def _caches(args) -> tuple:
    """(train config, store, train key, eval key): extracted once under --root, then cache hits."""
    heads = [f"heads.batch_tokens={args.batch}", "heads.epochs=1", f"heads.max_steps={args.steps}",
             f"heads.lr={args.lr}", f"heads.warmup_steps={args.warmup}", f"heads.negatives={args.negatives}",
             f"heads.topk={args.topk}", "heads.negative_proposal=frequency"]
    cfg = load_config(args.config, [f"extract.max_tokens={args.train_tokens}", *heads])
    eval_cfg = load_config(args.config, [f"extract.max_tokens={args.eval_tokens}"])
    store = ArtifactStore(args.root)
    t0 = time.perf_counter()
    train_key = run_stage(ExtractStage("train"), StageContext(cfg, store, progress=False), {})
    eval_key = run_stage(ExtractStage("eval"), StageContext(eval_cfg, store, progress=False), {})
    logging.info("caches ready in %.1f s (train %s, eval %s)", time.perf_counter() - t0, train_key[:12], eval_key[:12])
    return cfg, store, train_key, eval_key


def _agreement(evals: dict) -> dict:
    per_layer = {str(layer): round(e.agreement, 4) for layer, e in evals.items()}
    return {"per_layer": per_layer, "mean": round(statistics.mean(e.agreement for e in evals.values()), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML config (default: the built-in defaults)")
    ap.add_argument("--root", default=str(ROOT / "benchmarks/.exitflow"), help="artifact root for the caches")
    ap.add_argument("--train-tokens", type=int, default=49152, help="train cache size; steps x batch = one epoch")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=48, help="optimizer steps of every run")
    ap.add_argument("--batch", type=int, default=1024, help="tokens per step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--negatives", type=int, default=1536, help="shared negatives per step (frequency proposal)")
    ap.add_argument("--uniform-negatives", type=int, default=256, help="distinct uniform negatives of the ablation run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    wall0 = time.perf_counter()

    cfg, store, train_key, eval_key = _caches(args)
    reader, eval_reader = CacheReader(cache_path(store, train_key)), CacheReader(cache_path(store, eval_key))
    layers, num_layers = list(reader.layers), int(reader.attrs["num_layers"])
    backbone = load_backbone(cfg.model)
    teacher = load_teacher(store, train_key)
    packed = pack_split(load_corpus(cfg.data), backbone.tokenizer, "train", cfg.data, backbone.tokenizer_fingerprint)
    online = OnlineSource(backbone, packed, layers, sequences_per_forward=cfg.extract.batch_size,
                          max_sequences=reader.num_tokens // cfg.data.seq_len)
    if online.num_tokens != reader.num_tokens:
        raise RuntimeError(f"online source has {online.num_tokens} rows, the cache {reader.num_tokens}")
    tokens = min(args.steps * args.batch, reader.num_tokens)

    with tempfile.TemporaryDirectory() as tmp:
        # the one-time cost of the offline efficient path: the teacher's top-k of every cached token
        ids, logprobs = create_teacher_topk(Path(tmp), reader.num_tokens, args.topk)
        t0 = time.perf_counter()
        compute_teacher_topk(teacher, reader, args.topk, ids, logprobs, progress=False)
        topk_seconds = time.perf_counter() - t0
        flush_teacher_topk(ids, logprobs)
        topk = open_teacher_topk(Path(tmp))
        topk_mass = float(torch.from_numpy(topk.logprobs[:]).double().exp().sum(1).mean())
        logging.info("teacher top-%d: %d tokens in %.1f s", args.topk, reader.num_tokens, topk_seconds)

        runs = {}
        lens = _agreement(evaluate_heads(logit_lens(teacher, layers), teacher, eval_reader, max_tokens=args.eval_tokens))
        # (run name, source, heads config overrides); offline and online alternate so that
        # machine noise hits both
        plan = [
            ("offline_efficient", reader, {"efficient_loss": True}),
            ("online_efficient", online, {"efficient_loss": True}),
            ("offline_full", reader, {"efficient_loss": False}),
            ("online_full", online, {"efficient_loss": False}),
            ("offline_efficient_uniform", reader, {"efficient_loss": True, "negative_proposal": "uniform",
                                                   "negatives": args.uniform_negatives}),
        ]
        for name, source, update in plan:
            hcfg = cfg.heads.model_copy(update=update)
            kwargs = {"teacher_topk": topk} if source is reader and hcfg.efficient_loss else {}
            t0 = time.perf_counter()
            result = train_heads(hcfg, layers, num_layers, teacher, source, progress=False, **kwargs)
            wall = time.perf_counter() - t0
            heads = load_heads(hcfg, layers, teacher, result.state)
            ev = evaluate_heads(heads, teacher, eval_reader, max_tokens=args.eval_tokens)
            runs[name] = {
                "tokens_per_s": round(result.tokens_per_s, 1), "steps": result.steps,
                "train_seconds": round(sum(e.seconds for e in result.epochs), 2),
                "call_seconds": round(wall, 2), "final_loss": round(result.epochs[-1].loss, 4),
                "agreement": _agreement(ev),
            }
            logging.info("%s: %.0f tokens/s, eval agreement %s", name, result.tokens_per_s, runs[name]["agreement"])

    topk_tps = reader.num_tokens / topk_seconds
    ratio = {loss: round(runs[f"offline_{loss}"]["tokens_per_s"] / runs[f"online_{loss}"]["tokens_per_s"], 2)
             for loss in ("efficient", "full")}
    off_eff, on_eff = runs["offline_efficient"]["tokens_per_s"], runs["online_efficient"]["tokens_per_s"]
    # offline per token over E epochs: E / off_eff + 1 / topk_tps; online: E / on_eff
    amortised = {str(e): round((e / on_eff) / (e / off_eff + 1 / topk_tps), 2) for e in (1, 2, 5, 10)}
    agreement_loss = {mode: round(runs[f"{mode}_full"]["agreement"]["mean"] - runs[f"{mode}_efficient"]["agreement"]["mean"], 4)
                      for mode in ("offline", "online")}
    uniform_loss = round(runs["offline_full"]["agreement"]["mean"] - runs["offline_efficient_uniform"]["agreement"]["mean"], 4)
    result = {
        "benchmark": "train",
        "model": cfg.model.source, "device": str(backbone.device), "threads": torch.get_num_threads(),
        "machine": platform.machine(), "layers": layers, "head_kind": cfg.heads.kind, "rank": cfg.heads.rank,
        "train_tokens": reader.num_tokens, "eval_tokens": min(args.eval_tokens, eval_reader.num_tokens),
        "steps": args.steps, "batch_tokens": args.batch, "tokens_trained": tokens, "lr": args.lr,
        "topk": args.topk, "negatives": args.negatives, "negative_proposal": cfg.heads.negative_proposal,
        "proposal_power": cfg.heads.proposal_power, "uniform_negatives": args.uniform_negatives,
        "loss": cfg.heads.loss,
        "runs": runs,
        "logit_lens_agreement": lens,
        "offline_over_online": ratio,
        "teacher_topk": {"tokens_per_s": round(topk_tps, 1), "seconds": round(topk_seconds, 2),
                         "mean_teacher_mass_in_topk": round(topk_mass, 4)},
        "efficient_offline_over_online_amortised_over_epochs": amortised,
        "agreement_lost_by_efficient_loss": agreement_loss,
        "agreement_lost_with_uniform_negatives": uniform_loss,
        "target_offline_over_online": TARGET_RATIO, "target_agreement_loss": TARGET_AGREEMENT_LOSS,
        "bench_seconds": round(time.perf_counter() - wall0, 1),
    }
    result["meets_targets"] = bool(ratio["efficient"] >= TARGET_RATIO
                                   and agreement_loss["offline"] <= TARGET_AGREEMENT_LOSS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps(result, indent=2) + "\n")

    def row(name: str) -> str:
        r = runs[name]
        per = " / ".join(f"{r['agreement']['per_layer'][str(layer)]:.3f}" for layer in layers)
        return f"| {name.replace('_', ' ')} | {r['tokens_per_s']:,.0f} | {per} | {r['agreement']['mean']:.3f} |"

    lens_per = " / ".join(f"{lens['per_layer'][str(layer)]:.3f}" for layer in layers)
    md = [
        "# Head training benchmark", "",
        f"{cfg.model.source} on {result['device']} ({result['threads']} threads); {len(layers)} {cfg.heads.kind} heads "
        f"(rank {cfg.heads.rank}) at layers {layers}; {args.steps} steps x {args.batch} tokens from a "
        f"{reader.num_tokens}-token train cache, lr {args.lr:g}, loss `{cfg.heads.loss}`; efficient = per-row "
        f"teacher top-{args.topk} + {args.negatives} shared negatives drawn by the frequency proposal (power "
        f"{cfg.heads.proposal_power:g}); `uniform` = {args.uniform_negatives} uniform negatives instead. Agreement = top-1 agreement with the final "
        f"layer on {result['eval_tokens']} eval tokens. One run each, offline and online alternating.", "",
        f"| run | train tokens/s | agreement {' / '.join(map(str, layers))} | mean |",
        "| --- | --- | --- | --- |",
        row("offline_efficient"), row("online_efficient"), row("offline_full"), row("online_full"),
        row("offline_efficient_uniform"),
        f"| logit lens (untrained) | | {lens_per} | {lens['mean']:.3f} |", "",
        "| measure | value | target |", "| --- | --- | --- |",
        f"| offline / online, efficient loss | {ratio['efficient']:.2f}x | >= {TARGET_RATIO:g}x |",
        f"| offline / online, full loss | {ratio['full']:.2f}x | |",
        f"| agreement lost by the efficient loss (offline; online) | {agreement_loss['offline'] * 100:+.2f}; "
        f"{agreement_loss['online'] * 100:+.2f} points | <= {TARGET_AGREEMENT_LOSS * 100:g} point |",
        f"| agreement lost with uniform negatives instead (offline) | {uniform_loss * 100:+.2f} points | |",
        f"| teacher top-{args.topk} precompute (once per cache) | {topk_tps:,.0f} tokens/s "
        f"({topk_seconds:.1f} s; {topk_mass:.1%} of the teacher's mass in the top-{args.topk}) | |",
        f"| offline / online, efficient, precompute amortised over 1 / 2 / 5 / 10 epochs | "
        f"{' / '.join(f'{v:.2f}x' for v in amortised.values())} | |",
        "", f"Meets targets: **{'yes' if result['meets_targets'] else 'no'}**", "",
    ]
    (out / "train.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
