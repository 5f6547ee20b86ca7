"""Exit heads: shapes, logit-lens initialisation, the frozen shared LM head, subset scoring,
save/load, and a short training run on a target the heads can represent."""

from __future__ import annotations

import io
import time
from dataclasses import replace

import pytest
import torch

from pipeline.config import HeadsConfig
from pipeline.heads import (
    AdapterHead,
    LinearHead,
    build_heads,
    heads_state_dict,
    load_heads,
)
from pipeline.losses import head_loss
from pipeline.teacher import TeacherWeights

H, V, LAYERS = 16, 50, [2, 3]
KINDS = ["linear", "adapter"]




NORMS = {  # name -> (kind, weight offset, norm bias): every convention heads must rebuild
    "rms": ("rms", 0.0, False),
    "layer_bias": ("layer", 0.0, True),
    "layer": ("layer", 0.0, False),
    "gemma": ("rms", 1.0, False),
}


def make_teacher(hidden: int = H, vocab: int = V, bias: bool = False, seed: int = 0,
                 norm: str = "rms") -> TeacherWeights:
    g = torch.Generator().manual_seed(seed)
    d = {
        "lm_head.weight": torch.randn(vocab, hidden, generator=g) / hidden**0.5,
        "final_norm.weight": 0.5 + torch.rand(hidden, generator=g),
    }
    if bias:
        d["lm_head.bias"] = torch.randn(vocab, generator=g)
    teacher = TeacherWeights.from_dict(d)
    if norm == "rms":
        return teacher
    kind, offset, norm_bias = NORMS[norm]
    return replace(teacher, norm_kind=kind, norm_weight_offset=offset, norm_eps=1e-6,
                   final_norm_bias=0.3 * torch.randn(hidden, generator=g) if norm_bias else None)


def reference_norm(h: torch.Tensor, teacher: TeacherWeights) -> torch.Tensor:
    """The final norm written out per convention, independently of pipeline.norm."""
    if teacher.norm_kind == "layer":
        h = h - h.mean(-1, keepdim=True)
    x = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + teacher.norm_eps) * (teacher.final_norm
                                                                                + teacher.norm_weight_offset)
    return x if teacher.final_norm_bias is None else x + teacher.final_norm_bias


def logit_lens(h: torch.Tensor, teacher: TeacherWeights) -> torch.Tensor:
    """Reference: the backbone's final norm and LM head applied to an intermediate state."""
    out = reference_norm(h, teacher) @ teacher.lm_head.T
    return out if teacher.lm_head_bias is None else out + teacher.lm_head_bias


@pytest.fixture
def teacher() -> TeacherWeights:
    return make_teacher()


