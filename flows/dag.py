"""Prefect flows: `<stage>_flow`. A flow validates the config, then walks the DAG up to its
stage: each step plans the stage's content key (cheap) and runs the stage as a task, which is
a cache hit when its artifact exists. So any flow can be started on its own from the UI or the
command line, and unchanged upstream stages cost seconds.

The DAG (one line per stage in :class:`Dag`)::

    extract(train) -> teacher_topk -> train_heads -> train_gates -> calibrate -> evaluate
                                                   \-> quantize -> calibrate -> evaluate  (ternary)
    extract(calib) -> both calibrations;  extract(eval) -> every stage's held-out numbers
"""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger

from flows.preflight import preflight
from flows.stages.base import StageContext
from flows.stages.calibrate import CalibrateStage
from flows.stages.evaluate import EvaluateStage
from flows.stages.extract import ExtractStage, resolve_cache
from flows.stages.quantize import QuantizeStage
from flows.stages.report import ReportStage
from flows.stages.teacher_topk import TeacherTopkStage
from flows.stages.train_gates import TrainGatesStage
from flows.stages.train_heads import TrainHeadsStage
from flows.tasks import publish_report, submit
from pipeline.config import (
    CalibrateConfig,
    Config,
    ConfigError,
    DataConfig,
    EvaluateConfig,
    ExtractConfig,
    GatesConfig,
    HeadsConfig,
    InputsConfig,
    ModelConfig,
    QuantizeConfig,
    load_config,
)
from reports.run import REPORT_INPUTS
from stores.artifacts import ArtifactStore


class Dag:
    """The stages of one config and artifact root, each a method returning its artifact key.
    ``keys`` collects every key produced or used so far, by name, in DAG order."""

    def __init__(self, cfg: Config, store: ArtifactStore):
        self.ctx = StageContext(cfg, store)
        self.keys: dict[str, str] = {}

    def _note(self, name: str, key: str) -> str:
        self.keys[name] = key
        return key

    @classmethod
    def load(cls, config_path: str | None, overrides: list[str] | None, root: str | None, *,
             absent_data_ok: bool = False, **sections) -> "Dag":
        """The config file, then the typed sections' non-default fields, then the overrides;
        checked against its model and corpus before any work (`flows.preflight`), so a run
        started from the UI fails as early as `exitflow run`."""
        cfg = preflight(load_config(config_path, overrides or [], sections), absent_data_ok)
        return cls(cfg, ArtifactStore(root))

    @property
    def cfg(self) -> Config:
        return self.ctx.cfg

    @property
    def store(self) -> ArtifactStore:
        return self.ctx.store

    def has_split(self, split: str) -> bool:
        return self.cfg.data.fractions.get(split, 0) > 0 or bool(getattr(self.cfg.inputs, f"{split}_cache"))

    def extract(self, split: str) -> str:
        """The cache of one split: an explicit ``inputs.<split>_cache``, else extract (or hit)."""
        if getattr(self.cfg.inputs, f"{split}_cache"):
            return self._note(f"{split}_cache", resolve_cache(self.cfg, self.store, split))
        return self._note(f"{split}_cache", submit(ExtractStage(split), self.ctx, {}))

    def eval_cache(self) -> str | None:
        return self.extract("eval") if self.has_split("eval") else None

    def teacher_topk(self, train: str) -> str:
        return self._note("teacher_topk", submit(TeacherTopkStage(), self.ctx, {"cache": train}))

    def heads(self, train: str | None, ev: str | None) -> str:
        if self.cfg.inputs.heads:
            return self._note("heads", self.store.resolve_input(self.cfg.inputs.heads, "heads", TrainHeadsStage.name).key)
        topk = self.teacher_topk(train) if train and self.cfg.heads.efficient_loss else None
        return self._note("heads", submit(TrainHeadsStage(), self.ctx,
                                          {"cache": train, "teacher_topk": topk, "eval_cache": ev}))

    def gates(self, train: str, heads: str, ev: str | None) -> str:
        if self.cfg.inputs.gates:
            return self._note("gates", self.store.resolve_input(self.cfg.inputs.gates, "gates", TrainGatesStage.name).key)
        return self._note("gates", submit(TrainGatesStage(), self.ctx, {"cache": train, "heads": heads, "eval_cache": ev}))

    def calibrate(self, calib: str, heads: str, gates: str | None, ev: str | None) -> str:
        return self._note("calibration", submit(CalibrateStage(), self.ctx, {
            "calib_cache": calib, "heads": heads, "gates": gates, "eval_cache": ev}))

    def quantize(self, train: str, heads: str, gates: str | None, ev: str | None) -> str:
        topk = self.teacher_topk(train) if self.store.manifest(TrainHeadsStage.name, heads).config.get(
            "efficient_loss") else None
        return self._note("quantized", submit(QuantizeStage(), self.ctx, {
            "cache": train, "heads": heads, "gates": gates, "teacher_topk": topk, "eval_cache": ev}))

    def calibrate_quantized(self, calib: str, quantized: str, ev: str | None) -> str:
        return self._note("ternary_calibration", submit(CalibrateStage(), self.ctx, {
            "calib_cache": calib, "quantized": quantized, "eval_cache": ev}))

    def evaluate(self, ev: str, heads: str, gates: str | None, calibration: str, train: str | None,
                 quantized: str | None = None) -> str:
        """Evaluate the float head set, or (``quantized``) the ternary one, with its calibration."""
        topk = self.teacher_topk(train) if train and self.cfg.evaluate.decode and self.cfg.evaluate.draft_vocab else None
        head_set = {"quantized": quantized} if quantized else {"heads": heads, "gates": gates}
        return self._note("ternary_evaluation" if quantized else "evaluation", submit(EvaluateStage(), self.ctx, {
            "eval_cache": ev, **head_set, "calibration": calibration, "teacher_topk": topk}))

    def report(self) -> str:
        """The report of every artifact this run produced or used, published to the run page."""
        inputs = {name: key for name, key in self.keys.items() if name in REPORT_INPUTS and key}
        key = self._note("report", submit(ReportStage(), self.ctx, inputs))
        publish_report(self.store, key)
        return key

    def finish(self) -> dict[str, str]:
        """End a flow: its report, then every key by name (what the flow returns)."""
        self.report()
        return self.keys


