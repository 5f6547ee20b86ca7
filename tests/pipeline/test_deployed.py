"""The deployed predictor: per head and level, of entropy and the gate, the one whose certified
threshold lets more tokens exit (on eval tokens when there are some), ties to entropy; written
into calibration.json with its rule."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.calibrate import DEPLOY_RULE, Calibration, calibrate_exits, check_held_out, choose_deployed
from pipeline.thresholds import CalibrationError
from test_calibrate import CAL_CFG, _sigmoid, make_labels


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _informed_gate(rng, labels, layer, informed: bool):
    """Gate scores that know the label (the gate sees more than entropy) or are noise."""
    y = labels.correct[layer].astype(float)
    return _sigmoid(4.0 * y - 2.0 + rng.normal(0, 1.0, y.size)) if informed else rng.random(y.size)


def test_deployed_predictor_is_the_one_with_the_higher_certified_exit_rate(rng):
    """Head 4's gate knows more than its entropy, head 8's is noise: at every level the
    deployment exits on head 4's gate and on head 8's entropy, chosen on the eval tokens, and
    calibration.json says so with the rule."""
    def split(n):
        labels, _ = make_labels(rng, n)
        return labels, {4: _informed_gate(rng, labels, 4, True), 8: _informed_gate(rng, labels, 8, False)}

    calib, ev = split(6000), split(6000)
    cal = calibrate_exits(*calib, [4, 8], 16, CAL_CFG)
    cal = choose_deployed(cal.with_held_out(check_held_out(cal, *ev)))
    assert cal.deployed_on == "eval" and len(cal.deployed) == 4
    for d in cal.deployed:
        assert d.predictor == max(d.exit_rates, key=d.exit_rates.get)
        assert d.predictor == ("gate" if d.head == 4 else "entropy"), d
        held = next(r for r in cal.held_out if (r.predictor, r.head, r.level) == (d.predictor, d.head, d.level))
        assert d.exit_rates[d.predictor] == held.exit_rate and d.threshold == held.threshold
    assert cal.deployment(4, 0.9).exit_rates["gate"] > cal.deployment(4, 0.9).exit_rates["entropy"] + 0.05

    as_json = json.loads(json.dumps(cal.to_dict()))
    assert as_json["deployed"]["rule"] == DEPLOY_RULE and as_json["deployed"]["measured_on"] == "eval"
    assert {(c["head"], c["level"], c["predictor"]) for c in as_json["deployed"]["choices"]} == {
        (4, 0.8, "gate"), (4, 0.9, "gate"), (8, 0.8, "entropy"), (8, 0.9, "entropy")}
    assert Calibration.from_dict(as_json) == cal


def test_deployed_ties_go_to_entropy_and_without_eval_the_calib_rates_decide(rng):
    """A gate that is a monotone function of entropy exits exactly the same tokens: a tie,
    which entropy wins (it costs nothing). Without a held-out check the calib exit rates decide."""
    labels, probs = make_labels(rng, 6000)
    cal = choose_deployed(calibrate_exits(labels, probs, [4, 8], 16, CAL_CFG))
    assert cal.deployed_on == "calib"
    for d in cal.deployed:
        assert d.exit_rates["gate"] == d.exit_rates["entropy"] and d.predictor == "entropy"
        assert d.exit_rates["entropy"] == cal.chosen("entropy")[d.head][CAL_CFG.levels.index(d.level)].exit_rate
    entropy_only = choose_deployed(calibrate_exits(labels, None, [4, 8], 16, CAL_CFG))
    assert {d.predictor for d in entropy_only.deployed} == {"entropy"}
    with pytest.raises(CalibrationError, match="no deployed predictor for head 5"):
        cal.deployment(5, 0.9)
