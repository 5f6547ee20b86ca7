"""Head and gate training on CUDA, the path a large backbone takes: the efficient loss's
sampled negatives, the teacher top-k and the gates' label pass on the device. Skipped where
no GPU is visible; `make test-gpu` runs only these."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import GatesConfig, HeadsConfig
from pipeline.heads import load_heads
from pipeline.scoring import evaluate_heads, logit_lens
from pipeline.teacher import TeacherTopK, TeacherWeights, compute_teacher_topk
from pipeline.train_gates import train_gates
from pipeline.train_heads import train_heads

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

HIDDEN, VOCAB, LAYERS, NUM_LAYERS = 64, 4096, [1, 2], 3


class Rows:
    """In-memory `BatchSource` over fixed arrays (shuffled per (seed, epoch))."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = {**arrays, "row": np.arange(len(arrays["targets"]), dtype=np.int64)}
        self.num_tokens = len(arrays["targets"])

    def num_batches(self, batch_rows: int, drop_last: bool = False) -> int:
        return self.num_tokens // batch_rows if drop_last else -(-self.num_tokens // batch_rows)

    def iter_batches(self, names, batch_rows, *, shuffle=True, buffer_chunks=4, seed=0, epoch=0, drop_last=False,
                     start_batch=0):
        order = np.random.default_rng([seed, epoch]).permutation(self.num_tokens) if shuffle else np.arange(self.num_tokens)
        for b, a in enumerate(range(0, self.num_tokens, batch_rows)):
            idx = order[a : a + batch_rows]
            if len(idx) < batch_rows and drop_last:
                return
            if b >= start_batch:
                yield {k: self.arrays[k][idx] for k in names}


def make_data(n: int, seed: int) -> tuple[TeacherWeights, Rows]:
    """A teacher with Zipf-like token biases (so the frequency proposal has frequent tokens to
    find) and layer states that are a fixed rank-4 distortion of the final state."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(VOCAB, HIDDEN, generator=g) * (3.0 / HIDDEN**0.5)  # [V, H]
    bias = -torch.log(torch.arange(1, VOCAB + 1, dtype=torch.float))  # [V]
    teacher = TeacherWeights(lm_head=w, final_norm=torch.ones(HIDDEN), lm_head_bias=bias)
    fixed, rng = np.random.default_rng(0), np.random.default_rng(seed)
    f = rng.standard_normal((n, HIDDEN)).astype(np.float32)  # [n, H]
    arrays = {"final": f}
    for layer, s in zip(LAYERS, (1.5, 0.75)):
        u, v = fixed.standard_normal((2, HIDDEN, 4)) / HIDDEN**0.5
        arrays[f"layer_{layer}"] = ((f @ (np.eye(HIDDEN) + 2 * s * u @ v.T)) * 4).astype(np.float32)  # [n, H]
    arrays["targets"] = teacher.logits(torch.from_numpy(f)).argmax(-1).numpy().astype(np.int32)  # [n]
    return teacher, Rows(arrays)


@pytest.mark.parametrize("efficient", [True, False])
def test_heads_train_on_cuda(efficient):
    teacher, train = make_data(8192, seed=1)
    _, held = make_data(2048, seed=2)
    topk = None
    if efficient:
        ids, logprobs = np.zeros((train.num_tokens, 16), np.int32), np.zeros((train.num_tokens, 16), np.float32)
        compute_teacher_topk(teacher, train, 16, ids, logprobs, batch_rows=2048, progress=False, device="cuda")
        topk = TeacherTopK(ids=ids, logprobs=logprobs)
    cfg = HeadsConfig(kind="adapter", rank=8, epochs=3, batch_tokens=512, lr=3e-2, warmup_steps=5, weight_decay=0.0,
                      efficient_loss=efficient, topk=16, negatives=512)
    result = train_heads(cfg, LAYERS, NUM_LAYERS, teacher, train, progress=False, device="cuda", teacher_topk=topk)
    assert all(t.device.type == "cpu" for t in result.state.values())
    assert result.epochs[-1].loss < result.epochs[0].loss
    heads = load_heads(cfg, LAYERS, teacher, result.state).to("cuda")
    trained = evaluate_heads(heads, teacher, held)
    lens = evaluate_heads(logit_lens(teacher, LAYERS), teacher, held)
    for layer in LAYERS:
        assert trained[layer].agreement > lens[layer].agreement + 0.1, (layer, trained[layer], lens[layer])


def test_gates_train_on_cuda():
    teacher, train = make_data(8192, seed=1)
    cfg = HeadsConfig(kind="adapter", rank=8, epochs=1, batch_tokens=512, lr=3e-2, warmup_steps=5)
    heads = load_heads(cfg, LAYERS, teacher, train_heads(cfg, LAYERS, NUM_LAYERS, teacher, train, progress=False,
                                                         device="cuda").state)
    gates = train_gates(GatesConfig(epochs=2, batch_tokens=512), heads, LAYERS, NUM_LAYERS, teacher, train,
                        progress=False, device="cuda")
    assert set(gates.auroc) == set(LAYERS)
    for layer in LAYERS:
        assert 0.5 < gates.auroc[layer] <= 1.0 and np.isfinite(gates.entropy_auroc[layer])
