"""The recalibration policy: how a new calibration's thresholds moved against the one in
service, and whether to promote it.

Why one significant shortfall blocks promotion: a deployment exits tokens on these thresholds
without looking back, so one head/level falling significantly below its target on held-out
tokens is reason enough to keep the thresholds in service and let a person look at the drift
table.

Why "significant" is corrected for the number of checks (Bonferroni): each held-out check is a
one-sided binomial test of "this threshold's accuracy is >= its level". Tested at a fixed
α each, K correct thresholds raise at least one false alarm with probability up to K·α (about
1 - (1 - α)^K): with ~20 certified thresholds at α = 0.05 a correct recalibration was rejected
more often than not. Testing each at δ/K bounds the chance of rejecting a correct
recalibration by δ (the union bound; no independence needed, and the nested thresholds of one
head are strongly dependent). K counts only the thresholds that can fail: certified ones (a
level with no threshold never exits), and of those only the deployed predictor's when the
calibration names one per head and level. Alternatives weighed: a fixed-sequence test over
levels stops at the first check that holds, so it never looks at stricter levels of a head
whose loose levels hold — no power where shortfalls matter most; Holm's step-down rejects the
whole family exactly when Bonferroni does (its first step is Bonferroni), so for a yes/no
decision it gains nothing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.calibrate import Calibration, HeldOutCheck
from pipeline.thresholds import CalibrationError, LevelResult

RECALIBRATE_CODE_VERSION = "recalibrate-3"
"""Bump when the policy or drift.json's shape changes; part of the stage's content key.
2: typed `RecalibrationOutcome`; rows name the head ``head`` (was ``layer``).
3: family-wise (Bonferroni) promotion rule, recorded as ``rule`` in drift.json."""

RULE_NAME = "bonferroni"


@dataclass(frozen=True)
class PromotionRule:
    """The family-wise rule a promotion decision used: the chance that a correct recalibration
    (every checked threshold truly at or above its level) is rejected is at most `delta`."""

    name: str
    delta: float
    """Family-wise bound: P(reject a correct recalibration) <= delta."""
    checked: int
    """K: thresholds tested on held-out tokens (certified, and deployed when that is known)."""
    per_check_delta: float
    """delta / K: a check fails when its p-value (``p_below``) is at or under this."""
    scope: str
    """``deployed``: only the deployed predictor per head and level; ``certified``: every
    certified threshold of every predictor (the calibration names no deployed predictor)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PromotionRule":
        return cls(**{f.name: d[f.name] for f in fields(cls)})

    def describe(self) -> str:
        """One line for reasons and reports."""
        return (f"{self.name}: family-wise delta {self.delta:g} over {self.checked} {self.scope} threshold(s), "
                f"each held-out check at {self.per_check_delta:.3g}")


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
    held_out_detects: bool | None = None
    """The held-out check had enough exits to catch a 2-point miss (`DETECT_MISS`) with 80 %
    power at the rule's per-check level; False: its "held" says little. None: not checked."""


