"""The artifacts of one flow run, loaded once for a report: each input's manifest under its
name in the flow, the calibrations and the drift outcome they hold, and where the run came
from (backbone, data), found by following the inputs up to an extract manifest."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.calibrate import Calibration
from pipeline.recalibrate import RecalibrationOutcome
from stores.artifacts import ArtifactStore, Manifest

REPORT_INPUTS = ("train_cache", "calib_cache", "eval_cache", "teacher_topk", "heads", "gates", "calibration",
                 "evaluation", "quantized", "ternary_calibration", "ternary_evaluation", "recalibrate", "previous")
"""The named artifacts of a flow run a report reads, in the order it lists them."""

REPORT_HTML = "report.html"
SUMMARY_MD = "summary.md"
METRICS_JSON = "metrics.json"
"""The files of a report artifact."""

CALIBRATION_FILE = "calibration.json"
"""The payload of a calibrate artifact (written by `flows.stages.calibrate`)."""
DRIFT_FILE = "drift.json"
"""The payload of a recalibrate artifact (written by `flows.stages.recalibrate`)."""

_MAX_WALK = 40
"""Manifests read at most while looking for the run's backbone and data."""


class UnknownReportInput(ValueError):
    """A report was asked for an input it does not know, or for none at all."""


@dataclass(frozen=True)
class RunArtifacts:
    """What a report reads: manifests by input name (in `REPORT_INPUTS` order), the parsed
    calibrations (``calibration``, ``ternary_calibration``, ``previous``) and drift outcome."""

    manifests: dict[str, Manifest]
    calibrations: dict[str, Calibration]
    drift: RecalibrationOutcome | None
    model: dict | None
    """The backbone's identity as the extract stage recorded it (source, file, dtype, ...)."""
    data: str | None
    """The data source the caches were cut from."""
    model_source: str | None = None
    """Where the backbone was loaded from (a local folder's path is not part of its identity)."""

    @property
    def model_name(self) -> str:
        return describe_model(self.model, self.model_source)

    def get(self, name: str) -> Manifest | None:
        return self.manifests.get(name)

    def metrics(self, name: str) -> dict | None:
        m = self.manifests.get(name)
        return None if m is None else m.metrics

    def has(self, *names: str) -> bool:
        return any(n in self.manifests for n in names)


def check_report_inputs(keys: Mapping[str, str | None]) -> dict[str, str]:
    """The given inputs in `REPORT_INPUTS` order (None dropped); refuses unknown names and an
    empty set, naming what is accepted."""
    unknown = sorted(set(keys) - set(REPORT_INPUTS))
    if unknown:
        raise UnknownReportInput(f"a report takes the artifacts {', '.join(REPORT_INPUTS)}; not {unknown}")
    present = {n: keys[n] for n in REPORT_INPUTS if keys.get(n)}
    if not present:
        raise UnknownReportInput("a report needs at least one artifact key; pass a flow's keys "
                                 f"(any of {', '.join(REPORT_INPUTS)})")
    return present  # type: ignore[return-value]


def load_calibration_payload(store: ArtifactStore, key: str) -> Calibration:
    return Calibration.from_dict(json.loads((store.path("calibrate", key) / CALIBRATION_FILE).read_text()))


def load_drift_payload(store: ArtifactStore, key: str) -> RecalibrationOutcome:
    return RecalibrationOutcome.from_dict(json.loads((store.path("recalibrate", key) / DRIFT_FILE).read_text()))


def load_run(store: ArtifactStore, keys: Mapping[str, str | None], produced_by: Mapping[str, str]) -> RunArtifacts:
    """Every named artifact's manifest and payload. `produced_by`: the stage behind each input
    name (`flows.stages.base.PRODUCED_BY`), also used to follow the inputs' own inputs."""
    present = check_report_inputs(keys)
    manifests = {name: store.manifest(produced_by[name], key) for name, key in present.items()}
    calibrations = {name: load_calibration_payload(store, m.key) for name, m in manifests.items()
                    if m.stage == "calibrate"}
    drift = load_drift_payload(store, manifests["recalibrate"].key) if "recalibrate" in manifests else None
    model, data, source = _provenance(store, list(manifests.values()), produced_by)
    return RunArtifacts(manifests=manifests, calibrations=calibrations, drift=drift, model=model, data=data,
                        model_source=source)


def _provenance(store: ArtifactStore, start: list[Manifest],
                produced_by: Mapping[str, str]) -> tuple[dict | None, str | None, str | None]:
    """(backbone identity, data source, backbone source), breadth-first through the inputs' inputs
    until an extract manifest (which records all three) is found."""
    model: dict | None = None
    data: str | None = None
    source: str | None = None
    queue, seen = list(start), {(m.stage, m.key) for m in start}
    for m in queue[:_MAX_WALK]:
        if m.stage == "extract":
            model = model or m.config.get("model")
            data = data or (m.extra.get("source") or {}).get("data")
            source = source or (m.extra.get("source") or {}).get("model")
        model = model or m.extra.get("model")
        if model is not None and data is not None:
            break
        for name, key in m.inputs.items():
            stage = produced_by.get(name)
            if stage and (stage, key) not in seen and store.exists(stage, key):
                seen.add((stage, key))
                queue.append(store.manifest(stage, key))
    return model, data, source


def describe_model(model: dict | None, source: str | None = None) -> str:
    """A backbone in a few words: "embedded:smollm2 (SmolLM2-…gguf, float32)", or a local
    folder's path with its dtype."""
    if not model and not source:
        return "unknown"
    model = model or {}
    details = [model.get("gguf_file"), model.get("dtype")]
    if model.get("quantization") not in (None, "none"):
        details.append(model["quantization"])
    details = [d for d in details if d]
    name = source or model.get("source") or f"{model.get('kind', 'unknown')} model"
    return name + (f" ({', '.join(details)})" if details else "")