Split = Literal["train", "calib", "eval"]

_COMMON_ARGS = """
    Args:
        config_path: Optional YAML config file (e.g. configs/quick.yaml), relative to the
            repository. Form fields left at their defaults keep the file's values.
        overrides: Optional `section.key=value` settings applied last, e.g. `heads.epochs=3`.
        root: Artifact root folder; default $EXITFLOW_HOME or ./.exitflow.
"""
_SECTION_ARGS = {
    "inputs": "Existing artifacts to use instead of producing them: a key, a unique prefix, "
              "`current` or `latest`; empty fields are derived from the settings.",
    "model": "The frozen backbone.",
    "data": "The corpus and its train/calib/eval split.",
    "extract": "Which layers' hidden states to cache, and how.",
    "heads": "Early-exit head training.",
    "gates": "Exit gate training.",
    "calibrate": "Entropy and gate thresholds per accuracy level.",
    "quantize": "Ternary (BitNet b1.58) retraining of heads and gates.",
    "evaluate": "Held-out evaluation and the decoding comparison.",
}


def _documented(*sections: str, extra: str = ""):
    """Append the parameters' help (shown under each field of the run form) to a flow's docstring."""
    def wrap(fn):
        lines = [f"        {name}: {_SECTION_ARGS[name]}" for name in sections]
        fn.__doc__ = (fn.__doc__ or "").rstrip() + "\n" + _COMMON_ARGS.rstrip() + "\n" + "\n".join(lines) + extra
        return fn
    return wrap


@flow(name="extract", log_prints=True)
@_documented("model", "data", "extract", extra="\n        split: Which split to extract; default extract.split.\n")
def extract_flow(model: ModelConfig = ModelConfig(), data: DataConfig = DataConfig(),
                 extract: ExtractConfig = ExtractConfig(), split: Split | None = None,
                 config_path: str | None = None, overrides: list[str] | None = None,
                 root: str | None = None) -> dict[str, str]:
    """Extract one split's hidden states into a content-addressed zarr cache."""
    dag = Dag.load(config_path, overrides, root, model=model, data=data, extract=extract)
    dag.extract(split or dag.cfg.extract.split)
    return dag.finish()


@flow(name="teacher_topk", log_prints=True)
@_documented("inputs", "model", "data", "extract", "heads")
def teacher_topk_flow(inputs: InputsConfig = InputsConfig(), model: ModelConfig = ModelConfig(),
                      data: DataConfig = DataConfig(), extract: ExtractConfig = ExtractConfig(),
                      heads: HeadsConfig = HeadsConfig(), config_path: str | None = None,
                      overrides: list[str] | None = None, root: str | None = None) -> dict[str, str]:
    """The final layer's top-k per token of the train cache (extracted first if missing),
    which the efficient head-training loss reads."""
    dag = Dag.load(config_path, overrides, root, inputs=inputs, model=model, data=data, extract=extract, heads=heads)
    dag.teacher_topk(dag.extract("train"))
    return dag.finish()


