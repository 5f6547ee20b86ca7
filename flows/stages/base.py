"""The shape every stage has, and the one routine that runs any of them.

A stage declares its name and code version, how it plans its content key from the config
and its upstream artifact keys (cheap: no model load, so a cache hit answers in seconds), and
how it builds its payload into a staging folder. :func:`run_stage` does the rest, the same
for every stage: an existing key is a hit and costs nothing; otherwise the stage builds into
``staging/<stage>/<key>/`` (where long stages keep their resumable progress), and the folder
is published with its manifest by one atomic rename.

Adding a stage: a ``pipeline/`` module for its math, a module here with a :class:`Stage`
subclass, registered in :data:`flows.stages.STAGES`, and one line in the DAG (``flows/dag.py``).
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pipeline.config import Config
from stores.artifacts import ArtifactNotFound, ArtifactStore, Manifest, content_key
from stores.locks import build_lock

log = logging.getLogger(__name__)


class InputMismatch(ValueError):
    """An upstream artifact does not belong with this config (another backbone, other layers)."""


@dataclass(frozen=True)
class Plan:
    """What a stage will produce, known before any work: its key and what goes into it.

    ``config`` and ``inputs`` make the key; ``extra`` goes into the manifest only; ``scratch``
    carries what planning computed anyway (a tokenized corpus) to the build, never keyed.
    """

    stage: str
    key: str
    config: dict
    inputs: dict[str, str]
    code_version: str
    extra: dict = field(default_factory=dict)
    scratch: Any = field(default=None, compare=False, repr=False)


@dataclass
class Built:
    """What a build reports for the manifest: metrics (numbers a person reads) and extra facts."""

    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StageContext:
    """The validated config and the artifact store a stage reads from and writes to."""

    cfg: Config
    store: ArtifactStore
    progress: bool = True


class Stage(ABC):
    """One step of the DAG. Subclasses set ``name`` and ``code_version`` and implement
    :meth:`plan` and :meth:`build`; ``inputs`` names the upstream keys it consumes
    (an optional one ends with ``?``)."""

    name: ClassVar[str]
    code_version: ClassVar[str]
    """Bump when the payload changes for the same config and inputs; part of the key."""
    inputs: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def plan(self, ctx: StageContext, inputs: dict[str, str]) -> Plan:
        """The content key from the config and upstream keys; must not load a model."""

    @abstractmethod
    def build(self, ctx: StageContext, plan: Plan, staging: Path) -> Built:
        """Write the payload into `staging` (resuming whatever an interrupted run left there)."""

    @property
    def params(self) -> dict[str, Any]:
        """Constructor arguments, so a Prefect task can rebuild the same stage in its process."""
        return {}

    def make_plan(self, config: dict, inputs: dict[str, str | None], extra: dict | None = None,
                  scratch: Any = None) -> Plan:
        """A plan keyed over this stage's name, code version, `config` and the given inputs
        (None-valued optional inputs are left out of the key)."""
        present = {k: v for k, v in inputs.items() if v is not None}
        return Plan(self.name, content_key(self.name, self.code_version, config, present), config, present,
                    self.code_version, extra or {}, scratch)


def run_stage(stage: Stage, ctx: StageContext, inputs: dict[str, str | None], plan: Plan | None = None) -> str:
    """Plan, then build and publish unless the key exists; returns the artifact key.

    The build holds the key's lock (:func:`stores.locks.build_lock`) from before the staging
    folder is touched until the artifact is published: a second run of the same key waits,
    then finds the artifact published and reuses it, instead of writing the same staging
    folder at the same time."""
    plan = plan or stage.plan(ctx, inputs)
    store = ctx.store
    if store.exists(stage.name, plan.key):
        log.info("%s: cache hit %s", stage.name, plan.key[:12])
        return plan.key
    for name, key in plan.inputs.items():
        _require_upstream(store, stage, name, key)
    with build_lock(store.root, stage.name, plan.key):
        if store.exists(stage.name, plan.key):
            log.info("%s: cache hit %s (another run published it meanwhile)", stage.name, plan.key[:12])
            return plan.key
        staging = store.staging(stage.name, plan.key)
        built = stage.build(ctx, plan, staging)
        path = store.publish(Manifest(stage=stage.name, key=plan.key, config=plan.config, inputs=plan.inputs,
                                      code_version=plan.code_version, metrics=built.metrics,
                                      extra={**plan.extra, **built.extra}))
    log.info("%s: published %s at %s", stage.name, plan.key[:12], path)
    return plan.key


PRODUCED_BY = {"cache": "extract", "train_cache": "extract", "calib_cache": "extract", "eval_cache": "extract",
                  "teacher_topk": "teacher_topk", "heads": "train_heads", "gates": "train_gates",
                  "calibration": "calibrate", "previous": "calibrate", "evaluation": "evaluate",
                  "quantized": "quantize", "ternary_calibration": "calibrate", "ternary_evaluation": "evaluate",
                  "recalibrate": "recalibrate", "report": "report", "teacher": "teacher"}
"""The stage that produces each named input of a stage or output of a flow (``data`` is a plan
key, not an artifact)."""


def _require_upstream(store: ArtifactStore, stage: Stage, name: str, key: str) -> None:
    upstream = PRODUCED_BY.get(name)
    if upstream and not store.exists(upstream, key, strict=True):  # a broken one names `exitflow verify`
        raise ArtifactNotFound(f"{stage.name} needs {name} {key[:12]} ({upstream} stage), which is not under "
                               f"{store.location}; run the {upstream} stage first (its deployment, or "
                               f"`exitflow run {upstream}`)")


def to_plain(obj: Any) -> Any:
    """A result dataclass (or nested dicts/lists of them) as JSON-able data for a manifest:
    dict keys as strings, floats rounded to 5 digits, NaN (an AUROC with one class) as None."""
    from dataclasses import asdict, is_dataclass

    if is_dataclass(obj) and not isinstance(obj, type):
        obj = asdict(obj)
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, float):
        return None if math.isnan(obj) else round(obj, 5)
    return obj
