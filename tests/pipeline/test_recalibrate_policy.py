"""The recalibration policy: drift of the deployed thresholds per predictor, head and level, and
promotion only when no checked threshold is significantly below its level under the
family-wise (Bonferroni) rule. The rule's error rates are simulated in test_promotion_rule.py."""

from __future__ import annotations

import json
from dataclasses import fields, replace
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.calibrate import Calibration, HeldOutCheck, calibrate_exits, check_held_out
from pipeline.config import CalibrateConfig
from pipeline.recalibrate import (DriftRow, RecalibrationOutcome, compare_calibrations, deployed_thresholds,
                                  min_exits_to_detect)
from pipeline.scoring import ExitLabels
from pipeline.thresholds import CalibrationError

CFG = CalibrateConfig(levels=[0.8, 0.9], delta=0.1)


def make_labels(seed: int, n: int, a: float = 5.0, gates: bool = True):
    """Two synthetic heads at layers 4 and 8 (entropy ~ U(0, 5), P(correct) = sigmoid(a - 1.5 e))
    and gate probabilities that decrease with the entropy."""
    rng = np.random.default_rng(seed)
    entropy = {layer: rng.uniform(0, 5, n) for layer in (4, 8)}
    correct = {layer: rng.random(n) < 1 / (1 + np.exp(-(a + k - 1.5 * e))) for k, (layer, e) in enumerate(entropy.items())}
    labels = ExitLabels(row=np.arange(n), has_target=np.ones(n, bool), correct=correct, correct_true=correct,
                        entropy=entropy)
    return labels, ({layer: 1 / (1 + np.exp(2 * e - 3)) for layer, e in entropy.items()} if gates else None)


def calibrated(seed: int, a: float = 5.0, held_a: float | None = None, gates: bool = True) -> Calibration:
    """A calibration on data of quality `a`, checked on held-out data of quality `held_a`."""
    cal = calibrate_exits(*make_labels(seed, 6000, a, gates), [4, 8], 16, CFG)
    return cal.with_held_out(check_held_out(cal, *make_labels(seed + 100, 20_000, a if held_a is None else held_a, gates)))


def test_first_calibration_is_promoted_when_every_check_holds():
    new = calibrated(1)
    out = compare_calibrations(new, None, new_key="n" * 64)
    assert out.promote and out.failures == [] and out.previous is None
    assert "promoted (the first current calibration)" in out.reason and "nnnnnnnnnnnn promoted" in out.reason
    assert len(out.held_out) == 2 * 2 * 2  # predictor x head x level
    certified = sum(r.threshold is not None for r in out.held_out)
    assert out.rule.checked == out.checked == certified and out.rule.scope == "certified"
    assert out.rule.per_check_delta == pytest.approx(CFG.delta / certified)
    assert f"bonferroni: family-wise delta 0.1 over {certified} certified" in out.reason
    assert {(r.predictor, r.head, r.level) for r in out.drift} == {(p, h, lv) for p in ("entropy", "gate")
                                                                   for h in (4, 8) for lv in (0.8, 0.9)}
    assert all(r.old_threshold is None and r.shift is None and r.held_out_held is True for r in out.drift)


def test_drift_against_the_previous_calibration():
    old, new = calibrated(1), calibrated(2)
    out = compare_calibrations(new, old, new_key="b" * 64, old_key="a" * 64)
    assert out.promote and out.previous == "a" * 64
    for r in out.drift:
        before = old.chosen(r.predictor)[r.head]
        after = new.chosen(r.predictor)[r.head]
        lv = [x.level for x in after].index(r.level)
        assert (r.old_threshold, r.new_threshold) == (before[lv].threshold, after[lv].threshold)
        assert r.shift == pytest.approx(after[lv].threshold - before[lv].threshold)
        held = next(h for h in new.held_out if (h.predictor, h.head, h.level) == (r.predictor, r.head, r.level))
        assert (r.held_out_accuracy, r.held_out_exit_rate, r.held_out_met) == (held.accuracy, held.exit_rate, held.met)
        # `held` is the rule's verdict (p-value against delta / K), not the calibrate stage's fixed 0.05
        assert r.held_out_held == (held.p_below > out.rule.per_check_delta)
        # 20,000 held-out tokens: checks with thousands of exits can see a 2-point miss
        assert r.held_out_detects == (held.n_exited >= min_exits_to_detect(r.level, 0.02, out.rule.per_check_delta))


def test_a_failed_held_out_check_rejects_and_names_the_failing_rows():
    """The held-out data got worse than the calib data: some thresholds miss their level."""
    old = calibrated(1)
    new = calibrated(3, a=5.0, held_a=2.5)
    out = compare_calibrations(new, old, new_key="c" * 64, old_key="a" * 64)
    assert not out.promote and out.failures
    assert all(not r.held for r in out.failures) and all(r in out.held_out for r in out.failures)
    assert out.reason.startswith(f"{len(out.failures)} of {out.rule.checked} held-out check(s) failed")
    assert out.reason.endswith("kept the current calibration aaaaaaaaaaaa")
    for r in out.failures:
        assert f"head {r.head} {r.predictor} level {r.level:g}: held-out accuracy {r.accuracy:.4f}" in out.reason
    # one failing row is enough, and it is the one named
    good = calibrated(1)
    i = next(i for i, r in enumerate(good.held_out) if r.accuracy is not None and r.predictor == "gate")
    k = sum(r.threshold is not None for r in good.held_out)
    # a p-value under 0.05 but over delta / K no longer fails (the old rule's false alarm) ...
    marginal = replace(good.held_out[i], p_below=0.04)
    assert compare_calibrations(good.with_held_out([*good.held_out[:i], marginal, *good.held_out[i + 1:]]), old).promote
    # ... one under delta / K does
    flipped = replace(good.held_out[i], p_below=0.5 * CFG.delta / k)
    one = compare_calibrations(good.with_held_out([*good.held_out[:i], flipped, *good.held_out[i + 1:]]), old)
    assert not one.promote and one.failures == [replace(flipped, held=False)]
    assert one.reason.startswith(f"1 of {k} held-out check(s) failed (head {flipped.head} gate level {flipped.level:g}")