@flow(name="train_heads", log_prints=True)
@_documented("inputs", "model", "data", "extract", "heads")
def train_heads_flow(inputs: InputsConfig = InputsConfig(), model: ModelConfig = ModelConfig(),
                     data: DataConfig = DataConfig(), extract: ExtractConfig = ExtractConfig(),
                     heads: HeadsConfig = HeadsConfig(), config_path: str | None = None,
                     overrides: list[str] | None = None, root: str | None = None) -> dict[str, str]:
    """Train early-exit heads from the train cache (extracted first if missing), or with the
    backbone running every step (``heads.mode: online``), and evaluate them against the logit
    lens on the eval cache."""
    dag = Dag.load(config_path, overrides, root, inputs=inputs, model=model, data=data, extract=extract, heads=heads)
    train = dag.extract("train") if dag.cfg.heads.mode == "offline" else None  # online: no train cache
    dag.heads(train, dag.eval_cache())
    return dag.finish()


@flow(name="train_gates", log_prints=True)
@_documented("inputs", "model", "data", "extract", "heads", "gates")
def train_gates_flow(inputs: InputsConfig = InputsConfig(), model: ModelConfig = ModelConfig(),
                     data: DataConfig = DataConfig(), extract: ExtractConfig = ExtractConfig(),
                     heads: HeadsConfig = HeadsConfig(), gates: GatesConfig = GatesConfig(),
                     config_path: str | None = None, overrides: list[str] | None = None,
                     root: str | None = None) -> dict[str, str]:
    """Train one exit gate per head (heads trained first if missing)."""
    dag = Dag.load(config_path, overrides, root, inputs=inputs, model=model, data=data, extract=extract, heads=heads,
                   gates=gates)
    train, ev = dag.extract("train"), dag.eval_cache()
    dag.gates(train, dag.heads(train, ev), ev)
    return dag.finish()


@flow(name="calibrate", log_prints=True)
@_documented("inputs", "model", "data", "extract", "heads", "gates", "calibrate")
def calibrate_flow(inputs: InputsConfig = InputsConfig(), model: ModelConfig = ModelConfig(),
                   data: DataConfig = DataConfig(), extract: ExtractConfig = ExtractConfig(),
                   heads: HeadsConfig = HeadsConfig(), gates: GatesConfig = GatesConfig(),
                   calibrate: CalibrateConfig = CalibrateConfig(), config_path: str | None = None,
                   overrides: list[str] | None = None, root: str | None = None) -> dict[str, str]:
    """Entropy and gate thresholds per head and accuracy level, with a Learn-then-Test
    guarantee, checked on the eval split."""
    dag = Dag.load(config_path, overrides, root, inputs=inputs, model=model, data=data, extract=extract, heads=heads,
                   gates=gates, calibrate=calibrate)
    _calibrate(dag)
    return dag.finish()


def _calibrate(dag: Dag) -> tuple[str, str, str | None, str, str | None, str]:
    train, ev, calib = dag.extract("train"), dag.eval_cache(), dag.extract("calib")
    heads = dag.heads(train, ev)
    gates = dag.gates(train, heads, ev)
    return train, heads, gates, calib, ev, dag.calibrate(calib, heads, gates, ev)


@flow(name="quantize", log_prints=True)
@_documented("inputs", "model", "data", "extract", "heads", "gates", "calibrate", "quantize")
def quantize_flow(inputs: InputsConfig = InputsConfig(), model: ModelConfig = ModelConfig(),
                  data: DataConfig = DataConfig(), extract: ExtractConfig = ExtractConfig(),
                  heads: HeadsConfig = HeadsConfig(), gates: GatesConfig = GatesConfig(),
                  calibrate: CalibrateConfig = CalibrateConfig(), quantize: QuantizeConfig = QuantizeConfig(),
                  config_path: str | None = None, overrides: list[str] | None = None,
                  root: str | None = None) -> dict[str, str]:
    """Retrain the heads and gates as ternary (BitNet b1.58) networks, packed 2 bits a weight,
    and calibrate them with the same guarantee as the float ones."""
    dag = Dag.load(config_path, overrides, root, inputs=inputs, model=model, data=data, extract=extract, heads=heads,
                   gates=gates, calibrate=calibrate, quantize=quantize)
    train, ev, calib = dag.extract("train"), dag.eval_cache(), dag.extract("calib")
    heads_key = dag.heads(train, ev)
    q = dag.quantize(train, heads_key, dag.gates(train, heads_key, ev), ev)
    dag.calibrate_quantized(calib, q, ev)
    return dag.finish()


