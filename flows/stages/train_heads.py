"""train_heads: one early-exit head per exit layer, trained from the train cache (or, with
``heads.mode: online``, with the backbone running every step), evaluated beside the logit lens
on the eval cache.

Content key: the heads config, the exit layers, the train cache (online: the key that cache
would have), the teacher top-k (efficient loss) and the eval cache. Resumes from the last
epoch checkpoint kept in the staging folder.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from torch import nn

from flows.stages.base import Built, InputMismatch, Plan, Stage, StageContext, to_plain
from flows.stages.extract import ExtractStage, load_teacher, open_cache
from flows.stages.teacher_topk import open_topk
from pipeline.backbone import load_backbone
from pipeline.config import HeadsConfig, canonical
from pipeline.heads import load_heads
from pipeline.scoring import evaluate_heads, logit_lens
from pipeline.sources import OnlineSource
from pipeline.teacher import TeacherWeights
from pipeline.train_heads import HEADS_CODE_VERSION, train_heads
from stores.artifacts import ArtifactStore, Manifest
from stores.checkpoints import FileCheckpoints
from stores.files import load_tensors, save_tensors

log = logging.getLogger(__name__)

HEADS_FILE = "heads.safetensors"


class TrainHeadsStage(Stage):
    name = "train_heads"
    code_version = HEADS_CODE_VERSION
    inputs = ("cache", "teacher_topk?", "eval_cache?")

    def plan(self, ctx: StageContext, inputs: dict[str, str | None]) -> Plan:
        cfg = ctx.cfg
        config = canonical(cfg.heads)
        if cfg.heads.mode == "online":
            data_plan = ExtractStage("train").plan(ctx, {})
            config["layers"] = sorted(cfg.heads.layers or cfg.extract.layers)
            return self.make_plan(config, {"data": data_plan.key, "eval_cache": inputs.get("eval_cache")},
                                  {"model": data_plan.config["model"]}, scratch=data_plan.scratch)
        cache_key = inputs["cache"]
        extracted = ctx.store.manifest(ExtractStage.name, cache_key)
        config["layers"] = _head_layers(cfg.heads, extracted.config["layers"])
        if cfg.heads.efficient_loss and not inputs.get("teacher_topk"):
            raise InputMismatch("heads.efficient_loss reads the teacher_topk artifact of the train cache; "
                                "run the teacher_topk stage first (the flows do) or set heads.efficient_loss=false")
        topk = inputs.get("teacher_topk") if cfg.heads.efficient_loss else None
        return self.make_plan(config, {"cache": cache_key, "teacher_topk": topk, "eval_cache": inputs.get("eval_cache")},
                              {"model": extracted.config["model"]})

    def build(self, ctx: StageContext, plan: Plan, staging: Path) -> Built:
        cfg, store = ctx.cfg, ctx.store
        layers = plan.config["layers"]
        checkpoints = FileCheckpoints(staging / "checkpoints")
        if cfg.heads.mode == "online":
            backbone = load_backbone(cfg.model, store.file_hasher())
            backbone.check_layers(layers)
            backbone.check_seq_len(cfg.data.seq_len)
            teacher = backbone.teacher_weights()
            max_seq = cfg.extract.max_tokens // cfg.data.seq_len if cfg.extract.max_tokens else None
            packed = plan.scratch if plan.scratch is not None else ExtractStage("train").pack(cfg)[0]
            source = OnlineSource(backbone, packed, layers, sequences_per_forward=cfg.extract.batch_size,
                                  max_sequences=max_seq)
            num_layers, hidden_size = backbone.num_layers, backbone.hidden_size
            result = train_heads(cfg.heads, layers, num_layers, teacher, source, checkpoints=checkpoints,
                                 progress=ctx.progress, device=backbone.device)
        else:
            reader = open_cache(store, plan.inputs["cache"])
            teacher = load_teacher(store, plan.inputs["cache"])
            num_layers, hidden_size = int(reader.attrs["num_layers"]), reader.hidden_size
            topk = open_topk(store, plan.inputs["teacher_topk"]) if "teacher_topk" in plan.inputs else None
            result = train_heads(cfg.heads, layers, num_layers, teacher, reader, checkpoints=checkpoints,
                                 progress=ctx.progress, teacher_topk=topk)
        save_tensors(staging / HEADS_FILE, result.state)
        metrics = {"steps": result.steps, "tokens_per_s": round(result.tokens_per_s, 1),
                   "resumed_from_epoch": result.resumed_from_epoch, "epochs": to_plain(result.epochs)}
        if "eval_cache" in plan.inputs:
            metrics.update(_evaluate(store, plan.inputs["eval_cache"], load_heads(cfg.heads, layers, teacher, result.state),
                                     teacher, layers))
        shutil.rmtree(staging / "checkpoints", ignore_errors=True)  # the published weights supersede them
        return Built(metrics, {"num_layers": num_layers, "hidden_size": hidden_size})


def _head_layers(cfg: HeadsConfig, cached: list[int]) -> list[int]:
    layers = cfg.layers or cached
    missing = [x for x in layers if x not in cached]
    if missing:
        raise InputMismatch(f"heads.layers {missing} are not in the cache (it holds {cached}); "
                            f"train heads for cached layers or extract them (set extract.layers)")
    return sorted(layers)


def _evaluate(store: ArtifactStore, eval_key: str, heads: nn.ModuleDict, teacher: TeacherWeights,
              layers: list[int]) -> dict:
    """Per-head quality on the eval cache, beside the logit lens (the untrained head)."""
    reader = open_cache(store, eval_key)
    trained = evaluate_heads(heads, teacher, reader)
    lens = evaluate_heads(logit_lens(teacher, layers), teacher, reader)
    for layer in layers:
        log.info("layer %d: agreement %.3f (logit lens %.3f), accuracy %.3f, entropy AUROC %.3f", layer,
                 trained[layer].agreement, lens[layer].agreement, trained[layer].accuracy, trained[layer].entropy_auroc)
    return {"eval": to_plain(trained), "logit_lens": to_plain(lens)}


# -- reading published heads -------------------------------------------------------------------
def load_trained_heads(store: ArtifactStore, key: str, teacher: TeacherWeights) -> tuple[nn.ModuleDict, Manifest]:
    """Heads of artifact `key`, rebuilt with the config they were trained with."""
    m = store.manifest(TrainHeadsStage.name, key)
    cfg = HeadsConfig.model_validate({k: v for k, v in m.config.items()})
    state = load_tensors(store.path(TrainHeadsStage.name, key) / HEADS_FILE)
    return load_heads(cfg, m.config["layers"], teacher, state), m


def heads_model(store: ArtifactStore, m: Manifest) -> dict:
    """The backbone identity heads were trained on (older manifests: their cache's)."""
    return m.extra.get("model") or store.manifest(ExtractStage.name, m.inputs["cache"]).config["model"]
