"""train_gates: one exit gate per head, trained from the train cache; each gate's AUROC for
"the head agrees with the final layer" is reported beside the head's own entropy, on held-out
train tokens and on the eval cache.

Content key: the gates config, the train cache, the heads and the eval cache.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from torch import nn

from flows.stages.base import Built, InputMismatch, Plan, Stage, StageContext, to_plain
from flows.stages.extract import load_teacher, open_cache
from flows.stages.train_heads import load_trained_heads
from pipeline.config import GatesConfig, canonical
from pipeline.gates import load_gates
from pipeline.scoring import evaluate_gates
from pipeline.teacher import TeacherWeights
from pipeline.train_gates import GATES_CODE_VERSION, gates_below_entropy, train_gates
from stores.artifacts import ArtifactStore
from stores.checkpoints import FileCheckpoints
from stores.files import load_tensors, save_tensors

log = logging.getLogger(__name__)

GATES_FILE = "gates.safetensors"


class TrainGatesStage(Stage):
    name = "train_gates"
    code_version = GATES_CODE_VERSION
    inputs = ("cache", "heads", "eval_cache?")

    def plan(self, ctx: StageContext, inputs: dict[str, str | None]) -> Plan:
        return self.make_plan(canonical(ctx.cfg.gates), {"cache": inputs["cache"], "heads": inputs["heads"],
                                                         "eval_cache": inputs.get("eval_cache")})

    def build(self, ctx: StageContext, plan: Plan, staging: Path) -> Built:
        store, cache_key = ctx.store, plan.inputs["cache"]
        reader = open_cache(store, cache_key)
        teacher = load_teacher(store, cache_key)
        heads, heads_m = load_trained_heads(store, plan.inputs["heads"], teacher)
        if heads_m.inputs.get("cache", cache_key) != cache_key:
            log.warning("heads %s were trained on cache %s, gates train on %s", heads_m.key[:12],
                        heads_m.inputs.get("cache", "")[:12], cache_key[:12])
        layers = heads_m.config["layers"]
        result = train_gates(ctx.cfg.gates, heads, layers, int(reader.attrs["num_layers"]), teacher, reader,
                             checkpoints=FileCheckpoints(staging / "checkpoints"), progress=ctx.progress,
                             max_label_tokens=ctx.cfg.gates.max_tokens)
        save_tensors(staging / GATES_FILE, result.state)
        metrics = {"steps": result.steps, "resumed_from_epoch": result.resumed_from_epoch,
                   "heldout_auroc": to_plain(result.auroc),
                   "heldout_entropy_auroc": to_plain(result.entropy_auroc), "epochs": to_plain(result.epochs)}
        gate_auc, entropy_auc, where = result.auroc, result.entropy_auroc, "held-out train"
        if "eval_cache" in plan.inputs:
            gates = load_gates(ctx.cfg.gates, teacher, result.state)
            evals = evaluate_gates(heads, gates, teacher, open_cache(store, plan.inputs["eval_cache"]))
            for layer, ev in evals.items():
                log.info("gate %d: eval AUROC %s vs entropy %s", layer, ev.gate_auroc, ev.entropy_auroc)
            metrics["eval"] = to_plain(evals)
            gate_auc, entropy_auc, where = ({layer: ev.gate_auroc for layer, ev in evals.items()},
                                            {layer: ev.entropy_auroc for layer, ev in evals.items()}, "eval")
        metrics["below_entropy"] = gates_below_entropy(gate_auc, entropy_auc)
        for row in metrics["below_entropy"]:
            log.warning("gate %d ranks tokens worse than its head's entropy on %s tokens: AUROC %.3f vs %.3f; "
                        "the entropy threshold is the better exit rule for this head", row["head"], where,
                        row["gate_auroc"], row["entropy_auroc"])
        shutil.rmtree(staging / "checkpoints", ignore_errors=True)  # the published weights supersede them
        return Built(metrics, {"layers": layers})


def load_trained_gates(store: ArtifactStore, key: str, heads_key: str, teacher: TeacherWeights) -> nn.ModuleDict:
    """Gates of artifact `key`, which must have been trained on heads `heads_key`."""
    m = store.manifest(TrainGatesStage.name, key)
    if m.inputs["heads"] != heads_key:
        raise InputMismatch(f"gates {key[:12]} belong to heads {m.inputs['heads'][:12]}, not {heads_key[:12]}; "
                            "pass the gates trained on these heads")
    state = load_tensors(store.path(TrainGatesStage.name, key) / GATES_FILE)
    return load_gates(GatesConfig.model_validate(m.config), teacher, state)

