"""The recalibration policy: how a new calibration's thresholds moved against the one in
service, and whether to promote it.

Why every held-out check must hold: a deployment exits tokens on these thresholds without
looking back, so one head/level falling significantly below its target on held-out tokens is
reason enough to keep the thresholds in service and let a person look at the drift table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Sequence

from pipeline.calibrate import Calibration, HeldOutCheck
from pipeline.thresholds import CalibrationError, LevelResult

RECALIBRATE_CODE_VERSION = "recalibrate-2"
"""Bump when the policy or drift.json's shape changes; part of the stage's content key.
2: typed `RecalibrationOutcome`; rows name the head ``head`` (was ``layer``)."""


@dataclass(frozen=True)
class LevelDrift:
    """How one level's threshold, exit rate and accuracy moved (new minus old). None where a
    side has no value (no threshold certified, or the level is missing on that side)."""

    level: float
    old_threshold: float | None
    new_threshold: float | None
    shift: float | None
    """New minus old threshold in score units (for entropy, positive = looser)."""
    old_exit_rate: float | None
    new_exit_rate: float | None
    exit_rate_change: float | None
    old_accuracy: float | None
    new_accuracy: float | None
    accuracy_change: float | None


@dataclass(frozen=True)
class DriftRow:
    """One row of the drift table: a head's deployed threshold at one level, old vs new, and
    the new one on held-out tokens. Field order is the table's column order."""

    predictor: str
    head: int
    level: float
    old_threshold: float | None
    new_threshold: float | None
    shift: float | None
    old_exit_rate: float | None
    new_exit_rate: float | None
    exit_rate_change: float | None
    old_accuracy: float | None
    new_accuracy: float | None
    accuracy_change: float | None
    held_out_accuracy: float | None
    held_out_exit_rate: float | None
    held_out_met: bool | None
    held_out_held: bool | None


