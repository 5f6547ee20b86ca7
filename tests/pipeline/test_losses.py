"""Head losses: KL and CE against references, layer weights, candidate sampling, and the
subset ("efficient") loss: exact at the full vocabulary, never scoring the full vocabulary."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import HeadsConfig
from pipeline.heads import AdapterHead, TeacherWeights, build_heads
from pipeline.losses import (
    Candidates,
    cross_entropy,
    efficient_head_loss,
    head_entropy,
    head_loss,
    kl_distill,
    layer_weights,
    locate_targets,
    sample_candidates,
    topk_agreement,
)

H, V = 16, 40


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny ops gain nothing from a second thread; on a shared 2-core machine it can cost 1000x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_teacher(hidden: int = H, vocab: int = V, seed: int = 0) -> TeacherWeights:
    g = torch.Generator().manual_seed(seed)
    return TeacherWeights.from_dict(
        {
            "lm_head.weight": torch.randn(vocab, hidden, generator=g) / hidden**0.5,
            "final_norm.weight": 0.5 + torch.rand(hidden, generator=g),
        }
    )


# --- KL / CE --------------------------------------------------------------------------------


def test_kl_zero_for_identical_logits():
    x = torch.randn(6, V)
    assert kl_distill(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_distill(x, x + 3.0).item() == pytest.approx(0.0, abs=1e-6)  # shift-invariant


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_kl_matches_torch_reference(temperature):
    s, t = torch.randn(8, V), 2 * torch.randn(8, V)
    ref = F.kl_div(
        F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True, reduction="batchmean"
    ) * temperature**2
    got = kl_distill(s, t, temperature)
    assert got.item() > 0
    torch.testing.assert_close(got, ref)


def test_kl_with_zero_probability_teacher_tokens_is_finite():
    s = torch.randn(3, V, requires_grad=True)
    t = torch.randn(3, V)
    t[:, :5] = float("-inf")
    loss = kl_distill(s, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    ref = F.kl_div(F.log_softmax(s[:, 5:], -1), F.softmax(t[:, 5:], -1), reduction="batchmean")
    assert loss.item() > ref.item()  # the student's mass on the masked tokens is a real cost


def test_cross_entropy_ignores_minus_one():
    x = torch.randn(6, V)
    y = torch.tensor([3, -1, 7, -1, 0, 39])
    keep = y != -1
    torch.testing.assert_close(cross_entropy(x, y), F.cross_entropy(x[keep], y[keep]))
    x.requires_grad_()
    none = cross_entropy(x, torch.full((6,), -1))
    none.backward()
    assert none.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def test_head_loss_kinds():
    s, t = torch.randn(5, V), torch.randn(5, V)
    y = torch.tensor([1, 2, -1, 4, 5])
    kl, ce = kl_distill(s, t, 2.0), cross_entropy(s, y)
    torch.testing.assert_close(head_loss(s, t, y, HeadsConfig(loss="kl", temperature=2.0)), kl)
    torch.testing.assert_close(head_loss(s, t, y, HeadsConfig(loss="ce")), ce)
    mix = head_loss(s, t, y, HeadsConfig(loss="mix", ce_weight=0.25, temperature=2.0))
    torch.testing.assert_close(mix, 0.75 * kl + 0.25 * ce)


# --- layer weights --------------------------------------------------------------------------


def test_layer_weights():
    assert layer_weights([6, 12, 18, 24], 30, "uniform") == [1.0] * 4
    raw = layer_weights([6, 12, 18, 24], 30, "proportional", normalize=False)
    assert raw == pytest.approx([0.2, 0.4, 0.6, 0.8])  # w = l / L for 1-based layer l ((i+1)/L, i = l-1)
    assert layer_weights([30], 30, "proportional", normalize=False) == [1.0]  # the last layer weighs 1
    norm = layer_weights([6, 12, 18, 24], 30, "proportional")
    assert norm == pytest.approx([0.4, 0.8, 1.2, 1.6])
    assert sum(norm) / len(norm) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="outside"):
        layer_weights([0, 12], 30, "proportional")


# --- candidates -----------------------------------------------------------------------------


def test_sample_candidates_contains_topk_and_targets():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(10, 1000)
    top = teacher.topk(5, -1).indices
    targets = torch.randint(0, 1000, (10,))
    targets[3] = -1
    idx = sample_candidates(top, targets, 1000, negatives=50, generator=g)
    assert idx.dtype == torch.long and idx.ndim == 1
    assert torch.equal(idx, torch.unique(idx))  # sorted, no duplicates
    assert 0 <= idx.min() and idx.max() < 1000
    assert set(top.flatten().tolist()) <= set(idx.tolist())
    assert set(targets[targets >= 0].tolist()) <= set(idx.tolist())
    assert idx.numel() >= len(set(top.flatten().tolist()) | set(targets[targets >= 0].tolist())) + 10
    again = sample_candidates(top, targets, 1000, negatives=50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(idx, again)


def test_locate_targets():
    cand = torch.tensor([9, 2, 30, 4])  # any order
    targets = torch.tensor([4, 5, -1, 9, 30])
    assert locate_targets(cand, targets).tolist() == [3, -1, -1, 0, 2]


def test_candidates_from_teacher_logits():
    teacher = torch.randn(6, V)
    targets = torch.tensor([1, 2, 3, -1, 5, 6])
    c = Candidates.from_teacher_logits(teacher, targets, topk=3, negatives=4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(c.teacher_logits, teacher[:, c.idx])
    valid = targets >= 0
    assert torch.equal(c.idx[c.target_pos[valid]], targets[valid])
    assert c.target_pos[~valid].tolist() == [-1]


# --- efficient loss -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "adapter"])
@pytest.mark.parametrize("loss", ["kl", "ce", "mix"])
def test_efficient_loss_equals_full_loss_on_whole_vocab(kind, loss):
    teacher = make_teacher()
    cfg = HeadsConfig(kind=kind, rank=4, loss=loss, temperature=1.5)
    head = build_heads(cfg, [3], teacher)["3"]
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    h, f = torch.randn(9, H), torch.randn(9, H)
    targets = torch.randint(0, V, (9,))
    targets[0] = -1
    teacher_logits = teacher.logits(f)  # [n, V]

    full = head_loss(head(h), teacher_logits, targets, cfg)
    full_grads = torch.autograd.grad(full, list(head.parameters()))
    perm = torch.randperm(V)  # the candidate order must not matter
    eff = efficient_head_loss(head, head.features(h), perm, teacher_logits[:, perm], targets, cfg)
    eff_grads = torch.autograd.grad(eff, list(head.parameters()))
    torch.testing.assert_close(eff, full)
    for a, b in zip(eff_grads, full_grads):
        torch.testing.assert_close(a, b)


class _SubsetOnlyHead(AdapterHead):
    """A head that fails if anyone asks it for full-vocabulary logits."""

    def project(self, feats, vocab_idx=None):
        assert vocab_idx is not None, "the efficient loss asked for [n, V] student logits"
        out = super().project(feats, vocab_idx)
        self.scored = out.shape
        return out


def test_efficient_loss_never_scores_the_full_vocab():
    vocab, n = 200_000, 8
    teacher = make_teacher(vocab=vocab)
    head = _SubsetOnlyHead(4, teacher, rank=4)
    h, f = torch.randn(n, H), torch.randn(n, H)
    targets = torch.randint(0, vocab, (n,))
    cfg = HeadsConfig(loss="mix", topk=16, negatives=256)
    teacher_logits = teacher.logits(f)  # [n, V]: the teacher side, once per batch for all heads
    c = Candidates.from_teacher_logits(teacher_logits, targets, cfg.topk, cfg.negatives, torch.Generator().manual_seed(0))

    start = time.perf_counter()
    for _ in range(20):
        loss = efficient_head_loss(head, head.features(h), c.idx, c.teacher_logits, targets, cfg, target_pos=c.target_pos)
        loss.backward()
    elapsed = time.perf_counter() - start
    assert head.scored == (n, c.idx.numel()) and c.idx.numel() <= n * cfg.topk + n + cfg.negatives
    assert torch.isfinite(loss)
    assert elapsed < 2.0, f"20 subset steps took {elapsed:.2f}s; something scores the full vocabulary"


def test_efficient_loss_rejects_misaligned_teacher():
    teacher = make_teacher()
    head = build_heads(HeadsConfig(rank=4), [1], teacher)["1"]
    with pytest.raises(ValueError, match="cand_idx"):
        efficient_head_loss(head, torch.randn(3, H), torch.arange(5), torch.randn(3, 4), torch.zeros(3, dtype=torch.long), HeadsConfig())


# --- metrics --------------------------------------------------------------------------------


def test_topk_agreement():
    t = torch.eye(4) * 5
    s = t.clone()
    s[0] = torch.tensor([0.0, 9.0, 0.0, 0.0])
    assert topk_agreement(s, t) == pytest.approx(0.75)
    assert topk_agreement(t, t) == 1.0


def test_head_entropy():
    uniform = torch.zeros(2, V)
    torch.testing.assert_close(head_entropy(uniform), torch.full((2,), math.log(V)))
    peaked = torch.zeros(1, V)
    peaked[0, 3] = 1e4
    assert head_entropy(peaked).item() == pytest.approx(0.0, abs=1e-6)
    x = 3 * torch.randn(5, V)
    x[:, 0] = float("-inf")
    torch.testing.assert_close(head_entropy(x), torch.distributions.Categorical(logits=x).entropy())
