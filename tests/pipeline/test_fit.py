"""The shared training loop, driven through head training: determinism, exact resume, refusal
of foreign checkpoints, the schedule and divergence handling."""

from __future__ import annotations

import pytest
import torch

from pipeline.fit import CheckpointMismatch, TrainingDiverged, WarmupCosine
from pipeline.train_heads import train_heads
from stores.checkpoints import FileCheckpoints
from train_support import LAYERS, NUM_LAYERS, Crash, Faulty, assert_same_state, crash, heads_cfg, inject_inf


def test_same_seed_gives_identical_weights_and_another_seed_does_not(synth):
    cfg = heads_cfg(epochs=1, efficient_loss=True, topk=4, negatives=16)
    a = train_heads(cfg, LAYERS, NUM_LAYERS, synth.teacher, synth.small, progress=False)
    b = train_heads(cfg, LAYERS, NUM_LAYERS, synth.teacher, synth.small, progress=False)
    assert_same_state(a.state, b.state)
    c = train_heads(cfg.model_copy(update={"seed": 1}), LAYERS, NUM_LAYERS, synth.teacher, synth.small, progress=False)
    assert not torch.equal(a.state["1.down.weight"], c.state["1.down.weight"])


def test_training_leaves_the_callers_rng_alone(synth):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_heads(heads_cfg(epochs=1, max_steps=1), LAYERS, NUM_LAYERS, synth.teacher, synth.small, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_resume_after_a_crash_equals_an_uninterrupted_run(synth, tmp_path):
    cfg = heads_cfg(epochs=2, efficient_loss=True, topk=4, negatives=16)
    straight = train_heads(cfg, LAYERS, NUM_LAYERS, synth.teacher, synth.train, progress=False,
                           checkpoints=FileCheckpoints(tmp_path / "straight"))

    ckpt = FileCheckpoints(tmp_path / "crashed")
    with pytest.raises(Crash):
        train_heads(cfg, LAYERS, NUM_LAYERS, synth.teacher, Faulty(synth.train, epoch=1, batch=3, fault=crash),
                    checkpoints=ckpt, progress=False)
    saved = ckpt.load()
    assert saved["epochs_done"] == 1 and saved["step"] == 24

    resumed = train_heads(cfg, LAYERS, NUM_LAYERS, synth.teacher, synth.train, checkpoints=ckpt, progress=False)
    assert resumed.resumed_from_epoch == 1 and resumed.steps == straight.steps == 48
    assert_same_state(resumed.state, straight.state)
    assert [(e.epoch, e.loss, e.loss_curve, e.agreement) for e in resumed.epochs] == \
        [(e.epoch, e.loss, e.loss_curve, e.agreement) for e in straight.epochs]

    again = train_heads(cfg, LAYERS, NUM_LAYERS, synth.teacher, synth.train, checkpoints=ckpt, progress=False)
    assert again.resumed_from_epoch == 2 and again.steps == 48  # finished: nothing left to do
    assert_same_state(again.state, straight.state)


def test_a_checkpoint_of_other_inputs_is_refused(synth, tmp_path):
    ckpt = FileCheckpoints(tmp_path / "c")
    train_heads(heads_cfg(epochs=1), LAYERS, NUM_LAYERS, synth.teacher, synth.small, checkpoints=ckpt,
                progress=False)
    with pytest.raises(CheckpointMismatch, match=r"config\.lr.*Delete it"):
        train_heads(heads_cfg(epochs=1, lr=5e-3), LAYERS, NUM_LAYERS, synth.teacher, synth.small,
                    checkpoints=ckpt, progress=False)


# ----------------------------------------------------------------------------- schedule


def test_warmup_then_cosine_to_zero():
    f = WarmupCosine(warmup=4, total=20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(12) == pytest.approx(0.5) and f(20) == pytest.approx(0.0)
    values = [f(s) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_max_steps_is_spread_over_the_epochs(synth):
    # 1024 rows / 256 = 4 batches per epoch; 5 steps over 3 epochs -> 2 + 2 + 1
    result = train_heads(heads_cfg(epochs=3, max_steps=5), LAYERS, NUM_LAYERS, synth.teacher, synth.small,
                         progress=False)
    assert result.steps == 5 and [e.tokens for e in result.epochs] == [512, 512, 256]


def test_the_loss_curve_has_a_point_per_window_of_steps_and_its_mean_is_the_epoch_loss(synth, monkeypatch):
    import pipeline.fit

    monkeypatch.setattr(pipeline.fit, "LOSS_CURVE_POINTS", 3)  # 10 steps (5 per epoch) -> windows of 4 steps
    result = train_heads(heads_cfg(epochs=2, max_steps=10), LAYERS, NUM_LAYERS, synth.teacher, synth.train,
                         progress=False)
    first, second = (e.loss_curve for e in result.epochs)
    assert [s for s, _ in first] == [4, 5] and [s for s, _ in second] == [8, 10]  # each epoch ends a window
    assert (first[0][1] * 4 + first[1][1]) / 5 == pytest.approx(result.epochs[0].loss)
    assert (second[0][1] * 3 + second[1][1] * 2) / 5 == pytest.approx(result.epochs[1].loss)


# ----------------------------------------------------------------------------- divergence


def test_divergence_stops_at_once_and_keeps_the_last_good_checkpoint(synth, tmp_path):
    ckpt = FileCheckpoints(tmp_path / "c")
    source = Faulty(synth.small, epoch=1, batch=2, fault=inject_inf)
    with pytest.raises(TrainingDiverged) as info:
        train_heads(heads_cfg(epochs=3), LAYERS, NUM_LAYERS, synth.teacher, source, checkpoints=ckpt,
                    progress=False)
    err = info.value
    assert (err.step, err.epoch, err.culprits, err.last_good_epoch) == (6, 1, ["head 2"], 0)
    msg = str(err)
    for part in ("step 6", "epoch 1", "head 2", "after epoch 0", "kept unchanged", "lr", "grad_clip", "overflow"):
        assert part in msg, part
    saved = ckpt.load()
    assert saved["epochs_done"] == 1 and saved["step"] == 4  # the epoch-0 save, untouched
    assert not ckpt.previous_path.exists()  # no second save ever happened


def test_a_huge_learning_rate_diverges_before_saving(synth, tmp_path):
    ckpt = FileCheckpoints(tmp_path / "c")
    with pytest.raises(TrainingDiverged, match="No checkpoint had been written yet"):
        train_heads(heads_cfg(epochs=1, lr=1e30, warmup_steps=0, weight_decay=0.01), LAYERS, NUM_LAYERS,
                    synth.teacher, synth.small, checkpoints=ckpt, progress=False)
    assert ckpt.load() is None
