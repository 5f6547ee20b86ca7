"""Gates that read their head's confidence: the features equal a direct computation on tiny
Llama and GPT-2 models, the gate standardises and saves them, and on a task where correctness
is a function of the head's entropy the confidence gate ranks tokens at least as well as
entropy while the hidden-only gate cannot."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.backbone import load_backbone
from pipeline.config import GatesConfig, ModelConfig
from pipeline.gates import (
    CONFIDENCE_NAMES,
    ExitGate,
    build_gates,
    confidence_features,
    gate_exit_probabilities,
    gates_need_confidence,
)
from pipeline.scoring import auroc, collect_exit_labels, logit_lens
from pipeline.train_gates import train_gates
from train_support import ArraySource


def _direct(logits: np.ndarray, prev_top1: np.ndarray | None) -> np.ndarray:
    """The four features from float64 numpy softmax, written out."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    entropy = -(p * np.log(np.where(p > 0, p, 1.0))).sum(-1)
    srt = np.sort(p, axis=-1)
    changed = np.zeros(len(z)) if prev_top1 is None else (p.argmax(-1) != prev_top1).astype(float)
    return np.stack([entropy, srt[:, -1], srt[:, -1] - srt[:, -2], changed], axis=1)


def test_confidence_features_match_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(50, 300, generator=g)
    prev = torch.randint(0, 300, (50,), generator=g)
    prev[:10] = logits[:10].argmax(-1)  # some rows keep the previous head's answer
    got = confidence_features(logits, prev).numpy()
    assert got.shape == (50, len(CONFIDENCE_NAMES)) and got.dtype == np.float32
    np.testing.assert_allclose(got, _direct(logits.numpy(), prev.numpy()), rtol=1e-4, atol=1e-5)
    assert (got[:10, 3] == 0).all() and got[:, 3].sum() > 30
    assert (confidence_features(logits)[:, 3] == 0).all()  # the first exit head has no previous one


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def family_rows(request, tmp_path_factory, make_tiny_family):
    """Hidden states of layers 1 and 2 of a tiny random model (Llama or GPT-2 layout), as rows."""
    backbone = load_backbone(ModelConfig(source=str(make_tiny_family(tmp_path_factory.mktemp(request.param),
                                                                       request.param))))
    ids = torch.randint(0, backbone.vocab_size, (8, 16), generator=torch.Generator().manual_seed(0))  # [8, 16]
    states, final = backbone.hidden_states(ids, [1, 2])
    rows = {f"layer_{layer}": states[layer].reshape(-1, backbone.hidden_size).float().numpy() for layer in (1, 2)}
    rows["final"] = final.reshape(-1, backbone.hidden_size).float().numpy()
    rows["targets"] = np.full(len(rows["final"]), -1, dtype=np.int64)
    return backbone, ArraySource(rows)


def test_features_of_the_label_pass_equal_the_heads_logits_on_real_layouts(family_rows):
    """What gate training and calibration read (`ExitLabels.features`) is the head's own
    confidence, computed directly from the backbone's final norm and LM head (the logit lens)."""
    backbone, source = family_rows
    teacher = backbone.teacher_weights()
    heads = logit_lens(teacher, [1, 2])
    labels = collect_exit_labels(heads, teacher, source, batch_rows=50)
    prev = None
    for layer in (1, 2):
        h = torch.from_numpy(source.arrays[f"layer_{layer}"])
        with torch.no_grad():
            logits = backbone.lm_head(backbone.final_norm(h)).numpy()  # [n, V]
        np.testing.assert_allclose(labels.features[layer], _direct(logits, prev), rtol=1e-3, atol=1e-4)
        np.testing.assert_array_equal(labels.entropy[layer], labels.features[layer][:, 0])
        prev = logits.argmax(-1)

    # a confidence gate scored with the heads gives what it gives from the label pass's features
    gates = build_gates(GatesConfig(features="hidden+confidence+change"), [1, 2], teacher)
    assert gates_need_confidence(gates)
    from_heads = gate_exit_probabilities(gates, source, heads=heads, batch_rows=40)
    from_labels = gate_exit_probabilities(gates, source, features=labels.features, batch_rows=40)
    for layer in (1, 2):
        np.testing.assert_allclose(from_heads[layer], from_labels[layer], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="heads="):
        gate_exit_probabilities(gates, source)


