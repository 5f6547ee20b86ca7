"""The evaluate stage's metrics: per-head quality against hand computations on tiny examples
(identity heads over a one-hot teacher, so a layer's state IS the head's logits and the final
state IS the teacher's), and on synthetic heads: guarantees are `check_held_out`'s rows, the
cascade is `evaluate_cascade`'s, gates are `evaluate_gate_scores`'s."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from train_support import LAYERS, NUM_LAYERS, ArraySource, make_rows

from pipeline.calibrate import Calibration, calibrate_exits, check_held_out
from pipeline.cascade import evaluate_cascade
from pipeline.config import CalibrateConfig, GatesConfig
from pipeline.curves import CURVE_POINTS, ENTROPY_BINS, entropy_bins, roc_points, thin_polyline
from pipeline.evaluate import (
    ECE_BINS,
    FIXED_GATE_THRESHOLDS,
    EvaluationMetrics,
    NonFiniteLogitsError,
    evaluate_exits,
)
from pipeline.gates import build_gates, gate_exit_probabilities
from pipeline.scoring import collect_exit_labels, evaluate_gate_scores, evaluate_heads, head_layers, logit_lens
from pipeline.teacher import TeacherWeights

V = 8


def identity_setup(head_logits: np.ndarray, teacher_logits: np.ndarray, targets: np.ndarray):
    """Head = identity on a V-dim state, teacher = one-hot LM head: logits are the arrays given."""
    teacher = TeacherWeights(lm_head=torch.eye(V), final_norm=torch.ones(V))
    heads = nn.ModuleDict({"1": nn.Identity()})
    src = ArraySource({"layer_1": head_logits.astype(np.float32), "final": teacher_logits.astype(np.float32),
                       "targets": targets.astype(np.int32)})
    return heads, teacher, src


def calibrate(heads, teacher, src, gates=None, levels=(0.3, 0.6), delta=0.3, final_layer=2) -> Calibration:
    labels = collect_exit_labels(heads, teacher, src)
    probs = None if gates is None else gate_exit_probabilities(gates, src, heads=heads)
    cfg = CalibrateConfig(levels=list(levels), delta=delta, grid_size=20)
    return calibrate_exits(labels, probs, head_layers(heads), final_layer, cfg)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def toy_ece(conf: np.ndarray, right: np.ndarray) -> float:
    """Guo et al.'s ECE with 15 bins (lo, hi], written independently of the module."""
    edges = np.linspace(0, 1, ECE_BINS + 1)
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs(right[m].mean() - conf[m].mean())
    return total


# ----------------------------------------------------------------------------- hand computations


def test_head_metrics_equal_a_hand_computation():
    rng = np.random.default_rng(0)
    n = 64
    h, t = rng.normal(0, 2, (n, V)), rng.normal(0, 2, (n, V))
    targets = rng.integers(0, V, n)
    targets[::7] = -1
    heads, teacher, src = identity_setup(h, t, targets)
    m = evaluate_exits(heads, teacher, src, calibrate(heads, teacher, src), num_layers=2, batch_rows=20)
    q = m.heads[1]

    lp, lq = log_softmax(h.astype(np.float32)), log_softmax(t.astype(np.float32))
    t_top1 = t.argmax(-1)
    agree = h.argmax(-1) == t_top1
    rank_of_teacher_top1 = (h > h[np.arange(n), t_top1][:, None]).sum(-1)  # 0 = the head's top-1
    valid = targets >= 0
    assert q.tokens == n and m.tokens == n
    assert q.agreement == pytest.approx(agree.mean())
    assert q.top5_agreement == pytest.approx((rank_of_teacher_top1 < 5).mean())
    assert 0 < (rank_of_teacher_top1 >= 5).sum() and q.top5_agreement > q.agreement  # both cases occur
    assert q.accuracy == pytest.approx((h.argmax(-1) == targets)[valid].mean())
    assert q.perplexity == pytest.approx(math.exp(-lp[valid, targets[valid]].mean()), rel=1e-5)
    assert q.kl_from_teacher == pytest.approx((np.exp(lq) * (lq - lp)).sum(-1).mean(), rel=1e-5)
    assert q.ece == pytest.approx(toy_ece(np.exp(lp.max(-1)), agree), abs=1e-6)
    assert q.mean_entropy == pytest.approx(-(np.exp(lp) * lp).sum(-1).mean(), rel=1e-5)


def test_kl_is_zero_for_a_head_equal_to_the_teacher():
    t = np.random.default_rng(1).normal(0, 3, (50, V))
    heads, teacher, src = identity_setup(t, t, np.zeros(50))
    q = evaluate_exits(heads, teacher, src, calibrate(heads, teacher, src), num_layers=2).heads[1]
    assert q.kl_from_teacher == 0.0 and q.agreement == 1.0 and q.top5_agreement == 1.0