def test_old_calibration_without_gates_compares_entropy_only_drift():
    old, new = calibrated(1, gates=False), calibrated(2)
    out = compare_calibrations(new, old)
    gate_rows = [r for r in out.drift if r.predictor == "gate"]
    assert gate_rows and all(r.old_threshold is None for r in gate_rows)
    assert all(r.old_threshold is not None for r in out.drift if r.predictor == "entropy" and r.level == 0.8)


def test_a_calibration_without_held_out_checks_is_refused():
    with pytest.raises(CalibrationError, match="no held-out check"):
        compare_calibrations(calibrate_exits(*make_labels(1, 3000), [4, 8], 16, CFG), None)


def test_outcome_round_trips_through_json_with_head_not_layer():
    out = compare_calibrations(calibrated(3, held_a=2.5), calibrated(1), new_key="c" * 64, old_key="a" * 64)
    as_json = json.loads(json.dumps(out.to_dict()))
    assert list(as_json["drift"][0])[:3] == ["predictor", "head", "level"]
    assert all("layer" not in r for r in as_json["drift"] + as_json["failures"] + as_json["held_out"])
    assert RecalibrationOutcome.from_dict(as_json) == out
    assert [f.name for f in fields(DriftRow)][:6] == ["predictor", "head", "level", "old_threshold", "new_threshold",
                                                      "shift"]
    assert all(isinstance(r, HeldOutCheck) for r in out.failures)


def test_only_deployed_thresholds_are_checked_when_the_calibration_names_them():
    """calibration.json may name the deployed predictor per head and level: only those count in
    K, so a failing threshold of a predictor nobody deploys does not block promotion."""
    good = calibrated(1)
    i = next(i for i, r in enumerate(good.held_out) if r.threshold is not None and r.predictor == "gate")
    bad_gate = replace(good.held_out[i], p_below=1e-9)
    new = good.with_held_out([*good.held_out[:i], bad_gate, *good.held_out[i + 1:]])
    assert not compare_calibrations(new, None).promote  # no deployed field: every predictor counts
    # deploy, per head and level, the predictor with more held-out exits (the calibrate stage's rule)
    rates = {(r.predictor, r.head, r.level): r.exit_rate for r in new.held_out if r.threshold is not None}
    rows = [{"head": h, "level": lv, "predictor": max(("entropy", "gate"), key=lambda p: rates.get((p, h, lv), -1.0))}
            for h in (4, 8) for lv in CFG.levels]
    deployed = {(r["predictor"], r["head"], r["level"]) for r in rows}
    forms = ({"choices": rows}, rows, [SimpleNamespace(**r) for r in rows],  # calibration.json, rows, typed rows
             {str(h): {str(lv): p for p, hh, lv in deployed if hh == h} for h in (4, 8)})  # head -> level -> name
    for form in forms:
        assert deployed_thresholds({"deployed": form}) == deployed
        assert deployed_thresholds(_Deploying(new, form)) == deployed
    assert deployed_thresholds(new.to_dict()) is None
    # only the deployed predictor's thresholds count: a failing certified threshold of the other does not block
    j = next(j for j, r in enumerate(good.held_out)
             if r.threshold is not None and (r.predictor, r.head, r.level) not in deployed)
    other_fails = good.with_held_out([*good.held_out[:j], replace(good.held_out[j], p_below=1e-9), *good.held_out[j + 1:]])
    out = compare_calibrations(_Deploying(other_fails, {"choices": rows}), None)
    k = sum(r.threshold is not None and (r.predictor, r.head, r.level) in deployed for r in good.held_out)
    assert out.promote and out.rule.scope == "deployed" and out.rule.checked == k
    assert f"over {k} deployed threshold(s)" in out.reason
    # a failing deployed one does
    d = next(d for d, r in enumerate(good.held_out) if r.threshold is not None and (r.predictor, r.head, r.level) in deployed)
    deployed_fails = good.with_held_out([*good.held_out[:d], replace(good.held_out[d], p_below=1e-9), *good.held_out[d + 1:]])
    assert not compare_calibrations(_Deploying(deployed_fails, rows), None).promote


class _Deploying:
    """A calibration that names its deployed predictor per head and level (``deployed``)."""

    def __init__(self, calibration: Calibration, deployed):
        self._calibration, self.deployed = calibration, deployed

    def __getattr__(self, name):
        return getattr(self._calibration, name)


def test_records_written_before_the_rule_still_read():
    out = compare_calibrations(calibrated(1), None)
    old_form = {k: v for k, v in out.to_dict().items() if k != "rule"}
    for r in old_form["drift"]:
        r.pop("held_out_detects")
    back = RecalibrationOutcome.from_dict(old_form)
    assert back.rule is None and back.checked == len(back.held_out) and back.promote
