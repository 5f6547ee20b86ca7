"""evaluate: what the heads buy, measured on the eval cache and in generation.

Per head: agreement (top-1, top-5) with the final layer, accuracy and perplexity on the true
tokens, KL to the teacher, calibration error, beside the logit lens; at every calibrated level
the exit rate and accuracy reached on eval tokens and whether the guarantee held; the cascade's
average exit depth and the share of layer compute saved; gate AUROC and operating points. With
``evaluate.decode`` the backbone generates from prompts drawn from the eval documents, plainly
and self-speculatively with the heads, and the comparison (speed-up, acceptance, τ, identical
output) joins the metrics.

Content key: the evaluate config, the eval cache (which names the backbone), the heads, the
gates, the calibration and (for the reduced draft vocabulary) the teacher top-k.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flows.stages.base import Built, InputMismatch, Plan, Stage, StageContext
from flows.stages.calibrate import CalibrateStage, HeadSet, load_calibration
from flows.stages.extract import load_teacher, open_cache
from flows.stages.teacher_topk import open_topk
from pipeline.backbone import load_backbone
from pipeline.calibrate import Calibration
from pipeline.config import canonical
from pipeline.decode_compare import compare_decoding, default_settings, draw_prompts, most_frequent_tokens
from pipeline.evaluate import EVALUATE_CODE_VERSION, evaluate_exits
from pipeline.layered import LayeredDecoder

log = logging.getLogger(__name__)

DEFAULT_DRAFT_LEVEL = 0.9


class EvaluateStage(Stage):
    name = "evaluate"
    code_version = EVALUATE_CODE_VERSION
    inputs = ("eval_cache", "heads?", "quantized?", "calibration", "gates?", "teacher_topk?")
    """``heads``/``gates``: the float head set; ``quantized``: the ternary one of a quantize
    artifact. Either way with the calibration fitted on that set."""

    def plan(self, ctx: StageContext, inputs: dict[str, str | None]) -> Plan:
        cfg = ctx.cfg.evaluate
        calibration = ctx.store.manifest(CalibrateStage.name, inputs["calibration"])
        which = "quantized" if inputs.get("quantized") else "heads"
        if calibration.inputs.get(which) != inputs.get(which):
            raise InputMismatch(f"calibration {inputs['calibration'][:12]} was fitted on {_set_name(calibration.inputs)}, "
                                f"not on {which} {(inputs.get(which) or 'none')[:12]}; evaluate heads with their own "
                                "calibration (`exitflow ls --stage calibrate` shows each one's inputs)")
        gates = calibration.inputs.get("gates")
        if inputs.get("gates") and gates != inputs["gates"]:
            raise InputMismatch(f"calibration {inputs['calibration'][:12]} was fitted with gates {(gates or 'none')[:12]}, "
                                f"not {inputs['gates'][:12]}; pass the gates the calibration was fitted with")
        float_heads = HeadSet(inputs.get("heads"), None, inputs.get("quantized")).float_heads(ctx.store)
        heads = ctx.store.manifest("train_heads", float_heads)
        bad = [x for x in (cfg.exit_layers or []) if x not in heads.config["layers"]]
        if bad:
            raise InputMismatch(f"evaluate.exit_layers {bad} have no head (the heads are at layers "
                                f"{heads.config['layers']}); pick exit layers among those")
        topk = inputs.get("teacher_topk") if cfg.decode and cfg.draft_vocab else None
        level = draft_level(cfg.draft_level, calibration.config["levels"])
        return self.make_plan(canonical(cfg), {"eval_cache": inputs["eval_cache"], "heads": inputs.get("heads"),
                                               "quantized": inputs.get("quantized"),
                                               "calibration": inputs["calibration"], "gates": gates,
                                               "teacher_topk": topk}, {"draft_level": level})

    def build(self, ctx: StageContext, plan: Plan, staging: Path) -> Built:
        store, cfg = ctx.store, ctx.cfg.evaluate
        eval_key = plan.inputs["eval_cache"]
        reader = open_cache(store, eval_key)
        teacher = load_teacher(store, eval_key)
        heads, gates, _ = HeadSet(plan.inputs.get("heads"), plan.inputs.get("gates"),
                                  plan.inputs.get("quantized")).load(store, teacher)
        calibration = load_calibration(store, plan.inputs["calibration"])
        metrics = evaluate_exits(heads, teacher, reader, calibration, gates=gates,
                                 num_layers=int(reader.attrs["num_layers"]), max_tokens=cfg.max_tokens,
                                 progress=ctx.progress).to_dict()
        if cfg.decode:
            metrics["decode"] = _decode(ctx, plan, heads, calibration, reader, plan.extra["draft_level"])
        return Built(metrics=metrics)


def _set_name(inputs: dict) -> str:
    return f"quantized {inputs['quantized'][:12]}" if "quantized" in inputs else f"heads {inputs['heads'][:12]}"


def draft_level(asked: float | None, levels: list[float]) -> float:
    """The calibrated level whose thresholds drive adaptive drafts and early exits."""
    if asked is None:
        return min(levels, key=lambda x: (abs(x - DEFAULT_DRAFT_LEVEL), -x))
    if not any(abs(asked - x) < 1e-9 for x in levels):
        raise InputMismatch(f"evaluate.draft_level={asked:g} is not a calibrated level ({levels}); "
                            "pick one of those, or add it to calibrate.levels")
    return asked


def _decode(ctx: StageContext, plan: Plan, heads: nn.ModuleDict, calibration: Calibration, reader,
            level: float) -> dict:
    """Greedy and self-speculative generation from prompts of the eval documents, with the
    calibrated entropy thresholds at `level` stopping adaptive drafts."""
    cfg = ctx.cfg.evaluate
    backbone = load_backbone(ctx.cfg.model, ctx.store.file_hasher())
    decoder = LayeredDecoder(backbone)
    heads = heads.to(backbone.device)
    layers = cfg.exit_layers or [x for x in calibration.layers if x <= backbone.num_layers // 2] or \
        [min(calibration.layers)]
    thresholds = _entropy_thresholds(calibration, level)
    draft_vocab = None
    if "teacher_topk" in plan.inputs:
        top1 = open_topk(ctx.store, plan.inputs["teacher_topk"]).ids[:, 0]
        draft_vocab = most_frequent_tokens(np.asarray(top1), min(cfg.draft_vocab, backbone.vocab_size))
    prompts = draw_prompts(_documents(reader), cfg.prompts, cfg.prompt_tokens, cfg.seed)
    settings = default_settings(layers, cfg.draft_lens, adaptive=True,
                                draft_vocab_size=None if draft_vocab is None else len(draft_vocab))
    with torch.no_grad():
        result = compare_decoding(decoder, heads, prompts, cfg.new_tokens, settings, entropy_thresholds=thresholds,
                                  draft_vocab=draft_vocab, early_exit_thresholds=thresholds, progress=ctx.progress)
    best = result.best
    if best is None:
        log.info("decode: greedy %.1f tokens/s; no setting kept the greedy output", result.greedy_tokens_per_s)
    else:
        log.info("decode: greedy %.1f tokens/s; best %s at %.2fx (%d drafted, %d accepted)", result.greedy_tokens_per_s,
                 best.setting.name, best.speedup, best.drafted, best.accepted)
    if not result.all_identical:
        raise RuntimeError("self-speculative decoding changed the greedy output (" + "; ".join(
            f"{r.setting.name}: prompt {r.first_mismatch.prompt} position {r.first_mismatch.position}"
            for r in result.settings if not r.identical) + "); this is a bug, please report it with the config")
    return {**result.to_dict(), "device": str(backbone.device), "dtype": str(backbone.dtype).removeprefix("torch."),
            "draft_level": level}


def _entropy_thresholds(calibration: Calibration, level: float) -> dict[int, float]:
    """Each head's deployed entropy threshold at `level` (-inf where no threshold meets it:
    the head never exits, and an adaptive draft from it never drafts)."""
    out = {}
    for layer, results in calibration.chosen("entropy").items():
        r = next(r for r in results if abs(r.level - level) < 1e-9)
        out[layer] = float("-inf") if r.threshold is None else float(r.threshold)
    return out


def _documents(reader) -> list[np.ndarray]:
    """The eval cache's token stream cut at document boundaries."""
    ids, docs = reader.column("input_ids"), reader.column("doc_ids")
    cuts = np.flatnonzero(np.diff(docs)) + 1
    return [d for d in np.split(ids, cuts) if len(d)]
