"""The recalibration policy: drift of the deployed thresholds per predictor, head and level, and
promotion only when every held-out check of the new thresholds holds."""

from __future__ import annotations

import json
from dataclasses import fields, replace

import numpy as np
import pytest

from pipeline.calibrate import Calibration, HeldOutCheck, calibrate_exits, check_held_out
from pipeline.config import CalibrateConfig
from pipeline.recalibrate import DriftRow, RecalibrationOutcome, compare_calibrations
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
        assert (r.held_out_accuracy, r.held_out_exit_rate, r.held_out_met, r.held_out_held) == \
            (held.accuracy, held.exit_rate, held.met, held.held)


def test_a_failed_held_out_check_rejects_and_names_the_failing_rows():
    """The held-out data got worse than the calib data: some thresholds miss their level."""
    old = calibrated(1)
    new = calibrated(3, a=5.0, held_a=2.5)
    out = compare_calibrations(new, old, new_key="c" * 64, old_key="a" * 64)
    assert not out.promote and out.failures
    assert all(not r.held for r in out.failures) and all(r in out.held_out for r in out.failures)
    assert out.reason.startswith(f"{len(out.failures)} held-out check(s) failed")
    assert out.reason.endswith("kept the current calibration aaaaaaaaaaaa")
    for r in out.failures:
        assert f"head {r.head} {r.predictor} level {r.level:g}: held-out accuracy {r.accuracy:.4f}" in out.reason
    # one failing row is enough, and it is the one named
    good = calibrated(1)
    i = next(i for i, r in enumerate(good.held_out) if r.accuracy is not None and r.predictor == "gate")
    flipped = replace(good.held_out[i], held=False)
    one = compare_calibrations(good.with_held_out([*good.held_out[:i], flipped, *good.held_out[i + 1:]]), old)
    assert not one.promote and one.failures == [flipped]
    assert one.reason.startswith(f"1 held-out check(s) failed (head {flipped.head} gate level {flipped.level:g}")


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