def _toy(conf: float, n_right: int, n: int = 20):
    """Every row's top-1 probability is `conf` (token 0); the teacher agrees on `n_right` rows."""
    h = np.zeros((n, V))
    h[:, 0] = math.log(conf * (V - 1) / (1 - conf))  # e^a / (e^a + V - 1) = conf
    t = np.zeros((n, V))
    t[np.arange(n), np.where(np.arange(n) < n_right, 0, 1)] = 5.0
    return identity_setup(h, t, np.zeros(n))


@pytest.mark.parametrize("conf, n_right, ece", [(0.7, 14, 0.0), (0.9, 12, 0.3), (0.5, 20, 0.5)])
def test_ece_of_calibrated_and_miscalibrated_toys(conf, n_right, ece):
    heads, teacher, src = _toy(conf, n_right)
    q = evaluate_exits(heads, teacher, src, calibrate(heads, teacher, src, levels=[0.3]), num_layers=2).heads[1]
    assert q.agreement == pytest.approx(n_right / 20)
    assert q.ece == pytest.approx(ece, abs=1e-6)


def test_no_true_tokens_gives_nan_accuracy_and_perplexity_and_none_in_the_dict():
    t = np.random.default_rng(2).normal(0, 3, (30, V))
    heads, teacher, src = identity_setup(t, t, np.full(30, -1))
    cal = calibrate(heads, teacher, src, levels=[0.3])
    m = evaluate_exits(heads, teacher, src, cal, num_layers=2)
    assert math.isnan(m.heads[1].accuracy) and math.isnan(m.heads[1].perplexity)
    d = m.to_dict()
    assert d["heads"]["1"]["accuracy"] is None and d["heads"]["1"]["perplexity"] is None


# ----------------------------------------------------------------------------- synthetic heads, gates, calibration


