"""The teacher's top-k: the batch helper against torch.topk, the precompute pass over a source
(row-indexed, every row once), and its refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.teacher import TeacherWeights
from pipeline.teacher import TeacherTopK, compute_teacher_topk, topk_of_batch

H, V = 16, 300


def make_teacher(bias: bool = False, seed: int = 0) -> TeacherWeights:
    g = torch.Generator().manual_seed(seed)
    return TeacherWeights(lm_head=torch.randn(V, H, generator=g), final_norm=torch.ones(H),
                          lm_head_bias=torch.randn(V, generator=g) if bias else None)


class ShuffledFinals:
    """A `BatchSource` of final states whose batches come in a shuffled row order, even with
    shuffle=False: the pass must place each row by its ``row`` index, not by arrival."""

    def __init__(self, final: np.ndarray):
        self.final = final
        self.num_tokens = len(final)

    def num_batches(self, batch_rows, drop_last=False):
        return -(-self.num_tokens // batch_rows)

    def iter_batches(self, names, batch_rows, *, shuffle=True, buffer_chunks=4, seed=0, epoch=0, drop_last=False,
                     start_batch=0):
        order = np.random.default_rng(0).permutation(self.num_tokens)
        for a in range(0, self.num_tokens, batch_rows):
            rows = order[a : a + batch_rows]
            yield {"final": self.final[rows], "row": rows.astype(np.int64)}


@pytest.mark.parametrize("bias", [False, True])
def test_topk_of_batch_equals_torch_topk_of_the_teacher_logits(bias):
    teacher = make_teacher(bias)
    final = 2 * torch.randn(37, H)
    logits = teacher.logits(final)  # [n, V]
    want_values, want_ids = logits.topk(8, dim=-1)
    for block in (5, 37, 1024):  # blocking changes nothing
        ids, logprobs = topk_of_batch(teacher, final, 8, block_rows=block)
        assert ids.dtype == torch.long and logprobs.dtype == torch.float32
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1).gather(1, want_ids))
    full_ids, full_lp = topk_of_batch(teacher, final, V)  # k = V: the whole distribution
    torch.testing.assert_close(full_lp.exp().sum(-1), torch.ones(37))
    with pytest.raises(ValueError, match="heads.topk"):
        topk_of_batch(teacher, final, V + 1)


def test_compute_teacher_topk_fills_every_row_by_its_index():
    teacher = make_teacher()
    final = (3 * np.random.default_rng(1).standard_normal((203, H))).astype(np.float32)
    ids = np.full((203, 10), -7, np.int32)
    logprobs = np.zeros((203, 10), np.float32)
    compute_teacher_topk(teacher, ShuffledFinals(final), 10, ids, logprobs, batch_rows=64, progress=False)

    logits = teacher.logits(torch.from_numpy(final))  # [n, V], rows in order
    values, want = logits.topk(10, dim=-1)
    np.testing.assert_array_equal(ids, want.numpy())
    np.testing.assert_allclose(logprobs, (values - logits.logsumexp(-1, keepdim=True)).numpy(), rtol=1e-5, atol=1e-5)
    assert (np.diff(logprobs, axis=1) <= 0).all()  # sorted: column 0 is the top-1

    topk = TeacherTopK(ids=ids, logprobs=logprobs)
    assert (topk.num_tokens, topk.k) == (203, 10)
    rows = np.array([5, 0, 202])
    got_ids, got_lp = topk.rows(rows, 4)
    np.testing.assert_array_equal(got_ids, ids[rows, :4])
    np.testing.assert_array_equal(got_lp, logprobs[rows, :4])
    with pytest.raises(ValueError, match="k >= 11"):
        topk.rows(rows, 11)


def test_compute_teacher_topk_refuses_bad_outputs_and_non_finite_states():
    teacher = make_teacher()
    final = np.random.default_rng(2).standard_normal((50, H)).astype(np.float32)
    with pytest.raises(ValueError, match=r"expected int32 \[50, 4\]"):
        compute_teacher_topk(teacher, ShuffledFinals(final), 4, np.zeros((50, 4), np.int64),
                             np.zeros((50, 4), np.float32), progress=False)
    with pytest.raises(ValueError, match=r"expected float32 \[50, 4\]"):
        compute_teacher_topk(teacher, ShuffledFinals(final), 4, np.zeros((50, 4), np.int32),
                             np.zeros((49, 4), np.float32), progress=False)
    final[17, 3] = np.nan
    with pytest.raises(FloatingPointError, match="row 17.*Re-extract"):
        compute_teacher_topk(teacher, ShuffledFinals(final), 4, np.zeros((50, 4), np.int32),
                             np.zeros((50, 4), np.float32), progress=False)


def test_teacher_topk_validates_its_arrays():
    with pytest.raises(ValueError, match="int32"):
        TeacherTopK(ids=np.zeros((3, 2), np.int64), logprobs=np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="differ in shape"):
        TeacherTopK(ids=np.zeros((3, 2), np.int32), logprobs=np.zeros((3, 3), np.float32))


# --- TeacherWeights: the norm it carries ------------------------------------------------------


def test_default_constructor_still_means_an_rmsnorm():
    g = torch.Generator().manual_seed(0)
    w = 1 + 0.5 * torch.randn(H, generator=g)
    teacher = TeacherWeights(lm_head=torch.randn(V, H, generator=g), final_norm=w, lm_head_bias=None, norm_eps=1e-5)
    assert (teacher.norm_kind, teacher.norm_weight_offset, teacher.final_norm_bias) == ("rms", 0.0, None)
    h = 3 * torch.randn(6, H, generator=g) + 1
    want = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * w  # [n, H]
    torch.testing.assert_close(teacher.apply_norm(h), want)
    torch.testing.assert_close(teacher.lens_logits(h), teacher.logits(want))

    norm = teacher.norm_module()
    assert all(p.requires_grad and p.dtype == torch.float32 for p in norm.parameters())
    assert norm.weight.data_ptr() != teacher.final_norm.data_ptr(), "a trainable copy, never the teacher's tensor"
    torch.testing.assert_close(norm(h.half()), teacher.apply_norm(h.half()))
    with torch.no_grad():
        norm.weight.add_(1.0)
    torch.testing.assert_close(teacher.final_norm, w)  # training a copy leaves the teacher frozen


def test_to_state_round_trips_a_layernorm_teacher_exactly():
    g = torch.Generator().manual_seed(1)
    teacher = TeacherWeights(lm_head=torch.randn(V, H, generator=g), final_norm=torch.randn(H, generator=g),
                             lm_head_bias=torch.randn(V, generator=g), norm_eps=1.234567e-5,
                             final_norm_bias=torch.randn(H, generator=g), norm_kind="layer", norm_weight_offset=0.0)
    tensors, metadata = teacher.to_state()
    assert set(tensors) == {"lm_head.weight", "lm_head.bias", "final_norm.weight", "final_norm.bias"}
    back = TeacherWeights.from_state(tensors, metadata)
    assert back.norm_eps == teacher.norm_eps and back.norm_kind == "layer"
    for name in ("lm_head", "lm_head_bias", "final_norm", "final_norm_bias"):
        assert torch.equal(getattr(back, name), getattr(teacher, name))
    moved = teacher.to("meta")
    assert moved.final_norm_bias.device.type == "meta" and moved.final_norm.device.type == "meta"


def test_invalid_norm_fields_are_reported_together():
    with pytest.raises(ValueError, match=r"final_norm has shape.*norm kind 'batch' is unknown.*offset 0.5"):
        TeacherWeights(lm_head=torch.zeros(V, H), final_norm=torch.ones(H + 1), norm_kind="batch",  # type: ignore
                       norm_weight_offset=0.5)
    with pytest.raises(ValueError, match=r"norm bias has shape \(3,\)"):
        TeacherWeights(lm_head=torch.zeros(V, H), final_norm=torch.ones(H), final_norm_bias=torch.zeros(3))