def cfg_for(kind: str, **kw) -> HeadsConfig:
    return HeadsConfig(kind=kind, rank=4, **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_shapes(teacher, kind):
    heads = build_heads(cfg_for(kind), LAYERS, teacher)
    assert list(heads) == ["2", "3"]
    h = torch.randn(7, H)
    head = heads["2"]
    assert head.layer == 2
    assert head.features(h).shape == (7, H)
    assert head(h).shape == (7, V)
    assert head.project(head.features(h), torch.tensor([1, 4, 9])).shape == (7, 3)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("norm", list(NORMS))
def test_init_equals_logit_lens(kind, bias, norm):
    teacher = make_teacher(bias=bias, norm=norm)
    heads = build_heads(cfg_for(kind), LAYERS, teacher)
    h = 3.0 * torch.randn(11, H) + 1.0  # a non-zero mean: LayerNorm and RMSNorm differ
    for head in heads.values():
        torch.testing.assert_close(head(h), logit_lens(h, teacher), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(head(h), teacher.lens_logits(h), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", list(NORMS))
def test_adapter_correction_keeps_the_normalised_scale(norm):
    """Whatever the adapter learns, its features before the gain and bias keep the final norm's
    unit RMS, like the teacher's final state: the correction turns the state, it does not change
    the logit temperature as a side effect."""
    teacher = make_teacher(norm=norm)
    head = build_heads(cfg_for("adapter"), LAYERS, teacher)["2"]
    with torch.no_grad():
        head.up.weight.normal_()
    h = 5.0 * torch.randn(9, H)
    bias = 0.0 if teacher.final_norm_bias is None else teacher.final_norm_bias
    feats = (head.features(h) - bias) / (teacher.final_norm + teacher.norm_weight_offset)  # [n, H]
    torch.testing.assert_close(feats.pow(2).mean(-1), torch.ones(9), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(head.features(h), logit_lens_features(h, teacher))


def logit_lens_features(h: torch.Tensor, teacher: TeacherWeights) -> torch.Tensor:
    return reference_norm(h, teacher)


def test_half_precision_outliers_stay_finite(teacher):
    """Cached float16 states with SmolLM2-sized outliers (~23,000) square past float16's max."""
    heads = build_heads(cfg_for("adapter"), LAYERS, teacher)
    h = torch.randn(5, H).half()
    h[:, 0] = 23000.0
    out = heads["2"](h)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, logit_lens(h.float(), teacher), atol=1e-4, rtol=1e-4)


def test_adapter_never_trains_or_saves_the_lm_head(teacher):
    heads = build_heads(cfg_for("adapter"), LAYERS, teacher)
    a, b = heads["2"], heads["3"]
    assert a.lm_head is b.lm_head, "adapter heads must share one frozen LM head"
    assert a.lm_head.weight.data_ptr() == teacher.lm_head.data_ptr(), "the shared LM head must not be copied"
    assert all(p.data_ptr() != teacher.lm_head.data_ptr() for p in heads.parameters())

    state = a.trainable_state_dict()
    assert set(state) == {"norm.weight", "down.weight", "up.weight"}
    with_bias = build_heads(cfg_for("adapter"), LAYERS, make_teacher(norm="layer_bias"))["2"]
    assert set(with_bias.trainable_state_dict()) == {"norm.weight", "norm.bias", "down.weight", "up.weight"}
    assert sum(t.numel() for t in state.values()) == H + 2 * 4 * H
    assert not any(k.endswith("lm_head.weight") for k in heads_state_dict(heads))

    a(torch.randn(4, H)).logsumexp(-1).sum().backward()
    assert a.lm_head.weight.grad is None and not a.lm_head.weight.requires_grad
    assert a.down.weight.grad is not None and a.up.weight.grad is not None


def test_linear_head_owns_a_trainable_copy(teacher):
    head = build_heads(cfg_for("linear"), LAYERS, teacher)["2"]
    assert isinstance(head, LinearHead)
    assert head.weight.requires_grad and head.weight.data_ptr() != teacher.lm_head.data_ptr()
    assert set(head.trainable_state_dict()) == {"norm.weight", "weight"}


@pytest.mark.parametrize("kind", KINDS)
def test_project_subset_equals_gathered_full_logits(kind):
    teacher = make_teacher(bias=True)
    head = build_heads(cfg_for(kind), LAYERS, teacher)["3"]
    with torch.no_grad():  # move away from init so the check is not about the teacher only
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    feats = head.features(torch.randn(6, H))
    idx = torch.tensor([41, 0, 7, 7, 3])
    torch.testing.assert_close(head.project(feats, idx), head.project(feats)[:, idx])


@pytest.mark.parametrize("kind", KINDS)
def test_project_rows_equals_gathered_project(kind):
    teacher = make_teacher(bias=True)
    head = build_heads(cfg_for(kind), LAYERS, teacher)["3"]
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    h = torch.randn(6, H)
    ids = torch.randint(0, V, (6, 9))
    ids[0, :3] = 7  # repeated ids in a row are scored independently
    got = head.project_rows(head.features(h), ids)  # [n, k]
    want = head.project(head.features(h)).gather(1, ids)  # [n, k] from [n, V]
    torch.testing.assert_close(got, want)
    # same gradient as scoring through the full projection
    g = torch.randn(6, 9)
    got_grads = torch.autograd.grad((head.project_rows(head.features(h), ids) * g).sum(), list(head.parameters()))
    want_grads = torch.autograd.grad((head.project(head.features(h)).gather(1, ids) * g).sum(), list(head.parameters()))
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


def test_adapter_project_rows_gathers_once_and_survives_reuse(teacher, monkeypatch):
    """Adapter heads share the frozen LM head's gathered rows: gathered once per ids tensor, in
    a reused buffer. A graph built on older ids still gets its own gradient after the buffer
    moved on, and ids written in place are gathered again."""
    heads = build_heads(cfg_for("adapter"), LAYERS, teacher)
    a, b = heads["2"], heads["3"]
    with torch.no_grad():
        a.up.weight.normal_()
    h = torch.randn(5, H)
    ids1, ids2 = torch.randint(0, V, (5, 4)), torch.randint(0, V, (5, 4))

    calls = []
    original = torch.index_select

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "index_select", counting)
    out_a = a.project_rows(a.features(h), ids1)
    b.project_rows(b.features(h), ids1)
    assert len(calls) == 1, "the second adapter head should reuse the rows gathered for the first"
    b.project_rows(b.features(h), ids2)  # the buffer now holds ids2's rows
    assert len(calls) == 2
    (out_a * torch.arange(4.0)).sum().backward()  # the graph of ids1 regathers in backward
    assert len(calls) == 3
    grad = a.up.weight.grad.clone()
    a.zero_grad()
    ref = a.project(a.features(h)).gather(1, ids1)
    (ref * torch.arange(4.0)).sum().backward()
    torch.testing.assert_close(grad, a.up.weight.grad)

    ids2[:, 0] = (ids2[:, 0] + 1) % V  # in place: the cached rows are stale now
    torch.testing.assert_close(b.project_rows(b.features(h), ids2), b.project(b.features(h)).gather(1, ids2))


def test_teacher_logits(teacher):
    f = torch.randn(5, H)
    torch.testing.assert_close(teacher.logits(f), f @ teacher.lm_head.T)
    idx = torch.tensor([2, 9])
    torch.testing.assert_close(teacher.logits(f.half(), idx), teacher.logits(f.half())[:, idx])
    with pytest.raises(ValueError, match="teacher.to"):
        teacher.logits(torch.empty(2, H, device="meta"))
    assert teacher.to("meta").lm_head.device.type == "meta" and teacher.lm_head.device.type == "cpu"


def test_teacher_from_dict_errors():
    with pytest.raises(KeyError, match="final_norm.weight"):
        TeacherWeights.from_dict({"lm_head.weight": torch.zeros(V, H)})
    with pytest.raises(ValueError, match="final_norm"):
        TeacherWeights.from_dict({"lm_head.weight": torch.zeros(V, H), "final_norm.weight": torch.ones(H + 1)})


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("norm", ["rms", "layer_bias"])
def test_save_load_round_trip_is_exact(kind, norm):
    teacher = make_teacher(norm=norm)
    cfg = cfg_for(kind)
    heads = build_heads(cfg, LAYERS, teacher)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p))
    buf = io.BytesIO()
    torch.save(heads_state_dict(heads), buf)
    buf.seek(0)
    loaded = load_heads(cfg, LAYERS, teacher, torch.load(buf))
    h = torch.randn(5, H)
    for key in heads:
        assert torch.equal(heads[key](h), loaded[key](h))
        for name, t in heads[key].trainable_state_dict().items():
            assert torch.equal(t, loaded[key].trainable_state_dict()[name])
    if kind == "adapter":
        assert isinstance(loaded["2"], AdapterHead) and loaded["2"].lm_head is loaded["3"].lm_head