def test_a_confidence_prior_on_entropy_ranks_like_entropy_and_the_prior_is_a_logistic_fit():
    """A gate given the prior "-1 x standardised entropy" (and a silent MLP) ranks tokens exactly
    as entropy does; the prior training starts from is the logistic regression of the label on
    the standardised features, which recovers a known linear rule."""
    from pipeline.gates import fit_confidence_prior
    from train_support import make_teacher

    gate = ExitGate(make_teacher(), 4, 1, "hidden+confidence")
    h = torch.randn(3, 32)
    assert not gate.confidence.weight.any() and not gate.direct.weight.any()  # untrained: the hidden-state gate
    torch.testing.assert_close(gate(h, torch.rand(3, 4)), gate.mlp(gate.norm(h)).squeeze(-1))
    with pytest.raises(ValueError, match="confidence_features"):
        gate(h)
    gate.set_feature_stats(torch.tensor([2.0, 0.5, 0.3, 0.0]), torch.tensor([1.0, 0.2, 0.2, 0.0]))
    gate.set_confidence_prior(torch.tensor([-1.0, 0.0, 0.0]), 0.5)
    with torch.no_grad():
        gate.mlp[2].weight.zero_()
    conf = torch.rand(100, 4) * 3
    p = gate.exit_probability(torch.randn(100, 32), conf)
    assert torch.equal(torch.argsort(p), torch.argsort(-conf[:, 0]))
    assert torch.equal(gate.feature_std, torch.tensor([1.0, 0.2, 0.2]))  # a constant column is only centred

    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 3, generator=g)
    y = torch.rand(20000, generator=g) < torch.sigmoid(-2.0 * x[:, 0] + 1.0 * x[:, 1] + 0.5)
    w, b = fit_confidence_prior(x, y)
    torch.testing.assert_close(w, torch.tensor([-2.0, 1.0, 0.0]), atol=0.1, rtol=0)
    assert abs(b - 0.5) < 0.1
    w, b = fit_confidence_prior(x, torch.ones(20000))  # one class: no prior
    assert not w.any() and b == 0.0


def _entropy_task(teacher, n: int, seed: int) -> dict[str, np.ndarray]:
    """Rows whose head (the logit lens) agrees with the teacher with a probability that falls
    with the head's entropy, and whose hidden state carries no other hint: the label is a
    (noisy) function of entropy. A state leans towards one LM-head row by a random amount, so
    entropies spread; the teacher's state is the head's own where they agree, random elsewhere."""
    rng = np.random.default_rng(seed)
    vocab, hidden = teacher.lm_head.shape
    w = teacher.lm_head.numpy()
    out = {"targets": rng.integers(0, vocab, n).astype(np.int64)}
    lean = rng.uniform(0.0, 4.0, n).astype(np.float32)[:, None] / np.linalg.norm(w, axis=1).mean()
    x = rng.standard_normal((n, hidden)).astype(np.float32) + lean * w[rng.integers(0, vocab, n)]
    with torch.no_grad():
        ent = confidence_features(teacher.logits(torch.from_numpy(x)))[:, 0].numpy()
    agree = rng.random(n) < 1 / (1 + np.exp(-4 * (np.median(ent) - ent) / ent.std()))
    out["layer_1"] = out["layer_2"] = x  # both heads see the same state: one label, a function of entropy
    out["final"] = np.where(agree[:, None], x, rng.standard_normal((n, hidden)).astype(np.float32))
    return out


@pytest.mark.parametrize("features", ["hidden+confidence", "hidden+confidence+change"])
def test_confidence_gate_reaches_entropy_auroc_when_the_label_is_a_function_of_entropy(synth, features):
    teacher = synth.teacher
    heads = logit_lens(teacher, [1, 2])
    train = ArraySource(_entropy_task(teacher, 4096, seed=0))
    held = ArraySource(_entropy_task(teacher, 2048, seed=1))
    labels = collect_exit_labels(heads, teacher, held)
    cfg = GatesConfig(features=features, epochs=2, batch_tokens=256, warmup_steps=2, lr=3e-3)
    result = train_gates(cfg, heads, [1, 2], 4, teacher, train, progress=False)
    from pipeline.gates import load_gates

    gates = load_gates(cfg, teacher, result.state)
    probs = gate_exit_probabilities(gates, held, features=labels.features)
    for layer in (1, 2):
        ent_auc = auroc(labels.correct[layer], -labels.entropy[layer])
        gate_auc = auroc(labels.correct[layer], probs[layer])
        assert ent_auc > 0.7, ent_auc  # the task is what it says
        assert gate_auc >= ent_auc - 0.01, (layer, gate_auc, ent_auc)
        # the saved gate carries its training rows' statistics
        assert float(gates[str(layer)].feature_std[0]) > 0 and float(gates[str(layer)].feature_mean[0]) > 0
