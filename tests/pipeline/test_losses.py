"""Head losses: KL and CE against references, layer weights, per-row top-k candidates, and the
per-row top-k ("efficient") loss: exact at the full vocabulary, equal to a row-by-row reference
with duplicates removed, finite with masked entries, never scoring the full vocabulary."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import HeadsConfig
from pipeline.heads import AdapterHead, build_heads
from pipeline.teacher import TeacherWeights
from pipeline.losses import (
    PROPOSAL_UNIFORM_SHARE,
    TopkCandidates,
    cross_entropy,
    head_entropy,
    head_loss,
    inclusion_probabilities,
    kl_distill,
    layer_weights,
    negative_proposal,
    topk_agreement,
    topk_distill_loss,
)

H, V = 16, 40




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


# --- per-row top-k candidates ----------------------------------------------------------------


def teacher_topk(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference top-k: ids [n, k] and full-softmax log-probs [n, k], by decreasing probability."""
    values, ids = teacher_logits.topk(k, dim=-1)
    return ids, values - teacher_logits.logsumexp(-1, keepdim=True)


def test_topk_candidates_layout_and_duplicates():
    vocab, n, k, m = 1000, 12, 5, 300
    logits = 3 * torch.randn(n, vocab)
    ids, logprobs = teacher_topk(logits, k)
    targets = torch.randint(0, vocab, (n,))
    targets[0] = -1
    targets[1] = ids[1, 3]  # a target inside the row's top-k
    c = TopkCandidates.build(ids, logprobs, targets, vocab, m, with_target=True,
                             generator=torch.Generator().manual_seed(0))
    assert c.row_ids.shape == (n, k + 1) and c.negatives.shape == (m,) and c.valid.shape == (n, k + 1 + m)
    assert len(set(c.negatives.tolist())) == m  # drawn without replacement
    assert torch.equal(c.row_ids[:, :k], ids) and c.valid[:, :k].all()
    torch.testing.assert_close(c.teacher_logits[:, :k], logprobs)
    assert c.teacher_logits.shape == (n, k)  # no teacher mass outside the top-k columns
    for i in range(n):
        cols = torch.cat([c.row_ids[i], c.negatives])  # [c] token of each column
        kept = cols[c.valid[i]].tolist()
        # every token at most once, and nothing lost: top-k, target (if any) and all negatives
        assert len(kept) == len(set(kept))
        want = set(ids[i].tolist()) | set(c.negatives.tolist()) | ({int(targets[i])} if targets[i] >= 0 else set())
        assert set(kept) == want
        if targets[i] < 0:
            assert c.target_pos[i] == -1
        else:
            assert cols[c.target_pos[i]] == targets[i] and c.valid[i, c.target_pos[i]]
    assert c.target_pos[1] == 3  # inside the top-k: no extra column used
    # own columns count once, each negative for V / m tokens
    assert torch.equal(c.log_weight[: k + 1], torch.zeros(k + 1))
    torch.testing.assert_close(c.log_weight[k + 1 :], torch.full((m,), math.log(vocab / m)))
    again = TopkCandidates.build(ids, logprobs, targets, vocab, m, with_target=True,
                                 generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.negatives, c.negatives) and torch.equal(again.valid, c.valid)

    kl_only = TopkCandidates.build(ids, logprobs, targets, vocab, m, with_target=False)
    assert kl_only.row_ids.shape == (n, k) and kl_only.valid.shape == (n, k + m)
    for i in range(n):  # without a target column, a negative equal to the target stays a candidate
        kept = torch.cat([kl_only.row_ids[i], kl_only.negatives])[kl_only.valid[i]].tolist()
        assert len(kept) == len(set(kept)) and set(kept) == set(ids[i].tolist()) | set(kl_only.negatives.tolist())


def test_negative_proposal_follows_the_mass_with_a_uniform_floor():
    mass = torch.tensor([0.0, 1.0, 4.0, 16.0, 0.0, 0.0, 0.0, 0.0])
    q = negative_proposal(mass, power=0.5)
    u = PROPOSAL_UNIFORM_SHARE
    want = (1 - u) * torch.tensor([0, 1, 2, 4, 0, 0, 0, 0.0]) / 7 + u / 8
    torch.testing.assert_close(q, want)
    assert q.sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(negative_proposal(mass, power=0.0), torch.full((8,), 1 / 8))  # power 0: uniform
    torch.testing.assert_close(negative_proposal(torch.zeros(8)), torch.full((8,), 1 / 8))  # no mass: uniform
    with pytest.raises(ValueError, match="not finite"):
        negative_proposal(torch.tensor([1.0, float("nan")]))


