"""Head training: real training on small caches (synthetic with a known teacher, and the tiny
random Llama), the efficient loss and its precomputed teacher top-k."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import HeadsConfig
from pipeline.heads import AdapterHead, load_heads
from pipeline.scoring import evaluate_heads, logit_lens
from pipeline.teacher import TeacherWeights
from pipeline.train_heads import HEADS_CODE_VERSION, train_heads
from train_support import LAYERS, NUM_LAYERS, VOCAB, heads_cfg, precompute_topk


# ----------------------------------------------------------------------------- heads learn


def test_trained_heads_beat_the_logit_lens_at_every_layer(synth):
    cfg = heads_cfg(epochs=6)  # 6 x 24 = 144 steps
    result = train_heads(cfg, LAYERS, NUM_LAYERS, synth.teacher, synth.train, progress=False)
    assert result.steps == 144 and len(result.epochs) == 6 and result.resumed_from_epoch == 0
    assert result.tokens_per_s > 0 and all(e.tokens == 24 * 256 for e in result.epochs)
    assert result.epochs[-1].loss < result.epochs[0].loss

    heads = load_heads(cfg, LAYERS, synth.teacher, result.state)
    trained = evaluate_heads(heads, synth.teacher, synth.eval)
    lens = evaluate_heads(logit_lens(synth.teacher, LAYERS), synth.teacher, synth.eval)
    for layer in LAYERS:
        assert trained[layer].tokens == lens[layer].tokens == 2048
        assert trained[layer].agreement > lens[layer].agreement + 0.2, (layer, trained[layer], lens[layer])
        assert trained[layer].agreement > 0.7
        assert trained[layer].accuracy > lens[layer].accuracy
        # per-epoch probe metrics climb too
        assert result.epochs[-1].agreement[layer] > result.epochs[0].agreement[layer] - 0.02
        assert 0 <= result.epochs[-1].accuracy[layer] <= 1


def test_efficient_loss_learns_without_full_vocabulary_student_logits(synth, monkeypatch):
    """Without a precomputed top-k (as online): the teacher's top-k of each batch's final states."""
    original = AdapterHead.project
    subset_sizes = []

    def project(self, feats, vocab_idx=None):
        if torch.is_grad_enabled():  # a training step (probes and evaluation run under no_grad)
            assert vocab_idx is not None, "a training step built [n, V] student logits"
            subset_sizes.append(vocab_idx.numel())
        return original(self, feats, vocab_idx)

    monkeypatch.setattr(AdapterHead, "project", project)
    cfg = heads_cfg(epochs=6, efficient_loss=True, topk=4, negatives=16)
    result = train_heads(cfg, LAYERS, NUM_LAYERS, synth.teacher, synth.train, progress=False)
    assert len(subset_sizes) == result.steps * len(LAYERS)
    assert max(subset_sizes) < VOCAB  # a real subset, not the vocabulary in disguise

    monkeypatch.setattr(AdapterHead, "project", original)
    heads = load_heads(cfg, LAYERS, synth.teacher, result.state)
    trained = evaluate_heads(heads, synth.teacher, synth.eval)
    lens = evaluate_heads(logit_lens(synth.teacher, LAYERS), synth.teacher, synth.eval)
    for layer in LAYERS:
        assert trained[layer].agreement > lens[layer].agreement + 0.2, (layer, trained[layer], lens[layer])


def test_offline_efficient_training_from_a_precomputed_top_k_never_computes_teacher_logits(synth, monkeypatch):
    """The product path: the teacher's top-k once per cache, then training reads it by row. Neither
    a step nor the per-epoch probe computes teacher logits, no step builds [n, V] student logits,
    and the heads still beat the logit lens by a wide margin."""
    topk = precompute_topk(synth.teacher, synth.train, 4)

    def no_teacher_logits(self, *args, **kwargs):
        raise AssertionError("offline efficient training computed the teacher's logits")

    original = AdapterHead.project

    def subset_only(self, feats, vocab_idx=None):
        if torch.is_grad_enabled():
            assert vocab_idx is not None, "a training step built [n, V] student logits"
        return original(self, feats, vocab_idx)

    monkeypatch.setattr(TeacherWeights, "logits", no_teacher_logits)
    monkeypatch.setattr(AdapterHead, "project", subset_only)
    cfg = heads_cfg(epochs=6, efficient_loss=True, topk=4, negatives=16)
    result = train_heads(cfg, LAYERS, NUM_LAYERS, synth.teacher, synth.train, progress=False, teacher_topk=topk)
    assert result.steps == 144 and result.epochs[-1].loss < result.epochs[0].loss
    monkeypatch.undo()

    heads = load_heads(cfg, LAYERS, synth.teacher, result.state)
    trained = evaluate_heads(heads, synth.teacher, synth.eval)
    lens = evaluate_heads(logit_lens(synth.teacher, LAYERS), synth.teacher, synth.eval)
    for layer in LAYERS:
        assert trained[layer].agreement > lens[layer].agreement + 0.2, (layer, trained[layer], lens[layer])
        assert trained[layer].agreement > 0.7
    # the probe's teacher top-1 (stored ids[:, 0]) is the teacher's argmax: same agreement as recomputed
    probe = evaluate_heads(heads, synth.teacher, synth.train, max_tokens=2048)
    for layer in LAYERS:
        assert result.epochs[-1].agreement[layer] == pytest.approx(probe[layer].agreement, abs=1e-9)


def test_frequency_proposal_comes_from_the_stored_top_k(synth, monkeypatch):
    """The negatives' proposal is set once, from the teacher mass of the stored top-k's rows
    (all of them in a source this small), with every stored column, not only heads.topk;
    without a stored top-k, from the final states of a shuffled sample; `uniform` sets none."""
    import pipeline.train_heads as train_mod

    seen = []
    real = train_mod.negative_proposal
    monkeypatch.setattr(train_mod, "negative_proposal", lambda mass, power: seen.append((mass, power)) or real(mass, power))
    topk = precompute_topk(synth.teacher, synth.train, 8)
    cfg = heads_cfg(epochs=1, max_steps=2, efficient_loss=True, topk=4, negatives=64, proposal_power=0.7)
    train_heads(cfg, LAYERS, NUM_LAYERS, synth.teacher, synth.train, progress=False, teacher_topk=topk)
    (mass, power), = seen
    want = np.zeros(VOCAB)
    np.add.at(want, topk.ids.ravel(), np.exp(topk.logprobs.astype(np.float64)).ravel())
    np.testing.assert_allclose(mass.numpy(), want, rtol=1e-6)
    assert power == 0.7 and mass.sum() == pytest.approx(synth.train.num_tokens * np.exp(topk.logprobs).sum(1).mean())

    seen.clear()
    train_heads(cfg, LAYERS, NUM_LAYERS, synth.teacher, synth.train, progress=False)  # top-k per batch
    (mass, _), = seen  # from a shuffled sample of rows, not the probe (the first rows)
    sample = next(synth.train.iter_batches(["row"], train_mod.PROBE_ROWS, shuffle=True, seed=cfg.seed,
                                           epoch=train_mod.PROPOSAL_EPOCH))["row"]
    assert not np.array_equal(np.sort(sample), np.arange(len(sample)))
    want = np.zeros(VOCAB)
    np.add.at(want, topk.ids[sample, :4].ravel(), np.exp(topk.logprobs[sample, :4].astype(np.float64)).ravel())
    np.testing.assert_allclose(mass.numpy(), want, rtol=1e-4, atol=1e-6)

    seen.clear()
    train_heads(cfg.model_copy(update={"negative_proposal": "uniform"}), LAYERS, NUM_LAYERS, synth.teacher,
                synth.train, progress=False, teacher_topk=topk)
    assert seen == []


def test_precomputed_and_per_batch_top_k_train_alike(synth):
    """Offline (stored top-k, read by row) and per-batch (top-k of the batch's final states, as
    online) run the same math on the same rows: the same losses up to float rounding. Uniform
    negatives: the frequency proposal is estimated from different row samples on the two paths
    (a spread of the store against the probe), see test_frequency_proposal_comes_from_the_stored_top_k."""
    cfg = heads_cfg(epochs=1, efficient_loss=True, topk=8, negatives=32, loss="mix", negative_proposal="uniform")
    topk = precompute_topk(synth.teacher, synth.train, 16)  # k above heads.topk: the first 8 are used
    stored = train_heads(cfg, LAYERS, NUM_LAYERS, synth.teacher, synth.train, progress=False, teacher_topk=topk)
    per_batch = train_heads(cfg, LAYERS, NUM_LAYERS, synth.teacher, synth.train, progress=False)
    assert stored.epochs[0].loss == pytest.approx(per_batch.epochs[0].loss, rel=1e-4)
    for k in stored.state:
        torch.testing.assert_close(stored.state[k], per_batch.state[k], rtol=1e-3, atol=1e-3)


def test_a_teacher_top_k_that_does_not_fit_is_refused(synth):
    cfg = heads_cfg(epochs=1, efficient_loss=True, topk=8, negatives=8)
    with pytest.raises(ValueError, match="k >= 8"):
        train_heads(cfg, LAYERS, NUM_LAYERS, synth.teacher, synth.small, progress=False,
                    teacher_topk=precompute_topk(synth.teacher, synth.small, 4))
    with pytest.raises(ValueError, match="covers 1024 rows but the source has 6144"):
        train_heads(cfg, LAYERS, NUM_LAYERS, synth.teacher, synth.train, progress=False,
                    teacher_topk=precompute_topk(synth.teacher, synth.small, 8))


@pytest.mark.parametrize("kind,loss,efficient", [("linear", "mix", False), ("adapter", "ce", False),
                                                 ("linear", "ce", True)])
def test_other_head_kinds_and_losses_train(synth, kind, loss, efficient):
    cfg = heads_cfg(kind=kind, loss=loss, epochs=1, layer_weights="proportional", efficient_loss=efficient,
                    topk=4, negatives=16)
    result = train_heads(cfg, [1, 3], NUM_LAYERS, synth.teacher, synth.small, progress=False)
    assert result.steps == 4 and np.isfinite(result.epochs[0].loss)
    assert set(result.epochs[0].agreement) == {1, 3}


# ----------------------------------------------------------------------------- the tiny model


def test_tiny_model_training_plumbing(tiny):
    """The random tiny model's logit lens already agrees with its final layer on ~90 % of
    tokens (its blocks barely move the residual stream), so it cannot show heads beating the
    lens by a margin; the synthetic tests above do. Here: extract -> cache -> train -> load ->
    evaluate runs, the distillation loss falls, and agreement does not get worse."""
    cfg = HeadsConfig(kind="adapter", rank=16, epochs=6, batch_tokens=256, lr=5e-3, warmup_steps=5, efficient_loss=False)
    result = train_heads(cfg, [1, 2, 3], 4, tiny.teacher, tiny.reader, progress=False)
    assert result.steps == 6 * (tiny.reader.num_tokens // 256)
    assert result.epochs[-1].loss < 0.8 * result.epochs[0].loss
    heads = load_heads(cfg, [1, 2, 3], tiny.teacher, result.state)
    trained = evaluate_heads(heads, tiny.teacher, tiny.reader)
    lens = evaluate_heads(logit_lens(tiny.teacher, [1, 2, 3]), tiny.teacher, tiny.reader)
    for layer in (1, 2, 3):
        assert trained[layer].agreement >= lens[layer].agreement - 0.005, (layer, trained[layer], lens[layer])


def test_heads_have_their_own_code_version():
    """A gates change must not invalidate trained heads: the two trainers version separately."""
    from flows.stages.train_gates import TrainGatesStage
    from flows.stages.train_heads import TrainHeadsStage
    from pipeline.train_gates import GATES_CODE_VERSION

    assert HEADS_CODE_VERSION != GATES_CODE_VERSION
    assert TrainHeadsStage.code_version == HEADS_CODE_VERSION and TrainGatesStage.code_version == GATES_CODE_VERSION
