"""Sources, synthetic caches and fixtures shared by the training and scoring tests: a synthetic
teacher with layer states that a rank-8 adapter can undo exactly, gate data whose correctness is
learnable, and the tiny random Llama extracted into a cache."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from pipeline.config import HeadsConfig
from pipeline.teacher import TeacherTopK, TeacherWeights, compute_teacher_topk
from stores.cache import CacheReader, CacheSchema, CacheWriter

HIDDEN, VOCAB, LAYERS, NUM_LAYERS = 32, 512, [1, 2, 3], 4


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


def build_synth(root: Path) -> SimpleNamespace:
    teacher = make_teacher()
    return SimpleNamespace(
        teacher=teacher,
        train=write_cache(root / "train", make_rows(teacher, 6144, seed=1)),
        eval=write_cache(root / "eval", make_rows(teacher, 2048, seed=2)),
        small=ArraySource(make_rows(teacher, 1024, seed=3)),
    )


def heads_cfg(**kw) -> HeadsConfig:
    base = dict(kind="adapter", rank=8, epochs=2, batch_tokens=256, lr=3e-2, warmup_steps=5, weight_decay=0.0,
                efficient_loss=False)  # the full loss unless a test asks for the efficient one
    return HeadsConfig(**{**base, **kw})


def precompute_topk(teacher: TeacherWeights, source, k: int) -> TeacherTopK:
    ids, logprobs = np.zeros((source.num_tokens, k), np.int32), np.zeros((source.num_tokens, k), np.float32)
    compute_teacher_topk(teacher, source, k, ids, logprobs, batch_rows=1000, progress=False)
    return TeacherTopK(ids=ids, logprobs=logprobs)


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def inject_inf(batch):
    batch = dict(batch)
    batch["layer_2"] = batch["layer_2"].copy()
    batch["layer_2"][0, 0] = np.inf
    return batch


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


def build_tiny(tiny_model_dir: Path, corpus_dir: Path, root: Path) -> SimpleNamespace:
    """The tiny random Llama, a train split of it and its first sequences extracted into a cache."""
    from pipeline.backbone import load_backbone
    from pipeline.config import DataConfig, ModelConfig
    from pipeline.data import load_corpus, pack_split
    from pipeline.extract import chunk_rows_for, extract_hidden_states

    backbone = load_backbone(ModelConfig(source=str(tiny_model_dir)))
    dcfg = DataConfig(source=str(corpus_dir), seq_len=32)
    split = pack_split(load_corpus(dcfg), backbone.tokenizer, "train", dcfg, backbone.tokenizer_fingerprint)
    n_seq = min(96, split.input_ids.shape[0])
    path = root / "train"
    schema = CacheSchema(num_tokens=n_seq * 32, hidden_size=backbone.hidden_size, layers=(1, 2, 3),
                         storage_dtype="float16", chunk_rows=chunk_rows_for(32, 256))
    with CacheWriter(path, schema, {"key": "tiny"}) as w:
        extract_hidden_states(backbone, split, [1, 2, 3], w, batch_size=16, max_sequences=n_seq, progress=False)
        w.finish()
    teacher = backbone.teacher_weights()
    return SimpleNamespace(backbone=backbone, split=split, n_seq=n_seq, reader=CacheReader(path), teacher=teacher)
