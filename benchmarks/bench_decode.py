"""Decoding speed with the exit heads: self-speculative greedy decoding against plain greedy.

Batch 1, fp32, on the embedded SmolLM2-135M by default, over a fixed seeded set of prompts
cut from the embedded corpus. Baselines: our own greedy loop (the same layered code path)
and HF `generate` greedy. Then self-speculative decoding at several exit layers with fixed
and adaptive (entropy-stopped) drafts, KV reuse on/off and a reduced draft vocabulary
on/off, and one early-exit run. Every configuration runs in this process on the same prompts;
our greedy loop is timed again after each exit layer's group of configurations, and a
group's speed-ups are against the greedy runs just before and after it (their mean), so a
machine whose load drifts (a shared 2-core CPU) hits both sides of each ratio.

Adaptive-draft and early-exit thresholds are calibrated here on held-out corpus text (one
full forward): the loosest head-entropy threshold whose tokens agree with the model's top-1
at least `--draft-level` (drafts) or `--exit-level` (early exit) of the time.

    python benchmarks/bench_decode.py [--root DIR --heads KEY] [--quick]

Without --heads the heads are untrained: the logit lens, which agrees with the model's
top-1 on few tokens at early layers, so drafts are mostly rejected. Train heads first
(`exitflow run`) and pass their artifact for the numbers that matter.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.backbone import load_backbone  # noqa: E402
from pipeline.config import DataConfig, HeadsConfig, ModelConfig  # noqa: E402
from pipeline.data import load_corpus  # noqa: E402
from pipeline.heads import build_heads, load_heads  # noqa: E402
from pipeline.layered import LayeredDecoder  # noqa: E402
from pipeline.speculative import (  # noqa: E402
    DecodeResult,
    early_exit_decode,
    entropy,
    greedy_decode,
    speculative_decode,
)
from pipeline.thresholds import empirical_thresholds  # noqa: E402


def _load_trained_heads(root: Path, key: str, teacher) -> tuple[torch.nn.ModuleDict, str]:
    from safetensors.torch import load_file

    folder = root / "artifacts" / "train_heads" / key
    manifest = json.loads((folder / "manifest.json").read_text())
    config = dict(manifest["config"])
    state = load_file(str(folder / "heads.safetensors"))
    layers = config.get("layers") or sorted({int(k.split(".", 1)[0]) for k in state})
    return load_heads(HeadsConfig.model_validate(config), layers, teacher, state), f"trained ({folder})"


def _prompts(decoder: LayeredDecoder, docs: list[str], n: int, length: int, seed: int) -> list[list[int]]:
    """`n` windows of `length` tokens at seeded offsets in seeded documents."""
    rng = np.random.default_rng(seed)
    tok = decoder.backbone.tokenizer
    out: list[list[int]] = []
    for d in rng.permutation(len(docs)):
        ids = tok(docs[d])["input_ids"]
        if len(ids) > length + 1:
            start = int(rng.integers(0, len(ids) - length))
            out.append(ids[start : start + length])
        if len(out) == n:
            break
    return out


@torch.no_grad()
def _calibrate(decoder: LayeredDecoder, heads, layers: list[int], docs: list[str], tokens: int,
               levels: dict[str, float]) -> dict[str, dict[int, float]]:
    """Per level name and layer, the loosest entropy threshold meeting that top-1 agreement level on
    held-out text; -inf where none does (the head then never drafts / never exits)."""
    tok = decoder.backbone.tokenizer
    ids = [t for d in docs for t in tok(d)["input_ids"]][:tokens]
    states, final = decoder.backbone.hidden_states(torch.tensor([ids]), layers)  # {l: [1, n, H]}, [1, n, H]
    target = decoder.lm_head(final[0]).argmax(dim=-1)  # [n]
    out: dict[str, dict[int, float]] = {name: {} for name in levels}
    for layer in layers:
        head = heads[str(layer)]
        logits = head.project(head.features(states[layer][0].float()))  # [n, V]
        ent = entropy(logits).numpy()  # [n]
        correct = (logits.argmax(dim=-1) == target).numpy()  # [n]
        for name, level in levels.items():
            fit = empirical_thresholds(ent, correct, [level])[0]
            out[name][layer] = float("-inf") if fit.threshold is None else float(fit.threshold)
    return out


def _run_all(fn, prompts: list[list[int]]) -> list[DecodeResult]:
    return [fn(p) for p in prompts]


def _summary(name: str, results: list[DecodeResult], reference: list[list[int]], **fields) -> dict:
    tokens = sum(len(r.ids) for r in results)
    total = sum(r.total_s for r in results)
    drafted, accepted, steps = (sum(getattr(r, a) for r in results) for a in ("drafted", "accepted", "steps"))
    tps = tokens / total
    split = {part: round(sum(getattr(r, f"{part}_s") for r in results) / total, 3)
             for part in ("prefill", "draft", "verify", "overhead")}
    return {"name": name, **fields, "tokens": tokens, "seconds": round(total, 3), "tokens_per_s": round(tps, 2),
            "speedup": None,
            "drafted": drafted, "accepted": accepted, "verifications": steps,
            "acceptance": round(accepted / drafted, 3) if drafted else None,
            "tau": round(accepted / steps, 3) if steps else None, "time_split": split,
            "identical": all(r.ids == ref for r, ref in zip(results, reference))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=None, help="artifact root holding trained heads")
    ap.add_argument("--heads", default=None, help="train_heads artifact key under --root")
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 6, 8, 12])
    ap.add_argument("--draft-lens", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--draft-vocab", type=int, default=4096, help="size of the reduced draft vocabulary")
    ap.add_argument("--draft-level", type=float, default=0.6, help="top-1 agreement the adaptive draft calibrates for")
    ap.add_argument("--exit-level", type=float, default=0.9, help="top-1 agreement early exit calibrates for")
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="2 prompts x 16 tokens, layers 6 and 12, draft length 4")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.new_tokens, args.layers, args.draft_lens = 2, 16, [6, 12], [4]

    backbone = load_backbone(ModelConfig(device="cpu", dtype="float32"))
    decoder = LayeredDecoder(backbone)
    teacher = backbone.teacher_weights()
    notes: list[str] = []
    if args.heads:
        heads, heads_kind = _load_trained_heads(args.root or Path(".exitflow"), args.heads, teacher)
        missing = [layer for layer in args.layers if str(layer) not in heads]
        if missing:
            notes.append(f"no trained head at layers {missing}; skipped")
            args.layers = [layer for layer in args.layers if str(layer) in heads]
    else:
        heads, heads_kind = build_heads(HeadsConfig(), args.layers, teacher), "untrained (logit lens)"
        note = ("NO TRAINED HEADS GIVEN (--root/--heads): drafting with the untrained logit lens, which rarely "
                "agrees with the model at early layers: these rows measure the decoding machinery and its costs, not what trained heads reach")
        notes.append(note)
        print("\n" + "!" * 100 + f"\n{note}\n" + "!" * 100 + "\n", flush=True)

    docs = load_corpus(DataConfig()).documents
    order = np.random.default_rng(args.seed).permutation(len(docs))
    calib_docs = [docs[i] for i in order[:8]]
    prompt_docs = [docs[i] for i in order[8:]]
    prompts = _prompts(decoder, prompt_docs, args.prompts, args.prompt_len, args.seed)
    counts = Counter(t for d in prompt_docs for t in backbone.tokenizer(d)["input_ids"])
    vocab = torch.tensor([t for t, _ in counts.most_common(args.draft_vocab)])  # [N] most frequent corpus tokens
    thresholds = _calibrate(decoder, heads, args.layers, calib_docs, args.calib_tokens,
                            {"draft": args.draft_level, "exit": args.exit_level})
    print(f"thresholds (nats): {json.dumps(thresholds)}", flush=True)
    N = args.new_tokens

    greedy_decode(decoder, prompts[0], 4)  # warm-up
    greedy_runs = [_run_all(lambda p: greedy_decode(decoder, p, N), prompts)]
    reference = [r.ids for r in greedy_runs[0]]
    t0 = time.perf_counter()
    gen = []
    for p in prompts:
        out = backbone.model.generate(torch.tensor([p]), max_new_tokens=N, min_new_tokens=N, do_sample=False,
                                      pad_token_id=backbone.tokenizer.eos_token_id)
        gen.append(out[0, len(p):].tolist())
    hf_s = time.perf_counter() - t0
    hf = {"name": "HF generate (greedy)", "tokens": N * len(prompts), "seconds": round(hf_s, 3),
          "tokens_per_s": round(N * len(prompts) / hf_s, 2), "identical": gen == reference}

    ablate_k = args.draft_lens[len(args.draft_lens) // 2]
    rows, groups = [], []
    for layer in args.layers:
        group = []
        for k in [*args.draft_lens, "adaptive"]:
            adaptive = k == "adaptive"
            variants = [(True, False)] + ([(False, False), (True, True)] if k == ablate_k else [])
            for reuse, reduced in variants:
                kk = max(args.draft_lens) if adaptive else int(k)
                thr = thresholds["draft"][layer] if adaptive else None
                results = _run_all(lambda p: speculative_decode(
                    decoder, heads, p, N, exit_layer=layer, draft_len=kk, entropy_threshold=thr,
                    vocab_idx=vocab if reduced else None, reuse_kv=reuse), prompts)
                group.append(_summary(f"speculative l={layer} k={k}", results, reference, exit_layer=layer,
                                      draft_len=k, max_draft=kk, entropy_threshold=thr, kv_reuse=reuse,
                                      draft_vocab=len(vocab) if reduced else None))
                print(json.dumps(group[-1]), flush=True)
        # greedy again after every layer's group: each group's speed-ups are against the greedy runs
        # just before and after it, so load that drifts over the run hits both sides of a ratio
        greedy_runs.append(_run_all(lambda p: greedy_decode(decoder, p, N), prompts))
        tps = [sum(len(r.ids) for r in g) / sum(r.total_s for r in g) for g in greedy_runs[-2:]]
        for row in group:
            row["greedy_tokens_per_s"] = round(float(np.mean(tps)), 2)
            row["speedup"] = round(row["tokens_per_s"] / float(np.mean(tps)), 3)
        rows += group
    greedy_rows = [_summary(f"own greedy (run {i + 1} of {len(greedy_runs)})", g, reference)
                   for i, g in enumerate(greedy_runs)]
    base = float(np.mean([g["tokens_per_s"] for g in greedy_rows]))
    for row in greedy_rows:
        row["speedup"] = round(row["tokens_per_s"] / base, 3)
    hf["speedup"] = round(hf["tokens_per_s"] / float(greedy_rows[0]["tokens_per_s"]), 3)

    exit_thr = {layer: thresholds["exit"][layer] for layer in args.layers}
    ee = [early_exit_decode(decoder, heads, p, N, exit_thr, reference=ref) for p, ref in zip(prompts, reference)]
    ee_tps = sum(len(r.ids) for r in ee) / sum(r.total_s for r in ee)
    early = {"name": "early exit (no verification)", "thresholds": exit_thr, "tokens_per_s": round(ee_tps, 2),
             "speedup": round(ee_tps / base, 3),
             "matches_greedy": round(float(np.mean([r.matches_greedy for r in ee])), 3),
             "layers_skipped": round(float(np.mean([r.layers_skipped for r in ee])), 3)}
    coverage = float(np.mean([t in set(vocab.tolist()) for ref in reference for t in ref]))

    result = {"benchmark": "decode", "model": ModelConfig().source, "device": "cpu", "dtype": "float32",
              "threads": torch.get_num_threads(), "machine": platform.machine(), "batch": 1,
              "heads": heads_kind, "prompts": len(prompts), "prompt_len": args.prompt_len, "new_tokens": N,
              "seed": args.seed, "draft_vocab_source": "most frequent tokens of the prompt-side corpus documents",
              "draft_vocab_size": len(vocab), "draft_vocab_covers_greedy_tokens": round(coverage, 3),
              "calibration": {"tokens": args.calib_tokens, "draft_level": args.draft_level,
                              "exit_level": args.exit_level, "thresholds": thresholds},
              "notes": notes, "baselines": greedy_rows + [hf], "speculative": rows, "early_exit": early,
              "all_identical": all(r["identical"] for r in rows + greedy_rows)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    md = _markdown(result, base)
    (args.out / "decode.md").write_text(md)
    print(md)


def _fmt(v, spec: str = "{:.2f}") -> str:
    return "–" if v is None else spec.format(v)


def _markdown(r: dict, base: float) -> str:
    lines = [
        "# Decoding benchmark", "",
        f"{r['model']} on {r['device']} ({r['dtype']}, {r['threads']} threads), batch 1, {r['prompts']} prompts of "
        f"{r['prompt_len']} tokens from the embedded corpus (seed {r['seed']}), {r['new_tokens']} new tokens each. "
        f"Heads: **{r['heads']}**. Speed-up is against our own greedy loop timed just before and after each exit "
        f"layer's group (all greedy runs: mean {base:.1f} tokens/s; HF generate: against the first; early exit: "
        "against the mean). τ = accepted draft tokens per verification pass; time split = share of wall time in "
        "prefill / draft / verify / overhead.", "",
    ]
    lines += [f"> {n}" for n in r["notes"]] + ([""] if r["notes"] else [])
    lines += ["| decoder | tokens/s | speed-up | acceptance | τ | split p/d/v/o | identical to greedy |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in r["baselines"]:
        lines.append(f"| {row['name']} | {row['tokens_per_s']:.1f} | {row['speedup']:.2f}x | | | | "
                     f"{'yes' if row['identical'] else 'NO'} |")
    for row in r["speculative"]:
        s = row["time_split"]
        label = (f"l={row['exit_layer']}, k={row['draft_len']}"
                 + (f" (≤{row['max_draft']}, H≤{row['entropy_threshold']:.2f})" if row["draft_len"] == "adaptive" else "")
                 + ("" if row["kv_reuse"] else ", no KV reuse")
                 + (f", draft vocab {row['draft_vocab']}" if row["draft_vocab"] else ""))
        lines.append(f"| {label} | {row['tokens_per_s']:.1f} | {row['speedup']:.2f}x | {_fmt(row['acceptance'])} | "
                     f"{_fmt(row['tau'])} | {s['prefill']:.2f}/{s['draft']:.2f}/{s['verify']:.2f}/{s['overhead']:.2f} | "
                     f"{'yes' if row['identical'] else 'NO'} |")
    e = r["early_exit"]
    lines += ["", f"Early exit without verification (thresholds for top-1 agreement {r['calibration']['exit_level']}: "
              f"{ {k: round(v, 2) for k, v in e['thresholds'].items()} }): {e['tokens_per_s']:.1f} tokens/s "
              f"({e['speedup']:.2f}x), {e['layers_skipped']:.1%} of layer passes skipped, "
              f"{e['matches_greedy']:.1%} of tokens equal to greedy at their position.", "",
              f"Draft vocabulary: the {r['draft_vocab_size']} most frequent corpus tokens; they hold "
              f"{r['draft_vocab_covers_greedy_tokens']:.1%} of the greedy output tokens. "
              f"All speculative outputs identical to greedy: **{'yes' if r['all_identical'] else 'NO'}**.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
