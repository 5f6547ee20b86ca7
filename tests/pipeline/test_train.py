"""Training of heads and gates: real training on small caches (synthetic with a known teacher,
and the tiny random Llama), determinism, exact resume, divergence, the online source."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.config import GatesConfig, HeadsConfig
from pipeline.heads import AdapterHead, load_heads
from pipeline.teacher import TeacherWeights
from pipeline.teacher import TeacherTopK, compute_teacher_topk
from pipeline.train import (
    OnlineSource,
    TrainingDiverged,
    CheckpointMismatch,
    _WarmupCosine,
    collect_exit_labels,
    evaluate_heads,
    heldout_mask,
    logit_lens,
    train_gates,
    train_heads,
)
from stores.cache import CacheReader, CacheSchema, CacheWriter
from stores.checkpoints import FileCheckpoints

HIDDEN, VOCAB, LAYERS, NUM_LAYERS = 32, 512, [1, 2, 3], 4




# ----------------------------------------------------------------------------- sources


class ArraySource:
    """In-memory `BatchSource`: every row once per epoch, order a function of (seed, epoch)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.num_tokens = len(arrays["targets"])

    def num_batches(self, batch_rows: int, drop_last: bool = False) -> int:
        return self.num_tokens // batch_rows if drop_last else -(-self.num_tokens // batch_rows)

    def iter_batches(self, names, batch_rows, *, shuffle=True, buffer_chunks=4, seed=0, epoch=0, drop_last=False,
                     start_batch=0):
        n = self.num_tokens
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        for b, a in enumerate(range(0, n, batch_rows)):
            idx = order[a : a + batch_rows]
            if len(idx) < batch_rows and drop_last:
                return
            if b >= start_batch:
                yield {k: idx.astype(np.int64) if k == "row" else self.arrays[k][idx] for k in names}


class Faulty:
    """Wraps a source; at (epoch, batch) calls `fault(batch)` (which may raise or corrupt it)."""

    def __init__(self, source, epoch: int, batch: int, fault):
        self.source, self.epoch, self.batch, self.fault = source, epoch, batch, fault
        self.num_tokens = source.num_tokens

    def num_batches(self, *a, **k):
        return self.source.num_batches(*a, **k)

    def iter_batches(self, names, batch_rows, **kw):
        for i, batch in enumerate(self.source.iter_batches(names, batch_rows, **kw)):
            if kw.get("shuffle", True) and kw.get("epoch", 0) == self.epoch and i == self.batch:
                batch = self.fault(batch)
            yield batch


class Crash(Exception):
    pass


def crash(batch):
    raise Crash("killed")


def write_cache(path: Path, arrays: dict[str, np.ndarray], chunk_rows: int = 512) -> CacheReader:
    n = len(arrays["targets"])
    layers = tuple(int(k.split("_")[1]) for k in arrays if k.startswith("layer_"))
    schema = CacheSchema(num_tokens=n, hidden_size=arrays["final"].shape[1], layers=layers,
                         storage_dtype="float16", chunk_rows=chunk_rows)
    cols = {"input_ids": np.zeros(n, np.int32), "doc_ids": np.zeros(n, np.int32),
            "positions": np.zeros(n, np.int32)}
    with CacheWriter(path, schema, {"key": path.name}) as w:
        for a in range(0, n, chunk_rows):
            w.append({k: v[a : a + chunk_rows] for k, v in {**arrays, **cols}.items()})
        w.finish()
    return CacheReader(path)


# ----------------------------------------------------------------------------- synthetic data


def make_teacher(seed: int = 0) -> TeacherWeights:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(VOCAB, HIDDEN, generator=g) * (3.0 / HIDDEN**0.5)  # teacher logits ~ N(0, 9)
    w[:, 0] = 0.0  # dimension 0 never moves a logit: the gate data uses it as a marker
    return TeacherWeights(lm_head=w, final_norm=torch.ones(HIDDEN))


