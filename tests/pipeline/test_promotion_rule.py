"""The promotion rule's error rates, by simulation: over many random calib/eval splits of one
distribution a correct recalibration is promoted in >= 1 - delta of them, and one whose eval
data really misses its levels (shifted) is rejected in most. The per-check rule it replaces
(every check at 0.05) fails the first criterion: that was the bug.

Synthetic heads with a known agreement curve: entropy e ~ U(0, 5) and P(correct | e) =
sigmoid(a - b e), so the true accuracy of the tokens exiting at entropy <= t has a closed form
(`true_accuracy`). Two kinds of correct recalibration: thresholds fitted by Learn-then-Test on a
calib draw (what the pipeline does; LTT keeps a margin above each level), and the least
favourable correct one, each threshold exactly at its level (solved from the closed form), where
every check raises a false alarm at its full per-check rate.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from pipeline.recalibrate import judge_held_out, min_exits_to_detect
from pipeline.thresholds import LevelResult, evaluate_thresholds, ltt_thresholds

DELTA = 0.1
LEVELS = [0.75, 0.85, 0.9, 0.95, 0.99]
HEADS = {6: (4.0, 1.6), 12: (5.0, 1.6), 18: (6.0, 1.8), 24: (7.0, 2.0)}
"""head -> (a, b) of its agreement curve sigmoid(a - b * entropy)."""
SPLITS = 200
"""Splits of the least favourable recalibration (cheap: no fitting)."""
FITTED_SPLITS = 100
"""Splits with Learn-then-Test fitting (about 20 ms each)."""
N_CALIB, N_EVAL = 3_000, 3_000
SHIFT = 0.05
"""Shifted eval data: each right token turns wrong with this probability, so the accuracy at
every threshold drops by 5 % of itself (>= 2 points at each level a tight threshold sits at)."""


def true_accuracy(t: float, a: float, b: float, keep: float = 1.0) -> float:
    """Accuracy of the tokens with entropy <= t: the mean of keep * sigmoid(a - b e) over U(0, t)."""
    return keep * (np.logaddexp(0, a) - np.logaddexp(0, a - b * t)) / (b * t)


def draw(rng: np.random.Generator, n: int, a: float, b: float, keep: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    entropy = rng.uniform(0, 5, n)  # [n]
    correct = rng.random(n) < keep / (1 + np.exp(b * entropy - a))  # [n]
    return entropy, correct


def at_level(a: float, b: float, level: float) -> float | None:
    """The entropy threshold whose exited tokens are exactly `level` right (None: unreachable)."""
    lo, hi = 1e-9, 5.0
    if true_accuracy(lo, a, b) < level:
        return None
    for _ in range(60):  # true_accuracy falls with t: bisect
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if true_accuracy(mid, a, b) >= level else (lo, mid)
    return lo


EXACT = {layer: [LevelResult(lv, at_level(a, b, lv), 0.0, None, "oracle", None, 0, 0) for lv in LEVELS]
         for layer, (a, b) in HEADS.items()}
"""The least favourable correct recalibration: every threshold's true accuracy is its level."""


def one_split(rng: np.random.Generator, keep: float = 1.0, exact: bool = False) -> dict:
    """Calibrate every head on a fresh calib draw (or take the `EXACT` thresholds), check on a
    fresh eval draw (right tokens kept with probability `keep`); the decisions of the
    family-wise and of the old per-check rule, and how far the worst threshold truly misses."""
    checks, misses = [], []
    for layer, (a, b) in HEADS.items():
        results = EXACT[layer] if exact else ltt_thresholds(*draw(rng, N_CALIB, a, b), LEVELS, DELTA,
                                                            seed=int(rng.integers(1 << 30)))
        checks += evaluate_thresholds(*draw(rng, N_EVAL, a, b, keep), results)
        misses += [r.level - true_accuracy(r.threshold, a, b, keep) for r in results if r.threshold is not None]
    rule, _, failures = judge_held_out(checks, DELTA)
    return {"new": not failures, "old": all(r.p_below > 0.05 for r in checks), "k": rule.checked,
            "worst_miss": max(misses)}


def floor(splits: int) -> float:
    """A promotion count this low has probability <= 0.001 if the true rate is exactly 1 - delta."""
    return binom.ppf(0.001, splits, 1 - DELTA)


