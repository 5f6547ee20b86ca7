"""quantize: the trained heads and gates retrained as ternary (BitNet b1.58) networks from the
train cache, shipped packed (2 bits a weight), and compared with the float ones on the eval
cache.

Content key: the quantize config, the train cache, the float heads and gates, the teacher
top-k (when the heads were trained with the efficient loss) and the eval cache. Resumes per
epoch from checkpoints in the staging folder, like the other trainers.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from flows.stages.base import Built, InputMismatch, Plan, Stage, StageContext, to_plain
from flows.stages.extract import ExtractStage, load_teacher, open_cache
from flows.stages.teacher_topk import open_topk
from flows.stages.train_gates import TrainGatesStage, load_trained_gates
from flows.stages.train_heads import TrainHeadsStage, heads_model, load_trained_heads
from pipeline.config import GatesConfig, HeadsConfig, QuantizeConfig, canonical
from pipeline.packed_heads import load_packed_heads
from pipeline.quantize import (
    QUANTIZE_CODE_VERSION,
    load_ternary_gates,
    load_ternary_heads,
    quantize_gates,
    quantize_heads,
)
from pipeline.scoring import evaluate_gates, evaluate_heads
from pipeline.sources import layer_key
from pipeline.teacher import TeacherWeights
from pipeline.packed_heads import FEATURE_STATS
from pipeline.ternary import BitLinear, pack_bitlinear
from stores.artifacts import ArtifactStore, Manifest
from stores.checkpoints import FileCheckpoints
from stores.files import load_tensors, save_tensors

log = logging.getLogger(__name__)

HEADS_FILE = "heads.safetensors"
"""Latent (training) state of the ternary heads: what scoring and calibration load."""
HEADS_PACKED = "heads.packed.safetensors"
"""Every ternary matrix 2 bits a weight with its scale: what a deployment ships."""
PACKED_CHECK_ROWS = 1024
"""Eval tokens on which the packed heads are checked against the training modules and timed."""
GATES_FILE = "gates.safetensors"
GATES_PACKED = "gates.packed.safetensors"


class QuantizeStage(Stage):
    name = "quantize"
    code_version = QUANTIZE_CODE_VERSION
    inputs = ("cache", "heads", "gates?", "teacher_topk?", "eval_cache?")

    def plan(self, ctx: StageContext, inputs: dict[str, str | None]) -> Plan:
        store = ctx.store
        heads_m = store.manifest(TrainHeadsStage.name, inputs["heads"])
        cache_m = store.manifest(ExtractStage.name, inputs["cache"])
        if heads_model(store, heads_m) != cache_m.config["model"]:
            raise InputMismatch(f"heads {inputs['heads'][:12]} were trained on another backbone than cache "
                                f"{inputs['cache'][:12]}; quantize heads with a train cache of their own backbone")
        gates = inputs.get("gates") if ctx.cfg.quantize.gates else None
        if gates and store.manifest(TrainGatesStage.name, gates).inputs["heads"] != inputs["heads"]:
            raise InputMismatch(f"gates {gates[:12]} were not trained on heads {inputs['heads'][:12]}; "
                                "pass the gates of these heads")
        topk = inputs.get("teacher_topk") if heads_m.config.get("efficient_loss") else None
        if heads_m.config.get("efficient_loss") and not topk:
            raise InputMismatch("the heads were trained with the efficient loss, which reads the teacher_topk "
                                "artifact of the train cache; run the teacher_topk stage first (the flows do)")
        return self.make_plan(canonical(ctx.cfg.quantize), {
            "cache": inputs["cache"], "heads": inputs["heads"], "gates": gates, "teacher_topk": topk,
            "eval_cache": inputs.get("eval_cache")}, {"model": heads_model(store, heads_m)})

    def build(self, ctx: StageContext, plan: Plan, staging: Path) -> Built:
        store, qcfg = ctx.store, ctx.cfg.quantize
        reader = open_cache(store, plan.inputs["cache"])
        teacher = load_teacher(store, plan.inputs["cache"])
        float_heads, heads_m = load_trained_heads(store, plan.inputs["heads"], teacher)
        heads_cfg = HeadsConfig.model_validate(heads_m.config)
        layers, num_layers = list(heads_m.config["layers"]), int(reader.attrs["num_layers"])
        topk = open_topk(store, plan.inputs["teacher_topk"]) if "teacher_topk" in plan.inputs else None
        result = quantize_heads(qcfg, heads_cfg, float_heads, layers, num_layers, teacher, reader,
                                checkpoints=FileCheckpoints(staging / "checkpoints" / "heads"), progress=ctx.progress,
                                teacher_topk=topk)
        heads = load_ternary_heads(heads_cfg, layers, teacher, qcfg, result.state)
        save_tensors(staging / HEADS_FILE, result.state)
        save_tensors(staging / HEADS_PACKED, packed_state(heads))
        metrics: dict = {"steps": result.steps, "tokens_per_s": round(result.tokens_per_s, 1),
                         "resumed_from_epoch": result.resumed_from_epoch,
                         "epochs": to_plain(result.epochs), "kind": heads_cfg.kind,
                         "size": _sizes(float_heads, heads),
                         "frozen_shared": "the adapter heads' shared LM head stays float32 (frozen, one copy for "
                                          "all heads, as the backbone's own)" if heads_cfg.kind == "adapter" else None}
        gates = float_gates = None
        if "gates" in plan.inputs:
            gates_m = store.manifest(TrainGatesStage.name, plan.inputs["gates"])
            gates_cfg = GatesConfig.model_validate(gates_m.config)
            float_gates = load_trained_gates(store, plan.inputs["gates"], plan.inputs["heads"], teacher)
            gres = quantize_gates(qcfg, gates_cfg, float_gates, heads, layers, num_layers, teacher, reader,
                                  checkpoints=FileCheckpoints(staging / "checkpoints" / "gates"), progress=ctx.progress)
            gates = load_ternary_gates(gates_cfg, qcfg, teacher, gres.state)
            save_tensors(staging / GATES_FILE, gres.state)
            save_tensors(staging / GATES_PACKED, packed_state(gates))
            metrics["gates"] = {"epochs": to_plain(gres.epochs), "resumed_from_epoch": gres.resumed_from_epoch,
                                "heldout_auroc": to_plain(gres.auroc),
                                "size": _sizes(float_gates, gates)}
        if "eval_cache" in plan.inputs:
            eval_reader = open_cache(store, plan.inputs["eval_cache"])
            metrics["eval"] = _compare(eval_reader, teacher, float_heads, heads, float_gates, gates,
                                       _float_eval(store, plan.inputs, heads_m))
            packed = load_packed_heads(heads_cfg, layers, teacher, load_tensors(staging / HEADS_PACKED))
            metrics["packed"] = _packed_inference(eval_reader, float_heads, heads, packed)
        shutil.rmtree(staging / "checkpoints", ignore_errors=True)  # the published weights supersede them
        return Built(metrics, {"num_layers": num_layers, "heads_config": heads_m.config,
                               **({"gates_config": gates_m.config} if gates is not None else {})})


def packed_state(modules: nn.ModuleDict) -> dict[str, torch.Tensor]:
    """Every ternary matrix packed (2 bits a weight + scale), every float parameter that is not
    part of one (norms, a gate's confidence read-out) and a gate's feature statistics, under the
    module's own names."""
    out: dict[str, torch.Tensor] = {}
    packed_params: set[str] = set()
    for name, module in modules.named_modules():
        if isinstance(module, BitLinear):
            out.update({f"{name}.{k}": v for k, v in pack_bitlinear(module).items()})
            packed_params |= {f"{name}.{p}" for p, _ in module.named_parameters()}
    for name, p in modules.named_parameters():
        if name not in packed_params:
            out[name] = p.detach().float()
    for name, b in modules.named_buffers():
        if name.rpartition(".")[2] in FEATURE_STATS:
            out[name] = b.detach().float()
    return out


def _bytes(tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


def _sizes(float_modules: nn.ModuleDict, ternary: nn.ModuleDict) -> dict:
    """Bytes per head (or gate) of its own weights: float32 as trained vs packed ternary."""
    out = {}
    for layer, module in ternary.items():
        floats = _bytes(p.detach().float() for p in float_modules[layer].parameters())
        packed = _bytes(packed_state(nn.ModuleDict({layer: module})).values())
        out[layer] = {"float32_bytes": floats, "packed_bytes": packed, "ratio": round(floats / max(packed, 1), 2)}
    return out


def _float_eval(store: ArtifactStore, inputs: dict[str, str], heads_m: Manifest) -> dict | None:
    """The float heads' (and gates') eval metrics their own stages already measured on this
    eval cache, so they are not scored a second time; None when they were measured elsewhere."""
    ev = inputs.get("eval_cache")
    if heads_m.inputs.get("eval_cache") != ev or "eval" not in heads_m.metrics:
        return None
    out = {"heads": heads_m.metrics["eval"]}
    if "gates" in inputs:
        gates_m = store.manifest(TrainGatesStage.name, inputs["gates"])
        if gates_m.inputs.get("eval_cache") != ev or "eval" not in gates_m.metrics:
            return None
        out["gates"] = gates_m.metrics["eval"]
    return out


def _compare(reader, teacher: TeacherWeights, float_heads, heads, float_gates, gates, measured: dict | None) -> dict:
    """Ternary against float on the eval cache: agreement and entropy AUROC per head, gate AUROC.
    `measured`: the float side as the train_heads / train_gates manifests hold it (else scored here)."""
    t = evaluate_heads(heads, teacher, reader)
    f = measured["heads"] if measured else to_plain(evaluate_heads(float_heads, teacher, reader))
    out = {str(layer): {"float_agreement": f[str(layer)]["agreement"], "ternary_agreement": t[layer].agreement,
                        "float_entropy_auroc": f[str(layer)]["entropy_auroc"],
                        "ternary_entropy_auroc": t[layer].entropy_auroc} for layer in t}
    for layer in t:
        log.info("ternary head %d: agreement %.3f (float %.3f)", layer, t[layer].agreement, out[str(layer)]["float_agreement"])
    if gates is not None:
        tg = evaluate_gates(heads, gates, teacher, reader)
        fg = measured["gates"] if measured else to_plain(evaluate_gates(float_heads, float_gates, teacher, reader))
        for layer in tg:
            out[str(layer)].update(float_gate_auroc=fg[str(layer)]["gate_auroc"], ternary_gate_auroc=tg[layer].gate_auroc)
    return to_plain(out)


def _packed_inference(reader, float_heads: nn.ModuleDict, heads: nn.ModuleDict, packed: nn.ModuleDict) -> dict:
    """The packed heads (what a deployment loads) against the training modules and the float
    heads, per head on eval tokens: top-1 equal to the fake-quantized module's, the largest
    logit difference relative to the row's largest logit, latency per token at batch 1 and 64
    (median of repeated calls) and the bytes of tensors each head holds in memory."""
    rows = min(PACKED_CHECK_ROWS, reader.num_tokens)
    out = {}
    with torch.no_grad():
        for layer, head in heads.items():
            h = torch.from_numpy(reader.hidden(layer_key(int(layer)), slice(0, rows)))  # [n, H]
            want, got = head(h), packed[layer](h)  # [n, V]
            scale = want.abs().amax(dim=-1).clamp_min(1e-12)  # [n]
            out[layer] = {
                "rows": rows,
                "top1_equal": float((want.argmax(-1) == got.argmax(-1)).float().mean()),
                "max_rel_diff": float(((want - got).abs().amax(-1) / scale).max()),
                "ms_per_token": {f"batch_{b}": {"float32": _ms_per_token(float_heads[layer], h[:b]),
                                                "packed": _ms_per_token(packed[layer], h[:b])} for b in (1, 64)},
                "tensor_bytes": {"float32": _held_bytes(float_heads[layer]), "packed": _held_bytes(packed[layer])},
            }
            log.info("packed head %s: top-1 equal to fake-quant on %.4f of %d eval tokens", layer,
                     out[layer]["top1_equal"], rows)
    return to_plain(out)


def _ms_per_token(module: nn.Module, h: torch.Tensor, repeats: int = 7) -> float:
    module(h)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        module(h)
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2] / h.shape[0]


def _held_bytes(module: nn.Module) -> int:
    """Bytes of the parameters and buffers a head holds (a shared frozen LM head counted once)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() not in seen and t.device.type != "meta":
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


# -- reading a published quantize artifact ------------------------------------------------------
def load_quantized(store: ArtifactStore, key: str, teacher: TeacherWeights) -> tuple[nn.ModuleDict, nn.ModuleDict | None, Manifest]:
    """The ternary heads (and gates, when quantized) of artifact `key`, as training modules
    (fake-quantized: exactly what the packed files compute)."""
    m = store.manifest(QuantizeStage.name, key)
    qcfg = QuantizeConfig.model_validate(m.config)
    heads_cfg = HeadsConfig.model_validate(m.extra["heads_config"])
    folder = store.path(QuantizeStage.name, key)
    heads = load_ternary_heads(heads_cfg, heads_cfg.layers or [], teacher, qcfg, load_tensors(folder / HEADS_FILE))
    gates = None
    if "gates_config" in m.extra:
        gates = load_ternary_gates(GatesConfig.model_validate(m.extra["gates_config"]), qcfg, teacher,
                                   load_tensors(folder / GATES_FILE))
    return heads, gates, m
