"""Gate training: gates learn where correctness is learnable, held-out rows stay out, resume is
exact, divergence is reported like heads; online end to end."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import GatesConfig, HeadsConfig
from pipeline.fit import TrainingDiverged
from pipeline.heads import load_heads
from pipeline.scoring import logit_lens
from pipeline.sources import OnlineSource
from pipeline.train_gates import heldout_mask, train_gates
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
    make_gate_rows,
    write_cache,
)


def test_heldout_mask_is_a_stable_tenth():
    rows = np.arange(200_000)
    mask = heldout_mask(rows)
    assert abs(mask.mean() - 0.1) < 0.005
    assert np.array_equal(heldout_mask(rows[::-1]), mask[::-1])  # a function of the row alone
    assert abs(mask.reshape(-1, 250)[:, :10].mean() - 0.1) < 0.01  # not tied to positions in a sequence


def test_gates_learn_when_correctness_is_learnable(synth, tmp_path):
    source = write_cache(tmp_path / "gates", make_gate_rows(synth.teacher, 4096, seed=5))
    cfg = GatesConfig(epochs=3, batch_tokens=256, lr=3e-3, warmup_steps=5, hidden_ratio=4)
    heads = logit_lens(synth.teacher, LAYERS)
    result = train_gates(cfg, heads, LAYERS, NUM_LAYERS, synth.teacher, source, progress=False,
                         checkpoints=FileCheckpoints(tmp_path / "ckpt"))
    assert set(result.auroc) == set(result.entropy_auroc) == set(LAYERS)
    assert 300 < result.heldout_rows < 520  # ~10 % of 4096
    for layer in LAYERS:
        assert result.auroc[layer] > 0.9, result.auroc
        # entropy cannot see the marker dimension: the gate must beat the head's own confidence
        assert result.auroc[layer] > result.entropy_auroc[layer] + 0.2, (result.auroc, result.entropy_auroc)
    assert len(result.epochs) == 3 and all(set(e.auroc) == set(LAYERS) for e in result.epochs)
    assert result.epochs[-1].loss < result.epochs[0].loss
    assert {"bce", "decision", "gate_accuracy"} <= set(result.epochs[0].components)
    # held-out rows are never trained on: every epoch read only the other ~90 %
    assert all(e.tokens == pytest.approx(4096 - result.heldout_rows, abs=0) for e in result.epochs)
    assert set(result.state) >= {"1.norm.weight", "1.mlp.0.weight", "3.mlp.2.bias"}


def test_gates_resume_equals_uninterrupted_and_share_the_loop(synth, tmp_path):
    source = ArraySource(make_gate_rows(synth.teacher, 1024, seed=6))
    cfg = GatesConfig(epochs=2, batch_tokens=128, warmup_steps=2, sampling="gumbel")
    heads = logit_lens(synth.teacher, LAYERS)
    straight = train_gates(cfg, heads, LAYERS, NUM_LAYERS, synth.teacher, source, progress=False)
    ckpt = FileCheckpoints(tmp_path / "c")
    with pytest.raises(Crash):
        train_gates(cfg, heads, LAYERS, NUM_LAYERS, synth.teacher, Faulty(source, 1, 0, crash), checkpoints=ckpt,
                    progress=False)
    resumed = train_gates(cfg, heads, LAYERS, NUM_LAYERS, synth.teacher, source, checkpoints=ckpt, progress=False)
    assert resumed.resumed_from_epoch == 1
    assert_same_state(resumed.state, straight.state)
    assert resumed.auroc == straight.auroc


def test_gates_with_few_labels_train_on_the_labelled_rows_only(synth):
    source = ArraySource(make_gate_rows(synth.teacher, 1024, seed=8))
    result = train_gates(GatesConfig(epochs=1, batch_tokens=128), logit_lens(synth.teacher, LAYERS), LAYERS,
                         NUM_LAYERS, synth.teacher, source, progress=False, max_label_tokens=300)
    labelled = ~heldout_mask(np.arange(300))
    assert result.steps == 8 and result.epochs[0].tokens == int(labelled.sum())


def test_gate_divergence_is_reported_like_heads(synth):
    def poison(batch):
        batch = dict(batch)
        batch["layer_1"] = np.full_like(batch["layer_1"], np.nan)
        return batch

    source = Faulty(ArraySource(make_gate_rows(synth.teacher, 512, seed=7)), epoch=0, batch=1, fault=poison)
    with pytest.raises(TrainingDiverged, match=r"gates training diverged at step 1 \(epoch 0"):
        train_gates(GatesConfig(epochs=1, batch_tokens=128), logit_lens(synth.teacher, LAYERS), LAYERS,
                    NUM_LAYERS, synth.teacher, source, progress=False)


def test_online_training_and_gates_run_end_to_end(tiny):
    online = OnlineSource(tiny.backbone, tiny.split, [1, 3], sequences_per_forward=16, max_sequences=32)
    cfg = HeadsConfig(kind="adapter", rank=8, epochs=1, batch_tokens=256, warmup_steps=1)
    result = train_heads(cfg, [1, 3], 4, tiny.teacher, online, progress=False)
    assert result.steps == 4 and set(result.epochs[0].agreement) == {1, 3}
    heads = load_heads(cfg, [1, 3], tiny.teacher, result.state)
    gates = train_gates(GatesConfig(epochs=1, batch_tokens=256), heads, [1, 3], 4, tiny.teacher, online,
                        progress=False)
    assert set(gates.auroc) == {1, 3} and gates.steps == 4


def test_gates_below_their_heads_entropy_are_named_with_both_numbers():
    from pipeline.train_gates import gates_below_entropy

    rows = gates_below_entropy({6: 0.73, 12: 0.80, 18: float("nan"), 24: 0.70},
                               {6: 0.76, 12: 0.77, 18: 0.75, 24: 0.79})
    assert rows == [{"head": 6, "gate_auroc": 0.73, "entropy_auroc": 0.76},
                    {"head": 24, "gate_auroc": 0.7, "entropy_auroc": 0.79}]
    assert gates_below_entropy({6: 0.9}, {6: 0.8}) == []