def make_rows(teacher: TeacherWeights, n: int, seed: int) -> dict[str, np.ndarray]:
    """Final states f and layer states f @ (I + s_l U V^T) * 4: a rank-4 distortion, strongest
    at the shallowest layer, which the logit lens suffers from and a rank-8 adapter can undo
    exactly. The distortions are fixed (seed 0); `seed` draws the tokens."""
    fixed = np.random.default_rng(0)
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((n, HIDDEN)).astype(np.float32)  # [n, H]
    f[:, 0] = 0.0
    out = {"final": f}
    for layer, s in zip(LAYERS, (1.5, 1.0, 0.5)):
        u, v = fixed.standard_normal((2, HIDDEN, 4)) / HIDDEN**0.5
        a = np.eye(HIDDEN) + s * (u @ v.T) * 2  # [H, H]
        noise = 0.02 * rng.standard_normal((n, HIDDEN))
        out[f"layer_{layer}"] = ((f @ a + noise) * 4).astype(np.float32)  # [n, H]
    logits = torch.from_numpy(f) @ teacher.lm_head.T  # [n, V]
    targets = torch.multinomial(torch.softmax(logits, -1), 1, generator=torch.Generator().manual_seed(seed))
    targets = targets.squeeze(1).numpy().astype(np.int32)  # [n]
    targets[::500] = -1
    out["targets"] = targets
    return out


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    teacher = make_teacher()
    root = tmp_path_factory.mktemp("synth")
    return SimpleNamespace(
        teacher=teacher,
        train=write_cache(root / "train", make_rows(teacher, 6144, seed=1)),
        eval=write_cache(root / "eval", make_rows(teacher, 2048, seed=2)),
        small=ArraySource(make_rows(teacher, 1024, seed=3)),
    )


def heads_cfg(**kw) -> HeadsConfig:
    base = dict(kind="adapter", rank=8, epochs=2, batch_tokens=256, lr=3e-2, warmup_steps=5, weight_decay=0.0)
    return HeadsConfig(**{**base, **kw})


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


def precompute_topk(teacher: TeacherWeights, source, k: int) -> TeacherTopK:
    ids, logprobs = np.zeros((source.num_tokens, k), np.int32), np.zeros((source.num_tokens, k), np.float32)
    compute_teacher_topk(teacher, source, k, ids, logprobs, batch_rows=1000, progress=False)
    return TeacherTopK(ids=ids, logprobs=logprobs)


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
    import pipeline.train as train_mod

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