def test_load_rejects_mismatches(teacher):
    state = heads_state_dict(build_heads(cfg_for("adapter"), LAYERS, teacher))
    with pytest.raises(ValueError, match="missing"):
        load_heads(cfg_for("adapter"), [2, 3, 4], teacher, state)
    with pytest.raises(ValueError, match="rank"):
        load_heads(HeadsConfig(kind="adapter", rank=8), LAYERS, teacher, state)
    with pytest.raises(ValueError, match="linear"):
        load_heads(cfg_for("linear"), LAYERS, teacher, state)


@pytest.mark.parametrize("kind", KINDS)
def test_training_reduces_kl(kind):
    """The teacher is a fixed linear map of the normalised state, which both head kinds can
    represent (adapter: x(I + BA) with rank = H; linear: W M^T), so KL must fall a lot."""
    torch.manual_seed(0)
    hidden, vocab, n = 32, 64, 512
    teacher = make_teacher(hidden, vocab, seed=1)
    head = build_heads(HeadsConfig(kind=kind, rank=hidden, loss="kl"), [1], teacher)["1"]
    mix = torch.eye(hidden) + 0.5 * torch.randn(hidden, hidden) / hidden**0.5  # [H, H]
    h = 2.0 * torch.randn(n, hidden)  # [n, H]
    with torch.no_grad():
        teacher_logits = (head.features(h) @ mix) @ teacher.lm_head.T * 3.0  # [n, V]
    cfg = HeadsConfig(kind=kind, loss="kl")
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=0.0)
    start = time.perf_counter()
    with torch.no_grad():
        initial = head_loss(head(h), teacher_logits, None, cfg).item()
    for _ in range(300):
        loss = head_loss(head(h), teacher_logits, None, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    elapsed = time.perf_counter() - start
    final = loss.item()
    assert final < 0.1 * initial, (initial, final)
    assert elapsed < 5.0
