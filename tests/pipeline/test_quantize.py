"""Ternary retraining of trained heads and gates: the ternary modules start from the float ones,
are ternary, retrain with the trainers' own losses (+ λ_q quantization, λ_r routing), resume
exactly, and score, calibrate and evaluate through the unchanged pipeline code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.calibrate import calibrate_exits, check_held_out
from pipeline.config import CalibrateConfig, ConfigError, GatesConfig, QuantizeConfig, load_config
from pipeline.gates import build_gates, gate_exit_probabilities, gates_state_dict, load_gates
from pipeline.heads import load_heads
from pipeline.quantize import (
    TernaryAdapterHead,
    TernaryExitGate,
    TernaryLinearHead,
    build_ternary_gates,
    build_ternary_heads,
    load_ternary_gates,
    load_ternary_heads,
    quantize_gates,
    quantize_heads,
    set_quant_mix,
)
from pipeline.scoring import collect_exit_labels, evaluate_heads, logit_lens
from pipeline.ternary import BitLinear, PackedBitLinear, pack_bitlinear, weight_quant
from pipeline.train_gates import train_gates
from pipeline.train_heads import train_heads
from stores.checkpoints import FileCheckpoints
from train_support import (
    LAYERS,
    NUM_LAYERS,
    ArraySource,
    Crash,
    Faulty,
    assert_same_state,
    crash,
    heads_cfg,
    make_gate_rows,
    make_rows,
)

QCFG = dict(epochs=2, batch_tokens=256, lr=1e-2, warmup_steps=2)


@pytest.fixture(scope="module")
def trained(synth):
    """Float heads of both kinds, trained briefly on the small synthetic source."""
    out = {}
    for kind in ("adapter", "linear"):
        cfg = heads_cfg(kind=kind, epochs=2)
        result = train_heads(cfg, LAYERS, NUM_LAYERS, synth.teacher, synth.small, progress=False)
        out[kind] = (cfg, load_heads(cfg, LAYERS, synth.teacher, result.state))
    return out


def _centred_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)).mean())


@pytest.mark.parametrize("kind", ["adapter", "linear"])
@pytest.mark.parametrize("hadamard", [False, True])
def test_ternary_heads_start_from_the_float_heads_and_are_ternary(synth, trained, kind, hadamard):
    _, float_heads = trained[kind]
    heads = build_ternary_heads(float_heads, QuantizeConfig(hadamard=hadamard), synth.teacher)
    assert all(isinstance(h, TernaryAdapterHead if kind == "adapter" else TernaryLinearHead) for h in heads.values())
    rows = torch.from_numpy(make_rows(synth.teacher, 512, seed=9)["layer_2"])  # [n, H]
    with torch.no_grad():
        want = float_heads["2"](rows)  # [n, V]
        set_quant_mix(heads, 0.0)  # before rounding: exactly the float head (Hadamard: up to float error)
        torch.testing.assert_close(heads["2"](rows), want, atol=1e-4, rtol=1e-4)
        set_quant_mix(heads, 1.0)
        got = heads["2"](rows)  # [n, V]
    # rounded: the same logit landscape, most float top-1s in the ternary top-5 (chance: 5 / 512)
    assert _centred_cosine(got, want) > 0.8
    top5 = (got.topk(5).indices == want.argmax(1, keepdim=True)).any(1).float().mean()
    assert top5 > 0.5, top5

    bitlinears = [m for m in heads.modules() if isinstance(m, BitLinear)]
    assert len(bitlinears) == (2 * len(LAYERS) if kind == "adapter" else len(LAYERS))
    for layer in bitlinears:
        q, gamma = weight_quant(layer.weight)
        assert set(torch.unique(q).tolist()) == {-1.0, 0.0, 1.0} and gamma > 0
        # the packed integer layer computes what the training layer does
        x = torch.randn(7, layer.in_features)
        torch.testing.assert_close(PackedBitLinear.from_packed(pack_bitlinear(layer))(x), layer(x).detach(),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["adapter", "linear"])
def test_ternary_subset_and_per_row_scoring_match_the_full_projection(synth, trained, kind):
    """The efficient loss scores rows on candidates via project(., idx) and project_rows: both
    must read the same quantized weights as the full projection, at every warm-up blend."""
    heads = build_ternary_heads(trained[kind][1], QuantizeConfig(hadamard=True), synth.teacher)
    head = heads["1"]
    feats = head.features(torch.from_numpy(make_rows(synth.teacher, 64, seed=9)["layer_1"]))  # [n, H]
    ids = torch.randint(0, synth.teacher.vocab_size, (64, 9), generator=torch.Generator().manual_seed(0))  # [n, k]
    for mix in (1.0, 0.3):
        set_quant_mix(heads, mix)
        full = head.project(feats)  # [n, V]
        torch.testing.assert_close(head.project_rows(feats, ids), full.gather(1, ids))
        torch.testing.assert_close(head.project(feats, ids[0]), full[:, ids[0]])


def test_quantize_heads_learns_reports_the_quant_curve_and_reloads(synth, trained):
    """The linear head suffers most from rounding (a whole V x H matrix goes ternary);
    retraining with the efficient loss (per-row scoring of the quantized weight) wins agreement
    back. Ternary weights need a larger step than float ones: a weight only changes the
    network when its latent value crosses a rounding boundary (gamma / 2 away)."""
    hcfg, float_heads = trained["linear"]
    hcfg = hcfg.model_copy(update={"efficient_loss": True, "topk": 8, "negatives": 64})
    qcfg = QuantizeConfig(**{**QCFG, "epochs": 3, "lr": 0.1}, quant_weight=0.1)
    result = quantize_heads(qcfg, hcfg, float_heads, LAYERS, NUM_LAYERS, synth.teacher, synth.small, progress=False)
    assert result.steps == 12 and len(result.epochs) == 3 and result.resumed_from_epoch == 0
    assert result.epochs[-1].loss < result.epochs[0].loss - 0.5
    for layer in LAYERS:
        assert result.initial_agreement[layer] < result.float_agreement[layer]  # rounding costs agreement ...
        assert result.epochs[-1].agreement[layer] > result.initial_agreement[layer] + 0.05  # ... retraining wins some
        assert all(0 < e.quant_loss[layer] < 1 for e in result.epochs)

    # phased in: the first steps run (nearly) the float heads, whose loss is lower
    phased = quantize_heads(qcfg.model_copy(update={"quant_warmup_steps": 1000}), hcfg, float_heads, LAYERS,
                            NUM_LAYERS, synth.teacher, synth.small, progress=False)
    assert phased.epochs[0].loss < result.epochs[0].loss - 1.0

    heads = load_ternary_heads(hcfg, LAYERS, synth.teacher, qcfg, result.state)
    probe = evaluate_heads(heads, synth.teacher, synth.small, max_tokens=2048)
    assert {layer: probe[layer].agreement for layer in LAYERS} == result.epochs[-1].agreement
    with pytest.raises(ValueError, match="ternary head"):
        load_ternary_heads(hcfg.model_copy(update={"kind": "adapter"}), LAYERS, synth.teacher, qcfg, result.state)


def test_quantize_heads_resume_after_a_kill_equals_an_uninterrupted_run(synth, trained, tmp_path):
    hcfg, float_heads = trained["adapter"]
    # the quantization warm-up spans the kill: its step count must resume too
    qcfg = QuantizeConfig(**QCFG, quant_weight=0.5, quant_warmup_steps=6)
    run = dict(progress=False)
    straight = quantize_heads(qcfg, hcfg, float_heads, LAYERS, NUM_LAYERS, synth.teacher, synth.small, **run)
    ckpt = FileCheckpoints(tmp_path / "ckpt")
    with pytest.raises(Crash):
        quantize_heads(qcfg, hcfg, float_heads, LAYERS, NUM_LAYERS, synth.teacher, Faulty(synth.small, 1, 0, crash),
                       checkpoints=ckpt, **run)
    resumed = quantize_heads(qcfg, hcfg, float_heads, LAYERS, NUM_LAYERS, synth.teacher, synth.small,
                             checkpoints=ckpt, **run)
    assert resumed.resumed_from_epoch == 1
    assert_same_state(resumed.state, straight.state)
    assert [e.loss for e in resumed.epochs] == [e.loss for e in straight.epochs]
    assert [e.quant_loss for e in resumed.epochs] == [e.quant_loss for e in straight.epochs]


def test_quantize_gates_joint_loss_resume_and_reload(synth, tmp_path):
    source = ArraySource(make_gate_rows(synth.teacher, 2048, seed=5))
    gcfg = GatesConfig(epochs=2, batch_tokens=256, lr=3e-3, warmup_steps=2, max_tokens=None)
    lens = logit_lens(synth.teacher, LAYERS)
    float_gates = train_gates(gcfg, lens, LAYERS, NUM_LAYERS, synth.teacher, source, progress=False)
    float_gates = load_gates(gcfg, synth.teacher, float_gates.state)
    # rank-1 adapters with a zero up-map stay exactly the logit lens when ternary
    heads = build_ternary_heads(lens, QuantizeConfig(), synth.teacher)
    qcfg = QuantizeConfig(**QCFG, quant_weight=0.1, routing_weight=0.5, quant_warmup_steps=4)
    args = (qcfg, gcfg, float_gates, heads, LAYERS, NUM_LAYERS, synth.teacher)
    straight = quantize_gates(*args, source, progress=False)
    assert all(straight.auroc[layer] > 0.85 for layer in LAYERS), straight.auroc
    assert straight.epochs[-1].loss < straight.epochs[0].loss
    assert {"bce", "decision", "routing"} <= set(straight.epochs[0].components)
    assert all(set(e.quant_loss) == set(LAYERS) for e in straight.epochs)

    ckpt = FileCheckpoints(tmp_path / "gates")
    with pytest.raises(Crash):
        quantize_gates(*args, Faulty(source, 1, 0, crash), checkpoints=ckpt, progress=False)
    resumed = quantize_gates(*args, source, checkpoints=ckpt, progress=False)
    assert resumed.resumed_from_epoch == 1 and resumed.auroc == straight.auroc
    assert_same_state(resumed.state, straight.state)

    gates = load_ternary_gates(gcfg, qcfg, synth.teacher, straight.state)
    assert all(isinstance(g, TernaryExitGate) for g in gates.values())
    assert_same_state(gates_state_dict(gates), straight.state)
    again = build_ternary_gates(float_gates, qcfg, synth.teacher)
    assert set(again) == {str(layer) for layer in LAYERS}
    # the ternary gates read their head's confidence as the float ones do, started from their read-out
    for key, g in again.items():
        f = float_gates[key]
        assert g.features == f.features == gcfg.features and g.num_features == f.num_features > 0
        for name in ("confidence.weight", "direct.weight", "feature_mean", "feature_std"):
            assert torch.equal(g.state_dict()[name], f.state_dict()[name]), (key, name)
    assert all(g.num_features == float_gates[k].num_features for k, g in gates.items())


def test_negative_loss_weights_are_a_config_error_naming_the_value():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["quantize.quant_weight=-0.5", "quantize.routing_weight=-2"])
    assert "quantize.quant_weight = -0.5" in str(e.value) and "quantize.routing_weight = -2" in str(e.value)
    assert "2 problems" in str(e.value)
    assert load_config(overrides=["quantize.quant_weight=0.1"]).quantize.quant_weight == 0.1


def test_ternary_heads_and_gates_score_and_calibrate_through_the_unchanged_pipeline(synth, trained):
    hcfg, float_heads = trained["adapter"]
    heads = build_ternary_heads(float_heads, QuantizeConfig(), synth.teacher)
    quality = evaluate_heads(heads, synth.teacher, synth.eval, max_tokens=1024)
    assert set(quality) == set(LAYERS) and all(0 < q.agreement <= 1 and q.tokens == 1024 for q in quality.values())

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        gates = build_ternary_gates(build_gates(GatesConfig(), LAYERS, synth.teacher), QuantizeConfig(), synth.teacher)
    calib = ArraySource(make_rows(synth.teacher, 2048, seed=11))
    labels = collect_exit_labels(heads, synth.teacher, calib)
    probs = gate_exit_probabilities(gates, calib, heads=heads)
    assert all(p.shape == (2048,) and np.isfinite(p).all() for p in probs.values())
    cal = calibrate_exits(labels, probs, LAYERS, NUM_LAYERS, CalibrateConfig(levels=[0.5], delta=0.2))
    assert set(cal.predictors) == {"entropy", "gate"} and set(cal.heads) == set(LAYERS)
    checks = check_held_out(cal, labels, probs)
    assert checks and all(c.head in LAYERS for c in checks)