DETECT_MISS = 0.02
"""The shortfall (in accuracy) a held-out check should be able to see: 2 points."""
DETECT_POWER = 0.8


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
    """Checked thresholds significantly below their level under `rule` (empty: promote)."""
    drift: list[DriftRow]
    held_out: list[HeldOutCheck]
    """Every held-out check, ``held`` judged at the rule's per-check level."""
    rule: PromotionRule | None = None
    """The family-wise rule of the decision; None in records written before it existed."""

    @property
    def checked(self) -> int:
        """Held-out checks the decision rests on (K)."""
        return self.rule.checked if self.rule is not None else len(self.held_out)

    def to_dict(self) -> dict:
        """The JSON form (drift.json)."""
        return {"calibration": self.calibration, "previous": self.previous, "promote": self.promote,
                "reason": self.reason, "rule": None if self.rule is None else self.rule.to_dict(),
                "failures": [r.to_dict() for r in self.failures], "drift": [asdict(r) for r in self.drift],
                "held_out": [r.to_dict() for r in self.held_out]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RecalibrationOutcome":
        names = {f.name for f in fields(DriftRow)}
        rule = d.get("rule")
        return cls(calibration=d["calibration"], previous=d.get("previous"), promote=bool(d["promote"]),
                   reason=d["reason"], failures=[HeldOutCheck.from_dict(r) for r in d["failures"]],
                   drift=[DriftRow(**{k: v for k, v in r.items() if k in names}) for r in d["drift"]],
                   held_out=[HeldOutCheck.from_dict(r) for r in d["held_out"]],
                   rule=None if rule is None else PromotionRule.from_dict(rule))


# ----------------------------------------------------------------------------- the family-wise rule


def deployed_thresholds(calibration: Any) -> set[tuple[str, int, float]] | None:
    """(predictor, head, level) a calibration deploys, when it names a deployed predictor per
    head and level (``deployed``); None when it does not (then every predictor is checked).

    Read tolerantly, since calibration.json gained the field later: `Calibration.deployed`
    (`Deployment` rows), its JSON form (``{"choices": [{"head", "level", "predictor"}, ...]}``),
    a bare list of such rows, or a mapping head -> level -> predictor name.
    """
    deployed = calibration.get("deployed") if isinstance(calibration, Mapping) else getattr(calibration, "deployed", None)
    if isinstance(deployed, Mapping) and "choices" in deployed:
        deployed = deployed["choices"]
    if not deployed:
        return None
    if isinstance(deployed, Mapping):
        rows = [(head, level, p) for head, by_level in deployed.items() for level, p in dict(by_level).items()]
    else:
        rows = [(r["head"], r["level"], r["predictor"]) if isinstance(r, Mapping) else (r.head, r.level, r.predictor)
                for r in deployed]
    return {(str(p), int(head), float(level)) for head, level, p in rows if p}


def judge_held_out(checks: Sequence[Any], delta: float,
                   deployed: set[tuple[str, int, float]] | None = None) -> tuple[PromotionRule, list[Any], list[Any]]:
    """The family-wise verdict on held-out checks: (rule, every check re-judged, failures).

    A check is in the family when its threshold is certified (not None) and, when `deployed`
    is given, its (predictor, head, level) is deployed. Each is judged at ``delta / K``
    (``held = p_below > delta / K``); failures are the family's checks that do not hold. Checks
    outside the family are re-judged at the same level for the table but decide nothing.
    Works on `HeldOutCheck` and plain `pipeline.thresholds.ThresholdCheck` rows alike.
    """
    if not (math.isfinite(delta) and 0.0 < delta < 1.0):
        raise CalibrationError(f"delta {delta!r} must lie in (0, 1); use the calibration's delta, e.g. 0.1")

    def in_family(r: Any) -> bool:
        if r.threshold is None:
            return False
        return deployed is None or (getattr(r, "predictor", None), getattr(r, "head", None), float(r.level)) in deployed

    family = [in_family(r) for r in checks]
    k = sum(family)
    per_check = delta / max(k, 1)
    rule = PromotionRule(name=RULE_NAME, delta=float(delta), checked=k, per_check_delta=per_check,
                         scope="certified" if deployed is None else "deployed")
    judged = [replace(r, held=bool(r.p_below > per_check)) for r in checks]
    failures = [r for r, f in zip(judged, family) if f and not r.held]
    return rule, judged, failures


def min_exits_to_detect(level: float, miss: float = 0.02, alpha: float = 0.05, power: float = 0.8,
                        max_exits: int = 200_000) -> int | None:
    """Fewest held-out exits with which a one-sided binomial test at `alpha` detects a threshold
    whose true accuracy is ``level - miss`` with probability >= `power` (from there on: the
    power of a discrete test saw-tooths in n). None: more than `max_exits` are needed.

    This is what a held-out check needs to mean something: with fewer exits a threshold that
    misses its level by `miss` passes more often than ``1 - power``.
    """
    from scipy.stats import binom, norm

    if not 0.0 < miss < level < 1.0:
        raise CalibrationError(f"miss {miss!r} must lie in (0, level={level!r}); use e.g. 0.02 for 2 points")
    bad = level - miss
    # the normal approximation's answer, tripled, bounds the search (ppf over 200k n costs a second)
    approx = ((norm.isf(alpha) * math.sqrt(level * (1 - level)) + norm.isf(1 - power) * math.sqrt(bad * (1 - bad)))
              / miss) ** 2 if power > 0.5 else 1.0
    upper = int(min(max_exits, 3 * approx + 200))
    while True:
        n = np.arange(1, upper + 1)  # [upper]
        crit = binom.ppf(alpha, n, level)  # smallest correct count with cdf >= alpha
        crit = np.where(binom.cdf(crit, n, level) > alpha, crit - 1, crit)  # largest count that still rejects
        detects = binom.cdf(crit, n, bad) >= power  # [upper]
        if detects[-1] or upper >= max_exits:
            break
        upper = min(2 * upper, max_exits)
    if not detects[-1]:
        return None
    last_miss = np.nonzero(~detects)[0]
    return int(last_miss[-1] + 2) if last_miss.size else 1


def too_few_exits(checks: Sequence[Any], rule: PromotionRule,
                  deployed: set[tuple[str, int, float]] | None = None) -> list[str]:
    """The family's checks (certified, deployed when `deployed` is given) whose held-out exits are
    too few to catch a 2-point miss with 80 % power at the rule's per-check level, each as
    "<predictor> head <h> level <l>: <n> exits of <need> needed". Empty: every "held" means it."""
    out, need = [], {}
    for r in checks:
        if r.threshold is None or r.level <= DETECT_MISS or (
                deployed is not None and (r.predictor, r.head, float(r.level)) not in deployed):
            continue
        level = float(r.level)
        if level not in need:
            need[level] = min_exits_to_detect(level, DETECT_MISS, rule.per_check_delta, DETECT_POWER)
        if need[level] is None or r.n_exited < need[level]:
            needed = "over 200,000" if need[level] is None else f"{need[level]:,}"
            out.append(f"{r.predictor} head {r.head} level {level:g}: {r.n_exited:,} exits of {needed} needed")
    return out


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


def _drift_rows(new: Calibration, old: Calibration | None, held_out: Sequence[HeldOutCheck],
                per_check: float) -> list[DriftRow]:
    """`drift_table` per predictor and head of the deployed (chosen) thresholds, joined with
    the new thresholds' held-out result (judged by the promotion rule)."""
    held = {(r.predictor, r.head, float(r.level)): r for r in held_out}
    need = {level: min_exits_to_detect(level, DETECT_MISS, per_check, DETECT_POWER)
            for level in {float(r.level) for r in held_out if r.threshold is not None and r.level > DETECT_MISS}}
    rows = []
    for predictor in new.predictors:
        after = new.chosen(predictor)
        before = old.chosen(predictor) if old is not None and predictor in old.predictors else {}
        for layer in sorted(set(after) | set(before)):
            for d in drift_table(before.get(layer, []), after.get(layer, [])):
                h = held.get((predictor, layer, float(d.level)))
                enough = need.get(float(d.level)) if h is not None and h.threshold is not None else None
                rows.append(DriftRow(
                    predictor=predictor, head=layer, **asdict(d),
                    held_out_accuracy=None if h is None else h.accuracy,
                    held_out_exit_rate=None if h is None else h.exit_rate,
                    held_out_met=None if h is None else h.met,
                    held_out_held=None if h is None else h.held,
                    held_out_detects=None if h is None or h.threshold is None else
                    (enough is not None and h.n_exited >= enough),
                ))
    return rows


def _reason(new_key: str, old_key: str | None, has_old: bool, failures: Sequence[HeldOutCheck],
            rule: PromotionRule) -> str:
    if has_old:
        kept = f"kept the current calibration {old_key[:12]}" if old_key else "kept the current calibration"
    else:
        kept = "no current calibration set"
    if failures:
        what = "; ".join(f"head {r.head} {r.predictor} level {r.level:g}: held-out accuracy {r.accuracy:.4f} < target "
                         f"{r.level:g} ({r.n_exited} of {r.n} tokens exit, p={r.p_below:.2g})" for r in failures)
        return f"{len(failures)} of {rule.checked} held-out check(s) failed ({what}) [{rule.describe()}]; {kept}"
    first = "" if has_old else " (the first current calibration)"
    return (f"all {rule.checked} checked thresholds held their targets on held-out tokens [{rule.describe()}]; "
            f"calibration {new_key[:12]} promoted{first}")


def compare_calibrations(new: Calibration, old: Calibration | None, *, new_key: str = "new",
                         old_key: str | None = None, delta: float | None = None) -> RecalibrationOutcome:
    """Drift of `new` against `old` (the calibration in service, None before the first one)
    and the decision: promote iff no checked threshold is significantly below its level under
    the family-wise rule (`judge_held_out`; `delta` defaults to the calibration's own).

    `new` must carry its held-out checks (`Calibration.with_held_out(check_held_out(...))`);
    the keys only name the calibrations in the outcome and its reason.
    """
    if new.held_out is None:
        raise CalibrationError(f"calibration {new_key[:12]} has no held-out check; calibrate with an eval split "
                               "(check_held_out on it) before comparing")
    rule, judged, failures = judge_held_out(new.held_out, new.delta if delta is None else delta,
                                            deployed_thresholds(new))
    return RecalibrationOutcome(
        calibration=new_key, previous=old_key if old is not None else None, promote=not failures,
        reason=_reason(new_key, old_key, old is not None, failures, rule), failures=failures,
        drift=_drift_rows(new, old, judged, rule.per_check_delta), held_out=judged, rule=rule,
    )
