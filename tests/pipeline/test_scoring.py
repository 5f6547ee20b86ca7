"""No-grad scoring: exit labels agree with head evaluation, the logit lens is the backbone's own
final norm + LM head, and gates are measured against the head's entropy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import GatesConfig
from pipeline.gates import gate_exit_probabilities
from pipeline.scoring import (
    BlockLogits,
    ExitLabels,
    GateEval,
    auroc,
    collect_exit_labels,
    evaluate_gate_scores,
    evaluate_gates,
    evaluate_heads,
    logit_lens,
)
from pipeline.train_gates import train_gates
from train_support import LAYERS, NUM_LAYERS, ArraySource, make_gate_rows


def test_collect_exit_labels_agree_with_evaluate_heads(synth):
    heads = logit_lens(synth.teacher, LAYERS)
    labels = collect_exit_labels(heads, synth.teacher, synth.small, max_tokens=700, batch_rows=256)
    assert np.array_equal(labels.row, np.arange(700))
    ev = evaluate_heads(heads, synth.teacher, synth.small, max_tokens=700, batch_rows=300)
    for layer in LAYERS:
        c, ct, ent = labels.correct[layer], labels.correct_true[layer], labels.entropy[layer]
        assert c.dtype == bool and ct.dtype == bool and ent.dtype == np.float32 and len(c) == 700
        assert ev[layer].agreement == pytest.approx(c.mean())
        assert ev[layer].accuracy == pytest.approx(ct[labels.has_target].mean())
        assert ev[layer].mean_entropy == pytest.approx(ent.mean(), rel=1e-5)
        assert 0 <= ev[layer].entropy_auroc <= 1


def test_on_logits_sees_every_heads_logits_of_every_block_once(synth):
    """The hook of `score_rows` hands each head's full logits per block, with the teacher's, and
    the labels are unchanged by it."""
    heads = logit_lens(synth.teacher, LAYERS)
    seen: list[BlockLogits] = []
    labels = collect_exit_labels(heads, synth.teacher, synth.small, max_tokens=700, batch_rows=300,
                                 on_logits=seen.append)
    plain = collect_exit_labels(heads, synth.teacher, synth.small, max_tokens=700, batch_rows=300)
    assert all(np.array_equal(labels.correct[layer], plain.correct[layer]) for layer in LAYERS)
    for layer in LAYERS:
        mine = [b for b in seen if b.layer == layer]
        assert sum(b.logits.shape[0] for b in mine) == 700  # 256 + 44 per batch of 300, then 100
        top1 = torch.cat([b.logits.argmax(-1) for b in mine]).numpy()
        t_top1 = torch.cat([b.teacher_logits.argmax(-1) for b in mine]).numpy()
        assert np.array_equal(top1 == t_top1, labels.correct[layer])
        assert np.array_equal(torch.cat([b.teacher_top1 for b in mine]).numpy(), t_top1)
        assert (torch.cat([b.targets for b in mine]).numpy() >= 0).tolist() == labels.has_target.tolist()


def test_logit_lens_is_the_backbones_final_norm_and_lm_head(tiny):
    ids = torch.from_numpy(tiny.split.input_ids[:2].astype(np.int64))  # [2, 32]
    states, final = tiny.backbone.hidden_states(ids, [1, 3])
    lens = logit_lens(tiny.teacher, [1, 3])
    assert not any(p.requires_grad for p in lens.parameters())
    for layer in (1, 3):
        h = states[layer].reshape(-1, 64)  # [64, H]
        expected = tiny.backbone.lm_head(tiny.backbone.final_norm(h))  # [64, V]
        torch.testing.assert_close(lens[str(layer)](h), expected, rtol=1e-5, atol=1e-5)
    # the final layer through the same path is the model's own output
    logits = tiny.backbone.model(ids).logits.reshape(-1, 384)  # [64, V]
    torch.testing.assert_close(tiny.teacher.logits(final.reshape(-1, 64)), logits, rtol=1e-4, atol=1e-4)


def test_exit_labels_pick_the_reference():
    labels = ExitLabels(row=np.arange(3), has_target=np.ones(3, bool), correct={1: np.array([True, False, True])},
                        correct_true={1: np.array([False, False, True])}, entropy={1: np.zeros(3, np.float32)})
    assert labels.layers == [1] and labels.num_tokens == 3
    assert labels.correct_for("final") is labels.correct and labels.correct_for("true") is labels.correct_true
    with pytest.raises(ValueError, match="'teacher'"):
        labels.correct_for("teacher")


def test_auroc_is_nan_when_one_class_is_absent():
    assert auroc(np.array([True, False, True]), np.array([0.9, 0.1, 0.8])) == 1.0
    assert np.isnan(auroc(np.ones(4, bool), np.arange(4.0)))
    assert np.isnan(auroc(np.zeros(0, bool), np.zeros(0)))


# ----------------------------------------------------------------------------- gates against entropy


def test_evaluate_gates_measures_each_gate_against_the_heads_entropy(synth):
    """Per gate layer on a fresh source: the AUROC of p_exit and of the head's -entropy for
    agreement, computed here by hand from the labels and the gates' probabilities."""
    train = ArraySource(make_gate_rows(synth.teacher, 2048, seed=11))
    held = ArraySource(make_gate_rows(synth.teacher, 1024, seed=12))
    heads = logit_lens(synth.teacher, LAYERS)
    cfg = GatesConfig(epochs=2, batch_tokens=256, lr=3e-3, warmup_steps=2, features="hidden")  # the marker is in h
    from pipeline.gates import load_gates

    gates = load_gates(cfg, synth.teacher, train_gates(cfg, heads, LAYERS, NUM_LAYERS, synth.teacher, train,
                                                       progress=False).state)
    ev = evaluate_gates(heads, gates, synth.teacher, held, max_tokens=900, batch_rows=256)
    assert set(ev) == set(LAYERS) and all(isinstance(e, GateEval) for e in ev.values())
    labels = collect_exit_labels(heads, synth.teacher, held, max_tokens=900)
    probs = gate_exit_probabilities(gates, held, max_tokens=900, heads=heads)
    from sklearn.metrics import roc_auc_score

    for layer in LAYERS:
        y = labels.correct[layer]
        e = ev[layer]
        assert e.layer == layer and e.tokens == 900 and e.agreement == pytest.approx(y.mean())
        assert e.gate_auroc == pytest.approx(roc_auc_score(y, probs[layer]))
        assert e.entropy_auroc == pytest.approx(roc_auc_score(y, -labels.entropy[layer]))
        assert e.gate_auroc > e.entropy_auroc + 0.2  # the marker dimension: only the gate can see it
    assert evaluate_gate_scores(labels, probs) == ev


def test_evaluate_gate_scores_refuses_mismatched_rows_and_unknown_layers():
    labels = ExitLabels(row=np.arange(4), has_target=np.ones(4, bool), correct={1: np.array([1, 0, 1, 0], bool)},
                        correct_true={1: np.zeros(4, bool)}, entropy={1: np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match="scored 3 tokens but its head 4"):
        evaluate_gate_scores(labels, {1: np.zeros(3)})
    with pytest.raises(ValueError, match="gate layer 2 has no head labels"):
        evaluate_gate_scores(labels, {2: np.zeros(4)})
    single = evaluate_gate_scores(ExitLabels(row=None, has_target=np.ones(2, bool), correct={1: np.ones(2, bool)},
                                             correct_true={1: np.ones(2, bool)}, entropy={1: np.zeros(2)}),
                                  {1: np.array([0.2, 0.9])})
    assert np.isnan(single[1].gate_auroc) and np.isnan(single[1].entropy_auroc)  # one class only