@pytest.fixture(scope="module")
def fitted() -> list[dict]:
    rng = np.random.default_rng(0)
    return [one_split(rng) for _ in range(FITTED_SPLITS)]


@pytest.fixture(scope="module")
def exact() -> list[dict]:
    rng = np.random.default_rng(1)
    return [one_split(rng, exact=True) for _ in range(SPLITS)]


def test_a_correct_recalibration_is_promoted_in_at_least_1_minus_delta_of_splits(fitted, exact):
    for splits in (fitted, exact):
        assert np.median([s["k"] for s in splits]) >= 15  # a large family: the old rule's weak spot
        promoted = sum(s["new"] for s in splits)
        assert promoted >= floor(len(splits)), f"promoted {promoted} of {len(splits)}"
    assert all(s["worst_miss"] <= 1e-9 for s in exact)  # correct: no threshold below its level


def test_the_old_per_check_rule_rejects_correct_recalibrations_too_often(fitted, exact):
    """The bug: each check at 0.05 and all must hold, so about 1 - 0.95^K of correct
    recalibrations whose thresholds sit at their levels are rejected. LTT's own margin above the
    level hides part of it (fitted), not all of it."""
    old_exact = sum(s["old"] for s in exact)
    assert old_exact < floor(SPLITS), f"the old rule promoted {old_exact} of {SPLITS}"
    assert sum(s["old"] for s in fitted) <= sum(s["new"] for s in fitted)


def test_a_recalibration_that_misses_its_levels_is_rejected_in_most_splits():
    rng = np.random.default_rng(2)
    shifted = [one_split(rng, keep=1 - SHIFT) for _ in range(40)]
    assert all(s["worst_miss"] >= 0.02 for s in shifted)  # it really misses by >= 2 points
    rejected = sum(not s["new"] for s in shifted)
    assert rejected >= 0.8 * len(shifted), f"rejected {rejected} of {len(shifted)}"


def test_exits_needed_to_detect_a_two_point_miss():
    """What a held-out check needs: the exact binomial power, checked against a simulation."""
    n = min_exits_to_detect(0.9, miss=0.02, alpha=0.005, power=0.8)
    assert 2500 < n < 3500  # the normal approximation says ~2900
    assert min_exits_to_detect(0.99, 0.02, 0.005) < min_exits_to_detect(0.75, 0.02, 0.005)  # strict levels need fewer
    rng = np.random.default_rng(2)
    for exits, at_least in ((n, 0.77), (n // 3, 0.0)):
        correct = rng.binomial(exits, 0.88, size=4000)
        power = np.mean(binom.cdf(correct, exits, 0.9) <= 0.005)
        assert power >= at_least and (exits == n or power < 0.6)
    assert min_exits_to_detect(0.75, 0.02, 1e-6, max_exits=1000) is None


def test_checks_with_too_few_exits_to_mean_anything_are_named():
    from pipeline.calibrate import HeldOutCheck

    def check(predictor, head, level, exits, threshold=1.0):
        return HeldOutCheck(level=level, threshold=threshold, n=100_000, n_exited=exits, exit_rate=exits / 100_000,
                            accuracy=level + 0.01, met=True, p_below=0.9, held=True, calib_exit_rate=None,
                            calib_accuracy=None, predictor=predictor, head=head)

    rows = [check("entropy", 24, 0.9, 5_000), check("entropy", 6, 0.9, 400), check("gate", 6, 0.9, 400),
            check("entropy", 12, 0.99, 0, threshold=None)]
    rule, judged, _ = judge_held_out(rows, 0.1, {("entropy", 24, 0.9), ("entropy", 6, 0.9)})
    need = min_exits_to_detect(0.9, 0.02, rule.per_check_delta, 0.8)
    assert rule.checked == 2 and 400 < need < 5_000
    from pipeline.recalibrate import too_few_exits

    # the gate row is not deployed and the 0.99 row is not certified: neither is in the family
    assert too_few_exits(judged, rule, {("entropy", 24, 0.9), ("entropy", 6, 0.9)}) == [
        f"entropy head 6 level 0.9: 400 exits of {need:,} needed"]
    assert len(too_few_exits(judged, rule)) == 2  # without a deployment every certified threshold counts