def test_inclusion_probabilities_sum_to_the_sample_size_and_cap_at_one():
    q = negative_proposal(torch.tensor([0.0] * 6 + [1.0, 100.0, 400.0, 10000.0]), power=1.0)
    pi = inclusion_probabilities(q, 4)
    assert pi.sum().item() == pytest.approx(4.0) and (pi <= 1).all() and (pi > 0).all()
    assert pi[-1] == 1.0  # its share would exceed 1: taken every time
    rest = pi < 1
    torch.testing.assert_close(pi[rest] / q[rest].double(), torch.full((int(rest.sum()),), float(pi[0] / q[0]),
                                                                      dtype=torch.float64))  # proportional
    assert torch.equal(inclusion_probabilities(q, 10), torch.ones(10, dtype=torch.float64))


def test_proposal_negatives_are_distinct_and_their_weights_make_an_unbiased_sum():
    """Exactly `negatives` distinct ids a batch; token v is in with probability pi_v and weighs
    1 / pi_v, so sum over the drawn of x / pi estimates sum(x) without bias (the partition
    function), and the empirical inclusion rate matches pi."""
    vocab, m, trials = 40, 12, 4000
    q = negative_proposal(torch.arange(vocab, dtype=torch.float) ** 2)
    pi = inclusion_probabilities(q, m)
    x = torch.rand(vocab, dtype=torch.float64) + 0.5  # stands for exp(student logit)
    ids, lp = teacher_topk(torch.randn(3, vocab), 2)
    gen = torch.Generator().manual_seed(0)
    estimates, counts = [], torch.zeros(vocab, dtype=torch.float64)
    for _ in range(trials):
        c = TopkCandidates.build(ids, lp, torch.zeros(3, dtype=torch.long), vocab, m, with_target=False,
                                 generator=gen, inclusion=pi)
        neg = c.negatives
        assert neg.numel() == m and len(set(neg.tolist())) == m
        w = c.log_weight[2:].double().exp()  # [m] 1 / pi
        torch.testing.assert_close(w, 1 / pi[neg], rtol=1e-5, atol=0)
        estimates.append(float((x[neg] * w).sum()))
        counts[neg] += 1
    est = torch.tensor(estimates, dtype=torch.float64)
    assert abs(est.mean().item() - x.sum().item()) < 4 * est.std().item() / trials ** 0.5
    assert (counts / trials - pi).abs().max().item() < 4 * (0.25 / trials) ** 0.5


def test_inclusion_probabilities_for_another_sample_size_are_rejected():
    q = negative_proposal(torch.arange(40, dtype=torch.float))
    ids, lp = teacher_topk(torch.randn(3, 40), 2)
    with pytest.raises(ValueError, match="inclusion_probabilities"):
        TopkCandidates.build(ids, lp, torch.zeros(3, dtype=torch.long), 40, 12, with_target=False,
                             inclusion=inclusion_probabilities(q, 8))


def test_topk_candidates_reject_misaligned_inputs():
    with pytest.raises(ValueError, match=r"\[n, k\], \[n, k\] and \[n\]"):
        TopkCandidates.build(torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 5), torch.zeros(3, dtype=torch.long),
                             V, 2, with_target=False)


# --- per-row top-k loss ---------------------------------------------------------------------


def perturbed_head(teacher: TeacherWeights, kind: str, layer: int = 3):
    head = build_heads(HeadsConfig(kind=kind, rank=4), [layer], teacher)[str(layer)]
    with torch.no_grad():  # away from init, so the checks are not about the teacher only
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return head


