"""calibrate: exit thresholds per head, predictor (entropy, gate) and target accuracy, with a
Learn-then-Test guarantee, the cascade over heads, how each threshold holds on held-out eval
tokens, and per head and level the deployed predictor (the higher certified exit rate):
``calibration.json``.

Content key: the calibrate config, the calib cache, the heads, the gates and the eval cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from flows.stages.base import Built, InputMismatch, Plan, Stage, StageContext
from flows.stages.extract import ExtractStage, load_teacher, open_cache
from flows.stages.quantize import QuantizeStage, load_quantized
from flows.stages.train_gates import load_trained_gates
from flows.stages.train_heads import TrainHeadsStage, heads_model, load_trained_heads
from pipeline.calibrate import CALIBRATE_CODE_VERSION, Calibration, calibrate_exits, check_held_out, choose_deployed
from pipeline.config import canonical
from pipeline.recalibrate import deployed_thresholds, judge_held_out, too_few_exits
from pipeline.gates import gate_exit_probabilities
from pipeline.scoring import ExitLabels, collect_exit_labels
from pipeline.teacher import TeacherWeights
from stores.artifacts import ArtifactStore
from stores.files import write_json_atomic

CALIBRATION_FILE = "calibration.json"


@dataclass(frozen=True)
class Scored:
    """Per-token exit labels (correct, entropy) of every head on one cache, and the gates' p_exit."""

    labels: ExitLabels
    gate_probs: dict[int, np.ndarray] | None
    layers: list[int]
    num_layers: int


class CalibrateStage(Stage):
    name = "calibrate"
    code_version = CALIBRATE_CODE_VERSION
    inputs = ("calib_cache", "heads?", "quantized?", "gates?", "eval_cache?")
    """``heads`` (and ``gates``): float heads; ``quantized``: the ternary heads and gates of a
    quantize artifact instead. Both are calibrated by the same code."""

    def plan(self, ctx: StageContext, inputs: dict[str, str | None]) -> Plan:
        if bool(inputs.get("heads")) == bool(inputs.get("quantized")):
            raise InputMismatch("calibrate takes either float heads (`heads`) or a quantize artifact (`quantized`)")
        return self.make_plan(canonical(ctx.cfg.calibrate), {
            "calib_cache": inputs["calib_cache"], "heads": inputs.get("heads"), "quantized": inputs.get("quantized"),
            "gates": None if inputs.get("quantized") else inputs.get("gates"), "eval_cache": inputs.get("eval_cache")})

    def build(self, ctx: StageContext, plan: Plan, staging: Path) -> Built:
        store = ctx.store
        calib_key = plan.inputs["calib_cache"]
        head_set = HeadSet(plan.inputs.get("heads"), plan.inputs.get("gates"), plan.inputs.get("quantized"))
        _check_compatible(store, calib_key, head_set.float_heads(store))
        calib = score_split(store, calib_key, head_set)
        calibration = calibrate_exits(calib.labels, calib.gate_probs, calib.layers, calib.num_layers, ctx.cfg.calibrate)
        metrics: dict = {"n": calibration.n}
        if "eval_cache" in plan.inputs:
            ev = score_split(store, plan.inputs["eval_cache"], head_set)
            calibration = choose_deployed(calibration.with_held_out(check_held_out(calibration, ev.labels,
                                                                                   ev.gate_probs)))
            # "held" under the family-wise rule a recalibration is promoted by: the deployed thresholds,
            # each at delta / K
            deployed = deployed_thresholds(calibration)
            rule, held, failures = judge_held_out(calibration.held_out, calibration.delta, deployed)
            calibration = calibration.with_held_out(held)
            metrics["held_out_met"] = sum(r.met for r in held)
            metrics["held_out_checked"] = len(held)
            metrics["held_out_rule"] = rule.to_dict()
            metrics["held_out_failed"] = [f"{r.predictor} head {r.head} level {r.level}" for r in failures]
            # a check with too few exits "holds" whatever its threshold's accuracy: say which
            metrics["held_out_too_few_exits"] = too_few_exits(held, rule, deployed)
        else:
            calibration, rule = choose_deployed(calibration), None
        metrics["deployed"] = [{"head": d.head, "level": d.level, "predictor": d.predictor,
                                "exit_rates": {p: round(r, 4) for p, r in d.exit_rates.items()}}
                               for d in calibration.deployed or []]
        metrics["deployed_on"] = calibration.deployed_on
        out = calibration.to_dict()
        if rule is not None:
            out["held_out_rule"] = {**rule.to_dict(), "rule": rule.describe()}
        write_json_atomic(staging / CALIBRATION_FILE, out)
        return Built(metrics)


def _check_compatible(store: ArtifactStore, calib_key: str, heads_key: str) -> None:
    heads_m = store.manifest(TrainHeadsStage.name, heads_key)
    calib_m = store.manifest(ExtractStage.name, calib_key)
    missing = [x for x in heads_m.config["layers"] if x not in calib_m.config["layers"]]
    if calib_m.config["model"] != heads_model(store, heads_m) or missing:
        raise InputMismatch(f"heads {heads_key[:12]} were trained on another backbone or on layers {missing} that calib "
                            f"cache {calib_key[:12]} lacks; calibrate heads on a cache of the same backbone and layers")


@dataclass(frozen=True)
class HeadSet:
    """The heads (and gates) a calibration or an evaluation is about: float heads and gates by
    their train_heads / train_gates keys, or the ternary ones of a quantize artifact."""

    heads: str | None = None
    gates: str | None = None
    quantized: str | None = None

    def float_heads(self, store: ArtifactStore) -> str:
        """The train_heads key behind this set (a quantize artifact's float heads)."""
        return self.heads or store.manifest(QuantizeStage.name, self.quantized).inputs["heads"]

    def load(self, store: ArtifactStore, teacher: TeacherWeights) -> tuple[nn.ModuleDict, nn.ModuleDict | None, list[int]]:
        if self.quantized:
            heads, gates, m = load_quantized(store, self.quantized, teacher)
            return heads, gates, list(m.extra["heads_config"]["layers"])
        heads, heads_m = load_trained_heads(store, self.heads, teacher)
        gates = load_trained_gates(store, self.gates, self.heads, teacher) if self.gates else None
        return heads, gates, list(heads_m.config["layers"])


def score_split(store: ArtifactStore, cache_key: str, head_set: HeadSet) -> Scored:
    """Exit labels of every head and the gates' p_exit on one cache."""
    reader = open_cache(store, cache_key)
    teacher = load_teacher(store, cache_key)
    heads, gates, layers = head_set.load(store, teacher)
    labels = collect_exit_labels(heads, teacher, reader)
    probs = gate_exit_probabilities(gates, reader, features=labels.features) if gates is not None else None
    return Scored(labels, probs, layers, int(reader.attrs["num_layers"]))


def load_calibration(store: ArtifactStore, key: str) -> Calibration:
    store.manifest(CalibrateStage.name, key)  # a clear error when it is gone
    return Calibration.from_dict(json.loads((store.path(CalibrateStage.name, key) / CALIBRATION_FILE).read_text()))