@pytest.fixture(scope="module")
def setup(synth):
    heads = logit_lens(synth.teacher, LAYERS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        gates = build_gates(GatesConfig(), LAYERS, synth.teacher)
    calib = ArraySource(make_rows(synth.teacher, 2048, seed=5))
    cal = calibrate(heads, synth.teacher, calib, gates=gates, final_layer=NUM_LAYERS)
    return heads, gates, cal


@pytest.fixture(scope="module")
def metrics(synth, setup) -> EvaluationMetrics:
    heads, gates, cal = setup
    return evaluate_exits(heads, synth.teacher, synth.small, cal, gates=gates, num_layers=NUM_LAYERS,
                          max_tokens=900, batch_rows=300)


def test_head_and_lens_metrics_agree_with_scoring(synth, setup, metrics):
    heads = setup[0]
    ev = evaluate_heads(heads, synth.teacher, synth.small, max_tokens=900, batch_rows=300)
    assert metrics.tokens == 900 and metrics.layers == LAYERS
    for layer in LAYERS:
        q, lens = metrics.heads[layer], metrics.lens[layer]
        assert (q.agreement, q.accuracy, q.entropy_auroc) == (ev[layer].agreement, ev[layer].accuracy,
                                                             ev[layer].entropy_auroc)
        assert q.mean_entropy == pytest.approx(ev[layer].mean_entropy)
        assert lens == q  # these heads are the logit lens
        assert q.agreement <= q.top5_agreement <= 1 and 0 <= q.ece <= 1 and q.kl_from_teacher > 0


def test_guarantee_rows_are_check_held_outs(synth, setup, metrics):
    heads, gates, cal = setup
    labels = collect_exit_labels(heads, synth.teacher, synth.small, max_tokens=900, batch_rows=300)
    probs = gate_exit_probabilities(gates, synth.small, max_tokens=900, batch_rows=300, heads=heads)
    assert metrics.guarantees == check_held_out(cal, labels, probs)
    assert {r.predictor for r in metrics.guarantees} == {"entropy", "gate"}


def test_cascade_is_evaluate_cascades_with_compute_saved(synth, setup, metrics):
    heads, gates, cal = setup
    labels = collect_exit_labels(heads, synth.teacher, synth.small, max_tokens=900, batch_rows=300)
    probs = gate_exit_probabilities(gates, synth.small, max_tokens=900, batch_rows=300, heads=heads)
    assert [(c.predictor, c.level) for c in metrics.cascade] == [(p, lv) for p in ("entropy", "gate")
                                                                 for lv in cal.levels]
    for predictor, scores in (("entropy", labels.entropy), ("gate", probs)):
        checks = evaluate_cascade(scores, labels.correct, cal.chosen_cascade(predictor), NUM_LAYERS)
        ours = [c for c in metrics.cascade if c.predictor == predictor]
        for c, ref in zip(ours, checks):
            assert (c.avg_exit_layer, c.accuracy, c.exit_rates, c.met) == (ref.avg_exit_layer, ref.accuracy,
                                                                         ref.exit_rates, ref.met)
            assert 0.0 <= c.compute_saved <= 1.0
            assert c.compute_saved == pytest.approx(1 - ref.avg_exit_layer / NUM_LAYERS)
    assert any(c.compute_saved > 0 for c in metrics.cascade)  # the loose level lets tokens out


def test_gate_outcomes(synth, setup, metrics):
    heads, gates, cal = setup
    labels = collect_exit_labels(heads, synth.teacher, synth.small, max_tokens=900, batch_rows=300)
    probs = gate_exit_probabilities(gates, synth.small, max_tokens=900, batch_rows=300, heads=heads)
    ref = evaluate_gate_scores(labels, probs)
    for layer in LAYERS:
        g = metrics.gates[layer]
        assert (g.gate_auroc, g.entropy_auroc, g.agreement) == (ref[layer].gate_auroc, ref[layer].entropy_auroc,
                                                                ref[layer].agreement)
        calibrated = [p for p in g.operating_points if p.kind == "calibrated"]
        assert [p.level for p in calibrated] == cal.levels
        assert [p.threshold for p in calibrated] == [r.threshold for r in cal.chosen("gate")[layer]]
        fixed = [p for p in g.operating_points if p.kind == "fixed"]
        assert [p.threshold for p in fixed] == list(FIXED_GATE_THRESHOLDS)
        for p in fixed:
            m = probs[layer] >= p.threshold
            assert p.n_exited == m.sum() and p.exit_rate == pytest.approx(m.mean())
            assert p.agreement == (labels.correct[layer][m].mean() if m.any() else None)


def test_to_dict_round_trips_through_json(metrics):
    d = metrics.to_dict()
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert set(d["heads"]) == {"1", "2", "3"} and d["guarantees"][0]["predictor"] == "entropy"
    assert d["gates"]["1"]["operating_points"][-1]["threshold"] == 0.9
    assert set(d["curves"]["1"]) == {"layer", "entropy_roc", "gate_roc", "entropy_bins"}
    assert len(json.dumps(d["curves"])) < 60_000  # small enough for a manifest


# ----------------------------------------------------------------------------- curves


def trapezoid(curve) -> float:
    x, y = np.asarray(curve.fpr), np.asarray(curve.tpr)
    return float(((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2).sum())


def assert_roc_shape(curve):
    x, y = np.asarray(curve.fpr), np.asarray(curve.tpr)
    assert 2 <= x.size <= CURVE_POINTS and x.size == y.size
    assert (x[0], y[0]) == (0.0, 0.0) and (x[-1], y[-1]) == (1.0, 1.0)
    assert (np.diff(x) >= 0).all() and (np.diff(y) >= 0).all()


def test_roc_curves_are_thinned_monotone_and_keep_the_reported_auroc(metrics):
    assert set(metrics.curves) == set(LAYERS)
    for layer in LAYERS:
        c = metrics.curves[layer]
        assert_roc_shape(c.entropy_roc)
        assert trapezoid(c.entropy_roc) == pytest.approx(metrics.heads[layer].entropy_auroc, abs=1e-3)
        assert_roc_shape(c.gate_roc)
        assert trapezoid(c.gate_roc) == pytest.approx(metrics.gates[layer].gate_auroc, abs=1e-3)


def test_entropy_bins_cover_every_token_and_average_to_the_agreement(metrics):
    for layer in LAYERS:
        b = metrics.curves[layer].entropy_bins
        tokens = np.asarray(b.tokens)
        assert 1 < tokens.size <= ENTROPY_BINS and tokens.sum() == metrics.tokens and (tokens > 0).all()
        assert (np.asarray(b.lo) <= np.asarray(b.centre)).all() and (np.asarray(b.centre) <= np.asarray(b.hi)).all()
        assert (np.diff(b.lo) > 0).all()
        assert (tokens * np.asarray(b.agreement)).sum() / metrics.tokens == pytest.approx(
            metrics.heads[layer].agreement, abs=1e-4)
        assert abs(tokens.max() - tokens.min()) <= 2  # quantile bins of distinct entropies hold equal shares


def test_roc_points_of_a_long_curve_stay_within_1e_3_of_the_exact_auroc():
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(0)
    y = rng.random(50_000) < 0.4
    s = rng.normal(size=y.size) + 0.8 * y
    full = roc_curve(y, s)[0].size
    c = roc_points(y, s)
    assert full > 20 * CURVE_POINTS and len(c.fpr) == CURVE_POINTS
    assert_roc_shape(c)
    assert trapezoid(c) == pytest.approx(roc_auc_score(y, s), abs=1e-3)
    assert roc_points(np.ones(10, bool), np.arange(10)) is None and roc_points(np.zeros(0, bool), np.zeros(0)) is None


def test_thinning_keeps_short_curves_whole_and_drops_collinear_points_first():
    x = np.array([0.0, 0.1, 0.2, 0.5, 1.0])
    y = np.array([0.0, 0.5, 0.6, 0.9, 1.0])
    assert thin_polyline(x, y, 10).tolist() == [0, 1, 2, 3, 4]
    x2, y2 = np.linspace(0, 1, 9), np.r_[np.linspace(0, 0.8, 5), 0.85, 0.9, 0.95, 1.0]  # a kink at index 4
    assert thin_polyline(x2, y2, 3).tolist() == [0, 4, 8]


def test_entropy_bins_with_ties_and_without_true_tokens():
    b = entropy_bins(np.full(10, 2.0), np.arange(10) < 3, np.zeros(10, bool), np.zeros(10, bool))
    assert b.tokens == [10] and b.agreement == [0.3] and b.accuracy == [None] and b.lo == b.hi == [2.0]
    e = np.r_[np.zeros(50), np.linspace(1, 2, 50)]  # half the tokens tie at 0: their bins merge into one
    b = entropy_bins(e, e > 1.5, e > 1.5, np.arange(100) % 2 == 0)
    assert sum(b.tokens) == 100 and b.tokens[0] == 50 and b.centre[0] == 0.0 and b.agreement[0] == 0.0
    assert b.accuracy[-1] == 1.0


# ----------------------------------------------------------------------------- refusals


def test_a_mismatched_calibration_names_both_layer_lists(synth, setup):
    _, _, cal = setup
    heads = logit_lens(synth.teacher, [1, 2])
    with pytest.raises(ValueError, match=r"calibration is for layers \[1, 2, 3\] but the heads are at layers \[1, 2\]"):
        evaluate_exits(heads, synth.teacher, synth.small, cal, num_layers=NUM_LAYERS)


def test_gate_thresholds_without_gates_and_a_wrong_layer_count_are_refused(synth, setup):
    heads, _, cal = setup
    with pytest.raises(ValueError, match="pass gates=") as e:
        evaluate_exits(heads, synth.teacher, synth.small, cal, num_layers=NUM_LAYERS + 1)
    assert "final layer is 4 but num_layers=5" in str(e.value)


def test_non_finite_logits_stop_evaluation(synth):
    rows = make_rows(synth.teacher, 600, seed=6)
    rows["layer_2"][333, 5] = np.inf
    src = ArraySource(rows)
    heads = logit_lens(synth.teacher, LAYERS)
    cal = calibrate(heads, synth.teacher, ArraySource(make_rows(synth.teacher, 512, seed=7)), final_layer=NUM_LAYERS)
    with pytest.raises(NonFiniteLogitsError, match="head at layer 2 gave non-finite values on eval row 333"):
        evaluate_exits(heads, synth.teacher, src, cal, num_layers=NUM_LAYERS, batch_rows=200)


def test_deployed_predictor_per_head_and_level_is_reported_with_every_predictors_exit_rate(setup, metrics):
    """The calibration here predates deployments, so evaluation chooses them by the same rule on
    the eval tokens: the higher certified exit rate, ties to entropy; each row's numbers are the
    guarantee rows' own."""
    from pipeline.calibrate import choose_deployed

    cal = setup[2]
    assert [(d.head, d.level) for d in metrics.deployed] == [(h, lv) for h in LAYERS for lv in cal.levels]
    rows = {(r.predictor, r.head, r.level): r for r in metrics.guarantees}
    for d in metrics.deployed:
        assert d.exit_rates == {p: rows[(p, d.head, d.level)].exit_rate for p in ("entropy", "gate")}
        best = max(d.exit_rates.values())
        assert d.exit_rates[d.predictor] == best and (d.predictor == "entropy" or d.exit_rates["entropy"] < best)
        assert (d.exit_rate, d.accuracy, d.held) == (rows[(d.predictor, d.head, d.level)].exit_rate,
                                                     rows[(d.predictor, d.head, d.level)].accuracy,
                                                     rows[(d.predictor, d.head, d.level)].held)
    again = choose_deployed(cal.with_held_out(metrics.guarantees))
    assert [d.predictor for d in again.deployed] == [d.predictor for d in metrics.deployed]
    assert metrics.to_dict()["deployed"][0]["chosen_on"] == "eval"