def _evaluate(dag: Dag, quantized: bool) -> None:
    if not dag.has_split("eval"):
        raise ConfigError("evaluate needs an eval split: give data.fractions an eval share > 0 or set "
                          "inputs.eval_cache")
    train, heads, gates, calib, ev, calibration = _calibrate(dag)
    dag.evaluate(ev, heads, gates, calibration, train)
    if quantized:
        q = dag.quantize(train, heads, gates, ev)
        dag.evaluate(ev, heads, gates, dag.calibrate_quantized(calib, q, ev), train, quantized=q)


@flow(name="evaluate", log_prints=True)
@_documented("inputs", "model", "data", "extract", "heads", "gates", "calibrate", "evaluate", "quantize",
             extra="\n        quantized: Also retrain, calibrate and evaluate the ternary heads.\n")
def evaluate_flow(inputs: InputsConfig = InputsConfig(), model: ModelConfig = ModelConfig(),
                  data: DataConfig = DataConfig(), extract: ExtractConfig = ExtractConfig(),
                  heads: HeadsConfig = HeadsConfig(), gates: GatesConfig = GatesConfig(),
                  calibrate: CalibrateConfig = CalibrateConfig(), evaluate: EvaluateConfig = EvaluateConfig(),
                  quantize: QuantizeConfig = QuantizeConfig(), quantized: bool = False,
                  config_path: str | None = None, overrides: list[str] | None = None,
                  root: str | None = None) -> dict[str, str]:
    """What the heads buy on the eval split: head quality, guarantees held, cascade savings,
    gate operating points, and (``evaluate.decode``) self-speculative decoding against greedy;
    with ``quantized`` the ternary heads too, retrained, calibrated and evaluated the same way."""
    dag = Dag.load(config_path, overrides, root, inputs=inputs, model=model, data=data, extract=extract, heads=heads,
                   gates=gates, calibrate=calibrate, evaluate=evaluate, quantize=quantize)
    _evaluate(dag, quantized)
    return dag.finish()


@flow(name="pipeline", log_prints=True)
@_documented("inputs", "model", "data", "extract", "heads", "gates", "calibrate", "quantize", "evaluate")
def pipeline_flow(inputs: InputsConfig = InputsConfig(), model: ModelConfig = ModelConfig(),
                  data: DataConfig = DataConfig(), extract: ExtractConfig = ExtractConfig(),
                  heads: HeadsConfig = HeadsConfig(), gates: GatesConfig = GatesConfig(),
                  calibrate: CalibrateConfig = CalibrateConfig(), quantize: QuantizeConfig = QuantizeConfig(),
                  evaluate: EvaluateConfig = EvaluateConfig(), config_path: str | None = None,
                  overrides: list[str] | None = None, root: str | None = None) -> dict[str, str]:
    """Every stage in DAG order (extract, teacher top-k, heads, gates, calibration, evaluation,
    and the ternary heads' quantization, calibration and evaluation); unchanged stages are cache
    hits. Its calibration becomes `latest`, and `current` when there is none yet."""
    dag = Dag.load(config_path, overrides, root, inputs=inputs, model=model, data=data, extract=extract, heads=heads,
                   gates=gates, calibrate=calibrate, quantize=quantize, evaluate=evaluate)
    if dag.has_split("eval"):
        _evaluate(dag, quantized=True)
    else:
        _calibrate(dag)
    keys, store = dag.finish(), dag.store
    store.set_pointer("latest", CalibrateStage.name, keys["calibration"], **keys)
    if store.get_pointer("current") is None:  # the first calibration is what a deployment starts from
        store.set_pointer("current", CalibrateStage.name, keys["calibration"], reason="first calibration")
        get_run_logger().info("calibration %s is now the current one", keys["calibration"][:12])
    return keys


FLOWS = {"extract": extract_flow, "teacher_topk": teacher_topk_flow, "train_heads": train_heads_flow,
         "train_gates": train_gates_flow, "calibrate": calibrate_flow, "quantize": quantize_flow,
         "evaluate": evaluate_flow, "pipeline": pipeline_flow}
"""What `exitflow run <name>` runs, by flow name (recalibration has its own flow in
:mod:`flows.recalibrate`)."""
