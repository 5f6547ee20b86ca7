"""Calibration on synthetic heads: entropy ~ U(0, 5), P(correct) = sigmoid(a - 1.5 * entropy).

`a` sets how good a head's most confident tokens are (a=5: 99 % at entropy 0; a=3: 95 %).
The population accuracy among exited tokens has a closed form, so the guarantee tests can
compare against the truth as well as against a large fresh test set.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import numpy as np
import pytest

from pipeline.calibrate import Calibration, HeldOutCheck, calibrate_exits, check_held_out
from pipeline.cascade import CascadeResult, accuracy_curve, calibrate_cascade, evaluate_cascade
from pipeline.config import CalibrateConfig
from pipeline.recalibrate import drift_table
from pipeline.scoring import ExitLabels
from pipeline.thresholds import (
    CalibrationError,
    LevelResult,
    calibrate_head,
    check_enough_tokens,
    empirical_thresholds,
    evaluate_thresholds,
    exit_mask,
    ltt_thresholds,
    min_calibration_tokens,
    to_confidence,
)

LEVELS = [0.75, 0.85, 0.90, 0.95, 0.99]
B = 1.5  # slope of the accuracy curve in entropy
E_MAX = 5.0


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def make_head(rng, n, a=5.0, shape=()):
    """Entropies and correct flags of a synthetic head; `shape` prepends batch dims."""
    e = rng.uniform(0.0, E_MAX, size=(*shape, n))
    correct = rng.random(e.shape) < _sigmoid(a - B * e)
    return e, correct


def population_accuracy(t, a=5.0):
    """Exact P(correct | entropy <= t) for entropy ~ U(0, 5): mean of the sigmoid over [0, t]."""
    t = np.clip(np.asarray(t, dtype=np.float64), 1e-12, E_MAX)
    return (np.logaddexp(0.0, a) - np.logaddexp(0.0, a - B * t)) / (B * t)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# --------------------------------------------------------------------------------------
# empirical fit


def test_empirical_meets_levels_on_fit_data_and_is_monotone(rng):
    e, c = make_head(rng, 5000, a=3.0)
    res = empirical_thresholds(e, c, LEVELS)
    assert [r.level for r in res] == LEVELS
    for r in res:
        assert r.method == "empirical" and r.delta is None and r.n == 5000
        if r.threshold is None:
            continue
        m = exit_mask(e, r.threshold)
        assert m.sum() == r.n_exited
        assert c[m].mean() >= r.level
        assert r.accuracy == pytest.approx(c[m].mean())
        # loosest: one more token (the next most confident) breaks the level
        nxt = np.sort(e[~m])[:1]
        if nxt.size:
            assert c[e <= nxt[0]].mean() < r.level
    rates = [r.exit_rate for r in res]
    assert rates == sorted(rates, reverse=True), "looser levels must exit more tokens"
    fitted = [r.threshold for r in res if r.threshold is not None]
    assert fitted == sorted(fitted, reverse=True), "entropy thresholds must tighten as the level rises"
    assert res[0].exit_rate > res[-2].exit_rate > 0


def test_empirical_handles_ties(rng):
    # gate-like scores saturating at a few values: the reported exits must match the rule
    p = np.round(rng.uniform(0, 1, 3000), 1)
    c = rng.random(3000) < p
    for r in empirical_thresholds(p, c, [0.7, 0.9], higher_is_confident=True):
        assert r.n_exited == exit_mask(p, r.threshold, True).sum()
        assert r.accuracy >= r.level


# --------------------------------------------------------------------------------------
# LTT


def test_ltt_is_stricter_than_empirical_and_reports_all_tokens(rng):
    e, c = make_head(rng, 5000)
    emp = empirical_thresholds(e, c, LEVELS)
    ltt = ltt_thresholds(e, c, LEVELS, delta=0.1)
    for r_e, r_l in zip(emp, ltt):
        assert r_l.method == "ltt" and r_l.delta == 0.1 and r_l.n == 5000
        assert r_l.exit_rate <= r_e.exit_rate
        if r_l.threshold is not None:
            m = exit_mask(e, r_l.threshold)
            assert m.sum() == r_l.n_exited
            assert r_l.accuracy == pytest.approx(c[m].mean())
            assert r_l.accuracy >= r_l.level
    assert ltt[0].exit_rate > ltt[2].exit_rate > 0


def test_ltt_returns_none_when_nothing_can_be_certified(rng):
    e, c = make_head(rng, 3000, a=1.0)  # best tokens are ~73 % right
    (r,) = ltt_thresholds(e, c, [0.95], delta=0.1)
    assert r.threshold is None and r.exit_rate == 0.0 and r.accuracy is None and r.n_exited == 0
    (ev,) = evaluate_thresholds(e, c, [r])
    assert ev.n_exited == 0 and ev.met


def test_ltt_guarantee_holds_over_many_splits():
    """P(accuracy of exited tokens on new data < level) <= delta, checked over 1000 calib draws.

    Each trial: 2000 calibration tokens, a fresh 20000-token test set from the same
    distribution, plus the exact population accuracy at the fitted threshold.
    """
    level, delta, trials, n_cal, n_test = 0.9, 0.1, 1000, 2000, 20_000
    rng = np.random.default_rng(7)
    t0 = time.perf_counter()
    e_cal, c_cal = make_head(rng, n_cal, shape=(trials,))  # [trials, n_cal]
    t_ltt = np.full(trials, -np.inf)  # -inf: nothing exits
    t_emp = np.full(trials, -np.inf)
    for i in range(trials):
        (r_l,) = ltt_thresholds(e_cal[i], c_cal[i], [level], delta, seed=i)
        (r_e,) = empirical_thresholds(e_cal[i], c_cal[i], [level])
        t_ltt[i] = -np.inf if r_l.threshold is None else r_l.threshold
        t_emp[i] = -np.inf if r_e.threshold is None else r_e.threshold

    ltt_test, emp_test = np.zeros(trials, bool), np.zeros(trials, bool)
    for lo in range(0, trials, 100):  # a fresh test set per trial, 100 trials at a time
        e_test, c_test = make_head(rng, n_test, shape=(min(100, trials - lo),))  # [block, n_test]
        for t, out in ((t_ltt, ltt_test), (t_emp, emp_test)):
            m = e_test <= t[lo : lo + 100, None]  # [block, n_test]
            k = m.sum(1)
            out[lo : lo + 100] = (k > 0) & ((m & c_test).sum(1) < level * k)

    def in_population(t):  # the quantity the guarantee is about: exact accuracy at t
        return np.isfinite(t) & (population_accuracy(np.where(np.isfinite(t), t, 1.0)) < level)

    ltt_pop, emp_pop = in_population(t_ltt), in_population(t_emp)
    elapsed = time.perf_counter() - t0
    bound = delta + 3 * math.sqrt(delta * (1 - delta) / trials)
    print(
        f"\nguarantee ({trials} splits, {elapsed:.2f}s): violation rate on test sets LTT {ltt_test.mean():.3f} "
        f"/ empirical {emp_test.mean():.3f}; in population LTT {ltt_pop.mean():.3f} / empirical "
        f"{emp_pop.mean():.3f}; bound {bound:.3f}; LTT certified {np.isfinite(t_ltt).mean():.2f} of splits, "
        f"mean exit rate LTT {np.clip(t_ltt, 0, E_MAX).mean() / E_MAX:.3f} vs empirical {np.clip(t_emp, 0, E_MAX).mean() / E_MAX:.3f}"
    )
    assert ltt_pop.mean() <= bound and ltt_test.mean() <= bound
    assert emp_test.mean() > max(delta, ltt_test.mean()) + 0.1
    assert emp_pop.mean() > max(delta, ltt_pop.mean()) + 0.1
    # and LTT is not vacuous: it certifies a threshold in nearly every split
    assert np.isfinite(t_ltt).mean() > 0.9


# --------------------------------------------------------------------------------------
# how much data is needed


def test_min_calibration_tokens_math():
    assert min_calibration_tokens(0.99, 0.1) == 230  # log(0.1)/log(0.99) = 229.1
    assert min_calibration_tokens(0.9, 0.1) == 22
    for level, delta in [(0.75, 0.05), (0.95, 0.1), (0.999, 0.01), (0.5, 0.25)]:
        n = min_calibration_tokens(level, delta)
        assert level**n <= delta < level ** (n - 1)
    assert min_calibration_tokens(0.5, 0.25) == 2  # exact power: 0.5**2 == 0.25


def test_check_enough_tokens_names_the_number():
    check_enough_tokens(230, [0.9, 0.99], 0.1)
    with pytest.raises(CalibrationError, match="230") as err:
        check_enough_tokens(229, [0.9, 0.99], 0.1)
    msg = str(err.value)
    assert "229" in msg and "delta" in msg and "drop level 0.99" in msg
    # with a learn split the held-out part must still hold 230 tokens
    check_enough_tokens(288, [0.99], 0.1, learn_fraction=0.2)
    with pytest.raises(CalibrationError, match="288"):
        check_enough_tokens(287, [0.99], 0.1, learn_fraction=0.2)


def test_calibrate_head_refuses_too_little_data(rng):
    e, c = make_head(rng, 200)
    with pytest.raises(CalibrationError, match="too few"):
        calibrate_head(e, c, [0.9, 0.99], 0.1, "ltt")
    # the empirical fit needs no such check
    assert len(calibrate_head(e, c, [0.9, 0.99], 0.1, "empirical")) == 2


# --------------------------------------------------------------------------------------
# bad inputs


@pytest.mark.parametrize("bad", [1.2, 0.0, 1.0, -0.1, float("nan")])
def test_levels_outside_unit_interval_are_rejected(rng, bad):
    e, c = make_head(rng, 500)
    for call in (
        lambda: empirical_thresholds(e, c, [0.9, bad]),
        lambda: ltt_thresholds(e, c, [0.9, bad], 0.1),
        lambda: calibrate_cascade({3: e}, {3: c}, 8, [bad], 0.1, "empirical"),
        lambda: min_calibration_tokens(bad, 0.1),
    ):
        with pytest.raises(CalibrationError, match=str(bad)):
            call()


def test_other_bad_inputs_name_the_value(rng):
    e, c = make_head(rng, 500)
    with pytest.raises(CalibrationError, match="delta 1.5"):
        ltt_thresholds(e, c, [0.9], 1.5)
    with pytest.raises(CalibrationError, match="'conformal'"):
        calibrate_head(e, c, [0.9], 0.1, "conformal")
    e_nan = e.copy()
    e_nan[[3, 9]] = np.nan
    with pytest.raises(CalibrationError, match="2 non-finite values \\(first at index 3\\)"):
        empirical_thresholds(e_nan, c, [0.9])
    with pytest.raises(CalibrationError, match="shape"):
        empirical_thresholds(e, c[:-1], [0.9])
    with pytest.raises(CalibrationError, match="below final_layer=8"):
        calibrate_cascade({3: e, 8: e}, {3: c, 8: c}, 8, [0.9], 0.1, "empirical")
    with pytest.raises(CalibrationError, match="same head layers"):
        calibrate_cascade({3: e}, {4: c}, 8, [0.9], 0.1, "empirical")


# --------------------------------------------------------------------------------------
# accuracy curve


def test_accuracy_curve_is_monotone_in_confidence(rng):
    e, c = make_head(rng, 4000, a=3.0)
    curve = accuracy_curve(e, c)
    grid = np.linspace(0, 5, 50)
    pred = curve.predict(grid)
    assert np.all(np.diff(pred) <= 1e-12) and pred[0] > 0.85 and pred[-1] < 0.1
    gate = _sigmoid(2.0 - e)  # a gate: higher exit probability = more confident
    pred_g = accuracy_curve(gate, c, higher_is_confident=True).predict(np.linspace(0, 1, 50))
    assert np.all(np.diff(pred_g) >= -1e-12)


# --------------------------------------------------------------------------------------
# gates vs entropies


@pytest.mark.parametrize("method", ["ltt", "empirical"])
def test_gate_direction_equals_negated_scores(rng, method):
    e, c = make_head(rng, 3000)
    low = calibrate_head(e, c, LEVELS[:4], 0.1, method)
    high = calibrate_head(-e, c, LEVELS[:4], 0.1, method, higher_is_confident=True)
    for a, b in zip(low, high):
        assert b.higher_is_confident and not a.higher_is_confident
        assert (a.threshold is None) == (b.threshold is None)
        if a.threshold is not None:
            assert b.threshold == pytest.approx(-a.threshold)
        assert (a.exit_rate, a.accuracy, a.n_exited) == (b.exit_rate, b.accuracy, b.n_exited)
    ev_low = evaluate_thresholds(e, c, low)
    ev_high = evaluate_thresholds(-e, c, high, higher_is_confident=True)
    assert [d.n_exited for d in ev_low] == [d.n_exited for d in ev_high]
    with pytest.raises(CalibrationError, match="higher_is_confident"):
        evaluate_thresholds(-e, c, high)  # forgot the flag


def test_cascade_gate_direction_equals_negated_scores(rng):
    scores, correct = _three_heads(rng, 6000)
    low = calibrate_cascade(scores, correct, 16, [0.9], 0.1, "ltt")[0]
    neg = {h: -s for h, s in scores.items()}
    high = calibrate_cascade(neg, correct, 16, [0.9], 0.1, "ltt", higher_is_confident=True)[0]
    assert high.exit_rates == low.exit_rates and high.accuracy == low.accuracy
    for h in scores:
        assert high.thresholds[h] == pytest.approx(-low.thresholds[h])


def test_to_confidence_convention():
    s = np.array([0.5, 2.0])
    assert np.array_equal(to_confidence(s, False), -s)
    assert np.array_equal(to_confidence(s, True), s)


# --------------------------------------------------------------------------------------
# cascade


def _three_heads(rng, n, shift=0.0):
    """Heads at layers 4, 8, 12 of a 16-layer model; later heads are more accurate."""
    scores, correct = {}, {}
    for layer, a in [(4, 2.0), (8, 4.0), (12, 6.0)]:
        scores[layer], correct[layer] = make_head(rng, n, a=a - shift)
    return scores, correct


@pytest.mark.parametrize("method", ["ltt", "empirical"])
def test_cascade_meets_overall_target_and_exits_earlier_when_looser(rng, method):
    scores, correct = _three_heads(rng, 20_000)
    res = calibrate_cascade(scores, correct, 16, LEVELS, 0.1, method)
    assert [r.level for r in res] == LEVELS
    for r in res:
        assert r.method == method and r.n == 20_000 and r.final_layer == 16
        assert set(r.exit_rates) == {4, 8, 12, 16}
        assert sum(r.exit_rates.values()) == pytest.approx(1.0)
        assert r.accuracy >= r.level
        assert r.avg_exit_layer == pytest.approx(sum(k * v for k, v in r.exit_rates.items()))
        # recompute by hand: first head whose entropy is under its threshold
        remaining = np.ones(20_000, bool)
        wrong = 0
        for h in (4, 8, 12):
            leave = remaining & exit_mask(scores[h], r.thresholds[h])
            assert leave.mean() == pytest.approx(r.exit_rates[h])
            wrong += (leave & ~correct[h]).sum()
            remaining &= ~leave
        assert 1 - wrong / 20_000 == pytest.approx(r.accuracy)
        json.dumps(r.to_dict())
    depths = [r.avg_exit_layer for r in res]
    assert depths == sorted(depths) and depths[0] < depths[-1] - 3, "looser targets must exit earlier"
    assert res[0].avg_exit_layer < 16 and res[0].exit_rates[4] > 0.1


def test_cascade_ltt_guarantee_over_splits():
    """Overall accuracy on new data stays >= level in all but ~delta of the calibration draws."""
    level, delta, trials = 0.9, 0.1, 150
    rng = np.random.default_rng(11)
    viol = {"ltt": 0, "empirical": 0}
    for i in range(trials):
        cal = _three_heads(rng, 4000)
        new = _three_heads(rng, 20_000)
        for method in viol:
            res = calibrate_cascade(*cal, 16, [level], delta, method, seed=i)
            viol[method] += not evaluate_cascade(*new, res)[0].met
    rate = {k: v / trials for k, v in viol.items()}
    print(f"\ncascade violation rate over {trials} splits: {rate}")
    assert rate["ltt"] <= delta + 3 * math.sqrt(delta * (1 - delta) / trials)
    assert rate["empirical"] > rate["ltt"]


# --------------------------------------------------------------------------------------
# drift and evaluation on new data


def test_shifted_distribution_shows_drift_and_violations(rng):
    e_old, c_old = make_head(rng, 8000, a=5.0)
    e_new, c_new = make_head(rng, 8000, a=3.5)  # the head got worse at the same entropy
    old = calibrate_head(e_old, c_old, LEVELS[:4], 0.1, "ltt")

    same = evaluate_thresholds(*make_head(rng, 50_000, a=5.0), old)
    assert all(d.met for d in same)
    shifted = evaluate_thresholds(e_new, c_new, old)
    assert [d.level for d in shifted] == LEVELS[:4]
    assert not any(d.met for d in shifted)
    for d, r in zip(shifted, old):
        assert d.accuracy < d.calib_accuracy == r.accuracy

    new = calibrate_head(e_new, c_new, LEVELS[:4], 0.1, "ltt")
    rows = drift_table(old, new)
    assert [row.level for row in rows] == LEVELS[:4]
    for row in rows:
        assert row.exit_rate_change < 0
        if row.new_threshold is None:  # the worse head can no longer certify this level
            assert row.shift is None and row.new_exit_rate == 0.0
            continue
        assert row.shift < 0, "entropy thresholds must tighten on the worse head"
        assert row.shift == pytest.approx(row.new_threshold - row.old_threshold)
    assert rows[0].new_threshold is not None and rows[-1].new_threshold is None
    # dict forms (as stored in JSON) give the same table
    as_json = json.loads(json.dumps([r.to_dict() for r in old]))
    assert drift_table(as_json, {r.level: r for r in new}) == rows
    assert LevelResult(**as_json[0]) == old[0]


def test_drift_table_marks_missing_and_none(rng):
    e, c = make_head(rng, 3000)
    old = empirical_thresholds(e, c, [0.9, 0.99])
    new = [LevelResult(0.9, None, 0.0, None, "ltt", 0.1, 3000, 0)]
    rows = drift_table(old, new)
    assert rows[0].shift is None and rows[0].exit_rate_change == -old[0].exit_rate
    assert rows[1].level == 0.99 and rows[1].new_threshold is None


def test_module_imports_no_orchestration():
    code = ("import sys, pipeline.thresholds, pipeline.cascade, pipeline.calibrate, pipeline.recalibrate, "
            "reports.recalibration; assert not {'prefect', 'zarr'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_held_verdict_tolerates_sampling_noise_but_not_a_real_miss():
    """`met` is a point estimate; `held` fails only on a significant shortfall."""
    r = [LevelResult(level=0.9, threshold=1.0, exit_rate=1.0, accuracy=0.91, method="ltt", delta=0.1, n=10, n_exited=10)]
    scores = np.zeros(1000)
    just_below = np.arange(1000) < 895  # 0.895: sampling noise around 0.9
    far_below = np.arange(1000) < 850
    near = evaluate_thresholds(scores, just_below, r)[0]
    far = evaluate_thresholds(scores, far_below, r)[0]
    assert near.met is False and near.held is True
    assert far.met is False and far.held is False and far.p_below < 1e-4


# --------------------------------------------------------------------------------------
# the stage: every head and predictor, typed


def make_labels(rng, n, heads=((4, 5.0), (8, 6.0)), shift=0.0):
    """ExitLabels of synthetic heads (entropy and correct flags), plus gate probabilities that
    are a monotone function of the entropy (so gate and entropy thresholds exit the same tokens)."""
    correct, entropy = {}, {}
    for layer, a in heads:
        entropy[layer], correct[layer] = make_head(rng, n, a=a - shift)
    has_target = np.ones(n, bool)
    has_target[::50] = False
    labels = ExitLabels(row=np.arange(n), has_target=has_target, correct=correct,
                        correct_true={k: v & has_target for k, v in correct.items()}, entropy=entropy)
    return labels, {layer: _sigmoid(3.0 - 2.0 * e) for layer, e in entropy.items()}


CAL_CFG = CalibrateConfig(levels=[0.8, 0.9], delta=0.1)


def test_calibrate_exits_returns_a_typed_calibration_that_round_trips(rng):
    labels, probs = make_labels(rng, 6000)
    cal = calibrate_exits(labels, probs, [4, 8], 16, CAL_CFG)
    assert isinstance(cal, Calibration) and cal.n == 6000 and cal.layers == [4, 8] and cal.final_layer == 16
    assert cal.predictors == ["entropy", "gate"] and cal.method == "ltt" and cal.held_out is None
    for layer in (4, 8):
        head = cal.heads[layer]
        assert head.agreement == pytest.approx(labels.correct[layer].mean()) and head.n == 6000
        for predictor, hic in (("entropy", False), ("gate", True)):
            for method in ("ltt", "empirical"):
                results = head.results[predictor][method]
                assert [r.level for r in results] == [0.8, 0.9]
                assert all(r.method == method and r.higher_is_confident is hic for r in results)
        # the same math as calling calibrate_head directly
        assert head.results["entropy"]["ltt"] == calibrate_head(labels.entropy[layer], labels.correct[layer],
                                                                [0.8, 0.9], 0.1, "ltt")
    assert cal.chosen("gate")[8] == cal.heads[8].results["gate"]["ltt"]
    assert all(isinstance(r, CascadeResult) and r.final_layer == 16 for r in cal.chosen_cascade("entropy"))

    as_json = json.loads(json.dumps(cal.to_dict()))
    assert set(as_json) == {"levels", "delta", "method", "reference", "n", "layers", "final_layer", "heads", "cascade"}
    assert set(as_json["heads"]["4"]) == {"agreement", "n", "entropy", "gate"}
    assert set(as_json["cascade"]["gate"]) == {"ltt", "empirical"}
    assert Calibration.from_dict(as_json) == cal

    held = check_held_out(cal, *make_labels(rng, 4000))
    assert {(r.predictor, r.head) for r in held} == {(p, h) for p in ("entropy", "gate") for h in (4, 8)}
    assert all(isinstance(r, HeldOutCheck) and r.n == 4000 for r in held)
    checked = cal.with_held_out(held)
    row = json.loads(json.dumps(checked.to_dict()))["held_out"][0]
    assert list(row)[:3] == ["predictor", "head", "level"]
    assert Calibration.from_dict(json.loads(json.dumps(checked.to_dict()))) == checked


def test_calibrate_exits_reference_and_max_tokens(rng):
    labels, _ = make_labels(rng, 6000)
    cal = calibrate_exits(labels, None, [4, 8], 16, CAL_CFG.model_copy(update={"reference": "true", "max_tokens": 5000}))
    assert cal.n == 5000 and cal.reference == "true" and cal.predictors == ["entropy"]
    keep = np.flatnonzero(labels.has_target)[:5000]
    assert cal.heads[4].agreement == pytest.approx(labels.correct_true[4][keep].mean())
    with pytest.raises(CalibrationError, match="'gate' was not calibrated"):
        cal.chosen("gate")
    entropy_only = check_held_out(cal, *make_labels(rng, 3000))  # gate scores given but not calibrated: ignored
    assert {r.predictor for r in entropy_only} == {"entropy"}
    assert all(r.n == 3000 - 60 for r in entropy_only)  # reference "true": tokens with a next token only


def test_calibrate_exits_names_bad_inputs(rng):
    labels, probs = make_labels(rng, 3000)
    with pytest.raises(CalibrationError, match="no labels for heads \\[5\\]"):
        calibrate_exits(labels, probs, [4, 5], 16, CAL_CFG)
    with pytest.raises(CalibrationError, match="no gate scores for heads \\[8\\]"):
        calibrate_exits(labels, {4: probs[4]}, [4, 8], 16, CAL_CFG)
    with pytest.raises(CalibrationError, match="shapes"):
        calibrate_exits(labels, {4: probs[4][:10], 8: probs[8]}, [4, 8], 16, CAL_CFG)
    with pytest.raises(CalibrationError, match="too few"):
        calibrate_exits(make_labels(rng, 100)[0], None, [4, 8], 16, CAL_CFG.model_copy(update={"levels": [0.99]}))
    cal = calibrate_exits(labels, probs, [4, 8], 16, CAL_CFG)
    with pytest.raises(CalibrationError, match="no gate scores were given"):
        check_held_out(cal, labels, None)
    with pytest.raises(CalibrationError, match="not a calibration"):
        Calibration.from_dict({"levels": [0.9]})


def test_held_out_rows_written_with_layer_are_read():
    row = {"layer": 4, "predictor": "entropy", "level": 0.9, "threshold": 1.0, "n": 10, "n_exited": 5,
           "exit_rate": 0.5, "accuracy": 1.0, "met": True, "p_below": 1.0, "held": True, "calib_exit_rate": 0.5,
           "calib_accuracy": 0.95}
    check = HeldOutCheck.from_dict(row)
    assert check.head == 4 and check.predictor == "entropy" and check.to_dict()["head"] == 4