@dataclass(frozen=True)
class RecalibrationOutcome:
    """The new calibration against the one in service: drift, held-out failures, decision."""

    calibration: str
    """Key (or name) of the new calibration."""
    previous: str | None
    """Key of the calibration in service; None before the first one."""
    promote: bool
    reason: str
    failures: list[HeldOutCheck]
    """Held-out checks of the new thresholds that did not hold (empty: promote)."""
    drift: list[DriftRow]
    held_out: list[HeldOutCheck]

    @property
    def checked(self) -> int:
        """Held-out checks the decision rests on."""
        return len(self.held_out)

    def to_dict(self) -> dict:
        """The JSON form (drift.json)."""
        return {"calibration": self.calibration, "previous": self.previous, "promote": self.promote,
                "reason": self.reason, "failures": [r.to_dict() for r in self.failures],
                "drift": [asdict(r) for r in self.drift], "held_out": [r.to_dict() for r in self.held_out]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RecalibrationOutcome":
        names = {f.name for f in fields(DriftRow)}
        return cls(calibration=d["calibration"], previous=d.get("previous"), promote=bool(d["promote"]),
                   reason=d["reason"], failures=[HeldOutCheck.from_dict(r) for r in d["failures"]],
                   drift=[DriftRow(**{k: v for k, v in r.items() if k in names}) for r in d["drift"]],
                   held_out=[HeldOutCheck.from_dict(r) for r in d["held_out"]])


# ----------------------------------------------------------------------------- drift of one head


def _by_level(results) -> dict[float, dict]:
    if isinstance(results, Mapping):
        items = list(results.values()) if not {"level", "threshold"} <= set(results) else [results]
    else:
        items = list(results)
    out = {}
    for r in items:
        d = r.to_dict() if isinstance(r, LevelResult) else dict(r)
        if "level" not in d or "threshold" not in d:
            raise CalibrationError(f"{d!r} is not a calibration result; pass LevelResult objects or their "
                                   "to_dict() forms")
        out[float(d["level"])] = d
    return out


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else float(b) - float(a)


def drift_table(old, new) -> list[LevelDrift]:
    """Per level, how thresholds, exit rates and accuracies moved between two calibrations of
    one head and predictor.

    Accepts lists of `LevelResult` (or their dicts) or mappings level -> result.
    """
    a, b = _by_level(old), _by_level(new)
    dirs = {d.get("higher_is_confident", False) for d in (*a.values(), *b.values())}
    if len(dirs) > 1:
        raise CalibrationError("old and new results use opposite score directions (entropy vs gate); "
                               "compare like with like")
    rows = []
    for level in sorted(set(a) | set(b)):
        o, w = a.get(level, {}), b.get(level, {})
        rows.append(LevelDrift(
            level=level,
            old_threshold=o.get("threshold"),
            new_threshold=w.get("threshold"),
            shift=_diff(o.get("threshold"), w.get("threshold")),
            old_exit_rate=o.get("exit_rate"),
            new_exit_rate=w.get("exit_rate"),
            exit_rate_change=_diff(o.get("exit_rate"), w.get("exit_rate")),
            old_accuracy=o.get("accuracy"),
            new_accuracy=w.get("accuracy"),
            accuracy_change=_diff(o.get("accuracy"), w.get("accuracy")),
        ))
    return rows


# ----------------------------------------------------------------------------- the decision


def _drift_rows(new: Calibration, old: Calibration | None, held_out: Sequence[HeldOutCheck]) -> list[DriftRow]:
    """`drift_table` per predictor and head of the deployed (chosen) thresholds, joined with
    the new thresholds' held-out result."""
    held = {(r.predictor, r.head, float(r.level)): r for r in held_out}
    rows = []
    for predictor in new.predictors:
        after = new.chosen(predictor)
        before = old.chosen(predictor) if old is not None and predictor in old.predictors else {}
        for layer in sorted(set(after) | set(before)):
            for d in drift_table(before.get(layer, []), after.get(layer, [])):
                h = held.get((predictor, layer, float(d.level)))
                rows.append(DriftRow(
                    predictor=predictor, head=layer, **asdict(d),
                    held_out_accuracy=None if h is None else h.accuracy,
                    held_out_exit_rate=None if h is None else h.exit_rate,
                    held_out_met=None if h is None else h.met,
                    held_out_held=None if h is None else h.held,
                ))
    return rows


def _reason(new_key: str, old_key: str | None, has_old: bool, failures: Sequence[HeldOutCheck]) -> str:
    if has_old:
        kept = f"kept the current calibration {old_key[:12]}" if old_key else "kept the current calibration"
    else:
        kept = "no current calibration set"
    if failures:
        what = "; ".join(f"head {r.head} {r.predictor} level {r.level:g}: held-out accuracy {r.accuracy:.4f} < target "
                         f"{r.level:g} ({r.n_exited} of {r.n} tokens exit)" for r in failures)
        return f"{len(failures)} held-out check(s) failed ({what}); {kept}"
    first = "" if has_old else " (the first current calibration)"
    return f"every threshold held its target on held-out tokens; calibration {new_key[:12]} promoted{first}"


def compare_calibrations(new: Calibration, old: Calibration | None, *, new_key: str = "new",
                         old_key: str | None = None) -> RecalibrationOutcome:
    """Drift of `new` against `old` (the calibration in service, None before the first one)
    and the decision: promote iff every held-out check of the new thresholds held.

    `new` must carry its held-out checks (`Calibration.with_held_out(check_held_out(...))`);
    the keys only name the calibrations in the outcome and its reason.
    """
    if new.held_out is None:
        raise CalibrationError(f"calibration {new_key[:12]} has no held-out check; calibrate with an eval split "
                               "(check_held_out on it) before comparing")
    failures = [r for r in new.held_out if not r.held]
    return RecalibrationOutcome(
        calibration=new_key, previous=old_key if old is not None else None, promote=not failures,
        reason=_reason(new_key, old_key, old is not None, failures), failures=failures,
        drift=_drift_rows(new, old, new.held_out), held_out=list(new.held_out),
    )