@pytest.mark.parametrize("kind", ["linear", "adapter"])
@pytest.mark.parametrize("loss", ["kl", "ce", "mix"])
def test_topk_loss_equals_full_loss_when_k_is_the_vocabulary(kind, loss):
    teacher = make_teacher()
    cfg = HeadsConfig(kind=kind, rank=4, loss=loss, temperature=1.5, efficient_loss=True)
    head = perturbed_head(teacher, kind)
    h, f = torch.randn(9, H), torch.randn(9, H)
    targets = torch.randint(0, V, (9,))
    targets[0] = -1
    teacher_logits = teacher.logits(f)  # [n, V]

    full = head_loss(head(h), teacher_logits, targets, cfg)
    full_grads = torch.autograd.grad(full, list(head.parameters()))
    ids, logprobs = teacher_topk(teacher_logits, V)  # every token, each row in its own order
    cand = TopkCandidates.build(ids, logprobs, targets, V, 0, with_target=loss != "kl")
    eff = topk_distill_loss(head, head.features(h), cand, cfg)
    eff_grads = torch.autograd.grad(eff, list(head.parameters()))
    torch.testing.assert_close(eff, full)
    for a, b in zip(eff_grads, full_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("loss", ["kl", "mix"])
def test_topk_loss_equals_a_row_by_row_reference(loss):
    """Each row: teacher = its top-k renormalised; student = softmax over the distinct tokens of
    {its top-k, its target (mix), the negatives}, duplicates counted once, and each negative
    that is not one of the row's own tokens weighted V / m in the partition function."""
    teacher = make_teacher(vocab=60)
    cfg = HeadsConfig(rank=4, loss=loss, ce_weight=0.3, temperature=2.0)
    head = perturbed_head(teacher, "adapter")
    n, k, m = 7, 6, 25
    h, f = torch.randn(n, H), torch.randn(n, H)
    teacher_logits = teacher.logits(f)
    ids, logprobs = teacher_topk(teacher_logits, k)
    targets = torch.randint(0, 60, (n,))
    targets[2], targets[4] = -1, ids[4, 1]
    cand = TopkCandidates.build(ids, logprobs, targets, 60, m, with_target=loss != "kl",
                                generator=torch.Generator().manual_seed(3))
    assert (~cand.valid).any(), "the draw should produce duplicates to mask"
    got = topk_distill_loss(head, head.features(h), cand, cfg)

    student = head(h)  # [n, V] reference logits
    t = cfg.temperature
    kls, ces = [], []
    log_w = math.log(60 / m)
    for i in range(n):
        own = set(ids[i].tolist()) | ({int(targets[i])} if loss != "kl" and targets[i] >= 0 else set())
        tokens = torch.tensor(sorted(own | set(cand.negatives.tolist())))
        weight = torch.tensor([0.0 if tok in own else log_w for tok in tokens.tolist()])
        log_q = F.log_softmax(student[i, tokens] / t + weight, -1)
        log_p = F.log_softmax(logprobs[i] / t, -1)  # the top-k, renormalised
        pos = torch.searchsorted(tokens, ids[i])
        kls.append((log_p.exp() * (log_p - log_q[pos])).sum() * t * t)
        if targets[i] >= 0:
            ces.append(-F.log_softmax(student[i, tokens] + weight, -1)[torch.searchsorted(tokens, targets[i])])
    kl = torch.stack(kls).mean()
    want = kl if loss == "kl" else (1 - cfg.ce_weight) * kl + cfg.ce_weight * torch.stack(ces).mean()
    torch.testing.assert_close(got, want)


def test_topk_loss_is_finite_with_masked_entries_and_gradients_flow():
    teacher = make_teacher()
    cfg = HeadsConfig(rank=4, loss="mix")
    head = perturbed_head(teacher, "adapter")
    n, k = 6, 8
    h, f = torch.randn(n, H), torch.randn(n, H)
    ids, logprobs = teacher_topk(teacher.logits(f), k)
    logprobs[0, -1] = float("-inf")  # a top-k token without teacher mass
    targets = ids[:, 0].clone()
    targets[1], targets[2] = -1, (ids[2].max() + 1) % V
    # every token is a negative: all duplicates of the top-k and targets are masked
    cand = TopkCandidates.build(ids, logprobs, targets, V, V, with_target=True)
    assert (~cand.valid).sum() >= n * k
    loss = topk_distill_loss(head, head.features(h), cand, cfg)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    for name, p in head.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    assert head.up.weight.grad.abs().sum() > 0 and head.down.weight.grad is not None


class _SubsetOnlyHead(AdapterHead):
    """A head that fails if anyone asks it for full-vocabulary logits."""

    def project(self, feats, vocab_idx=None):
        assert vocab_idx is not None, "the efficient loss asked for [n, V] student logits"
        out = super().project(feats, vocab_idx)
        self.scored = out.shape
        return out


def test_topk_loss_never_scores_the_full_vocab():
    vocab, n = 200_000, 8
    teacher = make_teacher(vocab=vocab)
    head = _SubsetOnlyHead(4, teacher, rank=4)
    h, f = torch.randn(n, H), torch.randn(n, H)
    targets = torch.randint(0, vocab, (n,))
    cfg = HeadsConfig(loss="mix", topk=16, negatives=256)
    ids, logprobs = teacher_topk(teacher.logits(f), cfg.topk)  # the teacher side: precomputed in training
    cand = TopkCandidates.build(ids, logprobs, targets, vocab, cfg.negatives, with_target=True,
                                generator=torch.Generator().manual_seed(0))

    start = time.perf_counter()
    for _ in range(20):
        loss = topk_distill_loss(head, head.features(h), cand, cfg)
        loss.backward()
    elapsed = time.perf_counter() - start
    assert head.scored == (n, cfg.negatives) and cand.valid.shape == (n, cfg.topk + 1 + cfg.negatives)
    assert torch.isfinite(loss)
    assert elapsed < 2.0, f"20 top-k steps took {elapsed:.2f}s; something scores the full vocabulary"


def test_topk_loss_rejects_misaligned_feats():
    teacher = make_teacher()
    head = build_heads(HeadsConfig(rank=4), [1], teacher)["1"]
    ids, logprobs = teacher_topk(torch.randn(3, V), 4)
    cand = TopkCandidates.build(ids, logprobs, torch.zeros(3, dtype=torch.long), V, 2, with_target=False)
    with pytest.raises(ValueError, match="same batch rows"):
        topk_distill_loss(head, torch.randn(5, H), cand, HeadsConfig())


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