# ----------------------------------------------------------------------------- determinism, resume


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


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
    assert [(e.epoch, e.loss, e.agreement) for e in resumed.epochs] == \
        [(e.epoch, e.loss, e.agreement) for e in straight.epochs]

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
    f = _WarmupCosine(warmup=4, total=20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(12) == pytest.approx(0.5) and f(20) == pytest.approx(0.0)
    values = [f(s) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_max_steps_is_spread_over_the_epochs(synth):
    # 1024 rows / 256 = 4 batches per epoch; 5 steps over 3 epochs -> 2 + 2 + 1
    result = train_heads(heads_cfg(epochs=3, max_steps=5), LAYERS, NUM_LAYERS, synth.teacher, synth.small,
                         progress=False)
    assert result.steps == 5 and [e.tokens for e in result.epochs] == [512, 512, 256]


# ----------------------------------------------------------------------------- divergence


def inject_inf(batch):
    batch = dict(batch)
    batch["layer_2"] = batch["layer_2"].copy()
    batch["layer_2"][0, 0] = np.inf
    return batch


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


# ----------------------------------------------------------------------------- evaluation pieces


def test_collect_exit_labels_agree_with_evaluate_heads(synth):
    heads = logit_lens(synth.teacher, LAYERS)
    labels = collect_exit_labels(heads, synth.teacher, synth.small, max_tokens=700, batch_rows=256)
    assert np.array_equal(labels["row"], np.arange(700))
    ev = evaluate_heads(heads, synth.teacher, synth.small, max_tokens=700, batch_rows=300)
    for layer in LAYERS:
        c, ct, ent = labels[f"correct_{layer}"], labels[f"correct_true_{layer}"], labels[f"entropy_{layer}"]
        assert c.dtype == bool and ct.dtype == bool and ent.dtype == np.float32 and len(c) == 700
        assert ev[layer].agreement == pytest.approx(c.mean())
        assert ev[layer].accuracy == pytest.approx(ct[labels["has_target"]].mean())
        assert ev[layer].mean_entropy == pytest.approx(ent.mean(), rel=1e-5)
        assert 0 <= ev[layer].entropy_auroc <= 1


def test_heldout_mask_is_a_stable_tenth():
    rows = np.arange(200_000)
    mask = heldout_mask(rows)
    assert abs(mask.mean() - 0.1) < 0.005
    assert np.array_equal(heldout_mask(rows[::-1]), mask[::-1])  # a function of the row alone
    assert abs(mask.reshape(-1, 250)[:, :10].mean() - 0.1) < 0.01  # not tied to positions in a sequence


# ----------------------------------------------------------------------------- gates


def make_gate_rows(teacher: TeacherWeights, n: int, seed: int) -> dict[str, np.ndarray]:
    """Per layer, a row is easy (its state is the final state: the logit lens is right) or hard
    (a random state: almost always wrong); dimension 0, which moves no logit, says which. So
    whether a head is correct is learnable from its layer's state."""
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((n, HIDDEN)).astype(np.float32)
    f[:, 0] = 0.0
    out = {"final": f, "targets": rng.integers(0, VOCAB, n).astype(np.int32)}
    for layer, p_easy in zip(LAYERS, (0.3, 0.5, 0.7)):
        easy = rng.random(n) < p_easy
        x = np.where(easy[:, None], f, rng.standard_normal((n, HIDDEN)).astype(np.float32))
        x[:, 0] = np.where(easy, 3.0, -3.0)
        out[f"layer_{layer}"] = x.astype(np.float32)
    return out


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


# ----------------------------------------------------------------------------- the tiny model


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, corpus_dir, tmp_path_factory):
    from pipeline.backbone import load_backbone
    from pipeline.config import DataConfig, ModelConfig
    from pipeline.data import load_corpus, pack_split
    from pipeline.extract import chunk_rows_for, extract_hidden_states

    backbone = load_backbone(ModelConfig(source=str(tiny_model_dir)))
    dcfg = DataConfig(source=str(corpus_dir), seq_len=32)
    split = pack_split(load_corpus(dcfg), backbone.tokenizer, "train", dcfg, backbone.tokenizer_fingerprint)
    n_seq = min(96, split.input_ids.shape[0])
    path = tmp_path_factory.mktemp("tiny-cache") / "train"
    schema = CacheSchema(num_tokens=n_seq * 32, hidden_size=backbone.hidden_size, layers=(1, 2, 3),
                         storage_dtype="float16", chunk_rows=chunk_rows_for(32, 256))
    with CacheWriter(path, schema, {"key": "tiny"}) as w:
        extract_hidden_states(backbone, split, [1, 2, 3], w, batch_size=16, max_sequences=n_seq, progress=False)
        w.finish()
    teacher = TeacherWeights.from_dict(backbone.teacher_weights(), norm_eps=backbone.final_norm_eps)
    return SimpleNamespace(backbone=backbone, split=split, n_seq=n_seq, reader=CacheReader(path), teacher=teacher)


def test_tiny_model_training_plumbing(tiny):
    """The random tiny model's logit lens already agrees with its final layer on ~90 % of
    tokens (its blocks barely move the residual stream), so it cannot show heads beating the
    lens by a margin; the synthetic tests above do. Here: extract -> cache -> train -> load ->
    evaluate runs, the distillation loss falls, and agreement does not get worse."""
    cfg = HeadsConfig(kind="adapter", rank=16, epochs=6, batch_tokens=256, lr=5e-3, warmup_steps=5)
    result = train_heads(cfg, [1, 2, 3], 4, tiny.teacher, tiny.reader, progress=False)
    assert result.steps == 6 * (tiny.reader.num_tokens // 256)
    assert result.epochs[-1].loss < 0.8 * result.epochs[0].loss
    heads = load_heads(cfg, [1, 2, 3], tiny.teacher, result.state)
    trained = evaluate_heads(heads, tiny.teacher, tiny.reader)
    lens = evaluate_heads(logit_lens(tiny.teacher, [1, 2, 3]), tiny.teacher, tiny.reader)
    for layer in (1, 2, 3):
        assert trained[layer].agreement >= lens[layer].agreement - 0.005, (layer, trained[layer], lens[layer])


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


def test_online_source_yields_the_cached_rows(tiny):
    online = OnlineSource(tiny.backbone, tiny.split, [1, 2, 3], sequences_per_forward=8, max_sequences=tiny.n_seq)
    assert online.num_tokens == tiny.reader.num_tokens
    names = ["layer_1", "layer_3", "final", "targets", "row"]
    batches = list(online.iter_batches(names, 200, seed=3, epoch=1))
    assert [len(b["row"]) for b in batches] == [200] * (online.num_tokens // 200) + [online.num_tokens % 200]
    rows = np.concatenate([b["row"] for b in batches])
    assert np.array_equal(np.sort(rows), np.arange(online.num_tokens))  # every row once
    assert not np.array_equal(rows, np.arange(online.num_tokens))  # shuffled
    for name in ("layer_1", "layer_3", "final"):
        got = np.concatenate([b[name] for b in batches])
        np.testing.assert_allclose(got, tiny.reader.hidden(name, rows), rtol=2e-3, atol=2e-3)  # float16 cache
    np.testing.assert_array_equal(np.concatenate([b["targets"] for b in batches]), tiny.reader.column("targets", rows))

    # keyed by row, the shuffled cache gives the same rows as the shuffled online source
    cached = list(tiny.reader.iter_batches(names, 200, seed=3, epoch=1))
    crow = np.concatenate([b["row"] for b in cached])
    assert np.array_equal(np.sort(crow), np.arange(online.num_tokens))
    for name in ("layer_1", "final"):
        by_row_cache = np.concatenate([b[name] for b in cached])[np.argsort(crow)]
        by_row_online = np.concatenate([b[name] for b in batches])[np.argsort(rows)]
        np.testing.assert_allclose(by_row_cache, by_row_online, rtol=2e-3, atol=2e-3)

    # same (seed, epoch) -> same order; start_batch skips exactly; another epoch reshuffles
    again = list(online.iter_batches(["row"], 200, seed=3, epoch=1, start_batch=3))
    assert all(np.array_equal(a["row"], b["row"]) for a, b in zip(again, batches[3:]))
    assert len(again) == len(batches) - 3
    other = np.concatenate([b["row"] for b in online.iter_batches(["row"], 200, seed=3, epoch=2)])
    assert not np.array_equal(other, rows)
    with pytest.raises(ValueError, match="layer_2.*available"):
        next(OnlineSource(tiny.backbone, tiny.split, [1], max_sequences=2).iter_batches(["layer_2"], 8))


def test_online_training_and_gates_run_end_to_end(tiny):
    online = OnlineSource(tiny.backbone, tiny.split, [1, 3], sequences_per_forward=16, max_sequences=32)
    cfg = HeadsConfig(kind="adapter", rank=8, epochs=1, batch_tokens=256, warmup_steps=1)
    result = train_heads(cfg, [1, 3], 4, tiny.teacher, online, progress=False)
    assert result.steps == 4 and set(result.epochs[0].agreement) == {1, 3}
    heads = load_heads(cfg, [1, 3], tiny.teacher, result.state)
    gates = train_gates(GatesConfig(epochs=1, batch_tokens=256), heads, [1, 3], 4, tiny.teacher, online,
                        progress=False)
    assert set(gates.auroc) == {1, 3} and gates.steps == 4


def test_pipeline_train_imports_neither_zarr_nor_prefect():
    code = "import sys, pipeline.train; bad = {'zarr', 'prefect'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
