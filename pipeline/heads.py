"""Early-exit heads: map an intermediate hidden state to next-token logits.

Every head starts as the *logit lens with the final norm* (the backbone's own final norm, exactly
as the backbone defines it — RMSNorm or LayerNorm, bias, eps, Gemma's `1 + weight` — and its LM
head applied to an intermediate layer), so step 0 of training is a known, sensible baseline on
every model family and training only has to learn the correction. Two kinds:

- `LinearHead` owns a full copy of the LM head ([V, H]); most capacity, but one V x H matrix
  per exit layer to train, store and ship.
- `AdapterHead` learns a low-rank residual correction in hidden space (before the norm's
  gain) and reuses the backbone's frozen LM head, shared by every adapter head; a few hundred
  kB per head instead of ~113 MB (SmolLM2: 49152 x 576 float32).

Both expose `features` (the vocabulary-independent part), `project` (the vocabulary
projection, optionally restricted to a subset of token ids shared by every row) and
`project_rows` (each row scored on its own ids) separately, because on small backbones the
full-vocabulary projection costs as much as the backbone itself: the efficient loss in
`pipeline.losses` scores each row on its teacher top-k plus a few shared negatives only.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import HeadsConfig
from pipeline.teacher import TeacherWeights, project_vocab

logger = logging.getLogger(__name__)

def _project_rows(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  ids: torch.Tensor) -> torch.Tensor:
    """Row i scored on its own ids: out[i, j] = feats[i] . weight[ids[i, j]] (+ bias).

    n*k*H multiply-adds through a gathered [n, k, H] weight, never an [n, V] tensor. Autograd
    reaches `weight` (a trainable linear head gets a gradient on the gathered rows only).
    """
    rows = F.embedding(ids, weight)  # [n, k, H]
    out = torch.einsum("nh,nkh->nk", feats, rows)  # [n, k]
    return out if bias is None else out + bias[ids]  # [n, k]


class FrozenLMHead(nn.Module):
    """The backbone's LM head as a frozen module shared by all adapter heads.

    Buffers, not parameters: never trained, never in an optimizer. Non-persistent: never
    saved per head. One instance is shared, so `.to(device)` moves a single copy.
    """

    def __init__(self, teacher: TeacherWeights):
        super().__init__()
        self.register_buffer("weight", teacher.lm_head, persistent=False)  # [V, H]
        self.register_buffer("bias", teacher.lm_head_bias, persistent=False)  # [V] or None
        self._rows: _GatheredRows | None = None  # workspace of project_rows; see there

    def forward(self, feats: torch.Tensor, vocab_idx: torch.Tensor | None = None) -> torch.Tensor:
        return project_vocab(feats, self.weight, self.bias, vocab_idx)  # [n, V] or [n, k]

    def project_rows(self, feats: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """feats [n, H], ids [n, k] -> [n, k] logits, row i on its own ids.

        The gathered weight rows [n, k, H] are the costly part of per-row scoring (the dot
        products are n*k*H multiply-adds; the gather moves 4*n*k*H bytes, 150 MB for a batch of
        1024 rows x 64 ids of SmolLM2). Every adapter head of a batch scores the same ids
        against this one frozen matrix, so the rows are gathered once per ids tensor and kept;
        and they are gathered into a reused buffer, because a fresh 150 MB tensor per batch
        costs several times the copy itself in page faults (measured: 48 ms vs 7 ms on CPU).
        Backward regathers if the buffer has moved on to other ids meanwhile, so a graph kept
        across batches still gets the right gradient.
        """
        if self._rows is None:
            self._rows = _GatheredRows()
        out = _RowDot.apply(feats, self.weight, ids, self._rows)  # [n, k]
        return out if self.bias is None else out + self.bias[ids]  # [n, k]


class _GatheredRows:
    """weight[ids] for the (weight, ids) last asked for, in a buffer reused while the shape allows.

    Holding references to `weight` and `ids` keeps their storage alive, so (data pointer,
    shape, strides, version) identifies the same tensors unmodified: an in-place write bumps
    the version, and a moved module hands in another weight.
    """

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None  # [n * k, H]
        self.held: tuple[torch.Tensor, torch.Tensor] | None = None  # (weight, ids) the buffer holds
        self.tag: tuple | None = None

    @staticmethod
    def _tag(weight: torch.Tensor, ids: torch.Tensor) -> tuple:
        return tuple((t.data_ptr(), tuple(t.shape), t.stride(), t._version) for t in (weight, ids))

    def get(self, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """[n, k, H] rows of weight [V, H] for ids [n, k] (no autograd)."""
        tag = self._tag(weight, ids)
        hidden = weight.shape[1]
        if self.held is None or self.tag != tag:
            flat = ids.reshape(-1)
            b = self.buffer
            if b is None or b.shape != (flat.numel(), hidden) or b.dtype != weight.dtype or b.device != weight.device:
                self.buffer = b = torch.empty(flat.numel(), hidden, dtype=weight.dtype, device=weight.device)
            self.held = None  # the buffer is being overwritten
            with torch.no_grad():
                torch.index_select(weight, 0, flat, out=b)  # [n*k, H]
            self.held, self.tag = (weight, ids), tag
        return self.buffer.view(*ids.shape, hidden)  # [n, k, H]


class _RowDot(torch.autograd.Function):
    """out[i, j] = feats[i] . weight[ids[i, j]] for a frozen weight, through `_GatheredRows`.

    A custom function so autograd does not keep a gathered copy alive per call: backward asks
    the workspace again (free while it still holds these ids, a regather otherwise).
    """

    @staticmethod
    def forward(ctx, feats: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor,
                rows: _GatheredRows) -> torch.Tensor:
        ctx.save_for_backward(weight, ids)
        ctx.rows = rows
        w = rows.get(weight, ids)  # [n, k, H]
        return torch.einsum("nh,nkh->nk", feats.to(w.dtype), w)  # [n, k]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, ids = ctx.saved_tensors
        grad_feats = None
        if ctx.needs_input_grad[0]:
            w = ctx.rows.get(weight, ids)  # [n, k, H]
            grad_feats = torch.einsum("nk,nkh->nh", grad.to(w.dtype), w)  # [n, H]
        return grad_feats, None, None, None


class ExitHead(nn.Module):
    """A head at one exit layer: its own trainable copy of the backbone's final norm, then a
    vocabulary projection.

    The norm (`pipeline.norm.FinalNorm`) runs in float32 because cached states are
    float16/bfloat16 and SmolLM2's middle layers hold values up to ~23,000, whose squares
    overflow float16.
    """

    def __init__(self, layer: int, teacher: TeacherWeights):
        super().__init__()
        self.layer = int(layer)
        self.norm = teacher.norm_module()

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """h [n, H] -> [n, H]: what feeds the vocabulary projection; compute once per batch
        and reuse for full and subset scoring."""
        return self.norm(h)  # [n, H] float32

    def project(self, feats: torch.Tensor, vocab_idx: torch.Tensor | None = None) -> torch.Tensor:
        """feats [n, H] -> logits [n, V], or [n, k] for vocab_idx [k] (cost n*k*H)."""
        raise NotImplementedError

    def project_rows(self, feats: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """feats [n, H], ids [n, k] -> logits [n, k]: row i scored on its own ids only,
        equal to `project(feats)[i, ids[i]]` at n*k*H cost."""
        raise NotImplementedError

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(h))  # [n, V]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what this head must save; shared frozen pieces are non-persistent buffers and
        are rebuilt from the teacher on load."""
        return dict(self.state_dict())


class LinearHead(ExitHead):
    """Norm + a trainable copy of the LM head: the most expressive head, one [V, H] matrix each."""

    def __init__(self, layer: int, teacher: TeacherWeights):
        super().__init__(layer, teacher)
        self.weight = nn.Parameter(teacher.lm_head.clone())  # [V, H]
        bias = None if teacher.lm_head_bias is None else nn.Parameter(teacher.lm_head_bias.clone())  # [V]
        self.register_parameter("bias", bias)

    def project(self, feats: torch.Tensor, vocab_idx: torch.Tensor | None = None) -> torch.Tensor:
        return project_vocab(feats, self.weight, self.bias, vocab_idx)  # [n, V] or [n, k]

    def project_rows(self, feats: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return _project_rows(feats, self.weight, self.bias, ids)  # [n, k]


class AdapterHead(ExitHead):
    """A low-rank residual correction inside the final norm, into the frozen shared LM head.

    features(h) = affine(v * rms(u) / rms(v)),  v = u + B(A(u)),  u = normalize(h)

    u is the final norm's output without its gain and bias (RMSNorm: h / rms(h); LayerNorm:
    centred h / sqrt(var + eps)), affine is the norm's gain (with the backbone's offset, 1 + w
    for Gemma) and bias; v is u moved by a rank-r map (2rH parameters instead of VH) and
    brought back to u's RMS before the affine part. B starts at zero, so v = u, the ratio is
    exactly 1 and the head starts exactly at the logit lens, on every norm family. Why this
    placement rather than x + B(A(x)) after the norm (with gain):
    - like the tuned lens, the correction lives in residual-stream space before the norm, and
      the output keeps the normalised scale the teacher's final state has, whatever the
      correction does; a map after the norm changes each token's logit scale (its
      temperature) as a side effect of changing its direction;
    - the map only ever sees a scale-free input, so layer-dependent magnitudes (SmolLM2's
      ~23,000 outliers) never reach it raw.
    Measured on SmolLM2-135M states of the Python reference (rank 64, 300 steps of 256 tokens,
    AdamW lr 3e-3, candidate-subset KL, one seed; 2,048 held-out tokens): full KL to the final layer
    2.58 / 2.31 / 0.87 at layers 6 / 12 / 24 against 2.92 / 2.61 / 0.99 for the post-norm map,
    top-1 agreement 0.298 / 0.350 / 0.619 against 0.302 / 0.336 / 0.587 (logit lens: 0.045 /
    0.082 / 0.299).
    """

    def __init__(self, layer: int, teacher: TeacherWeights, rank: int, lm_head: FrozenLMHead | None = None):
        super().__init__(layer, teacher)
        hidden = teacher.hidden_size
        self.down = nn.Linear(hidden, rank, bias=False)  # A: [r, H]
        self.up = nn.Linear(rank, hidden, bias=False)  # B: [H, r]
        nn.init.zeros_(self.up.weight)
        self.lm_head = lm_head if lm_head is not None else FrozenLMHead(teacher)

    def features(self, h: torch.Tensor) -> torch.Tensor:
        u = self.norm.normalize(h)  # [n, H] float32: squares of float16 outliers overflow
        v = u + self.up(self.down(u))  # [n, H]
        keep = _rms(u) / _rms(v).clamp_min(torch.finfo(v.dtype).tiny)  # [n, 1], exactly 1 at init
        return self.norm.affine(v * keep)  # [n, H]

    def project(self, feats: torch.Tensor, vocab_idx: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(feats, vocab_idx)  # [n, V] or [n, k]

    def project_rows(self, feats: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head.project_rows(feats, ids)  # [n, k], rows gathered once for all heads


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(dim=-1, keepdim=True).sqrt()  # [n, 1]


def build_heads(cfg: HeadsConfig, layers: Sequence[int], teacher: TeacherWeights) -> nn.ModuleDict:
    """One freshly initialised head per exit layer, keyed by str(layer).

    Adapter heads share one `FrozenLMHead`, so the LM head exists once in memory however many
    exit layers there are.
    """
    layers = [int(layer) for layer in layers]
    if not layers:
        raise ValueError("no exit layers given; pass at least one layer, e.g. [6, 12]")
    if len(set(layers)) != len(layers):
        raise ValueError(f"exit layers {layers} contain duplicates")
    shared = FrozenLMHead(teacher) if cfg.kind == "adapter" else None
    heads = nn.ModuleDict()
    for layer in layers:
        if cfg.kind == "linear":
            heads[str(layer)] = LinearHead(layer, teacher)
        else:
            heads[str(layer)] = AdapterHead(layer, teacher, cfg.rank, lm_head=shared)
    n_params = sum(p.numel() for p in heads.parameters())
    logger.info("built %d %s heads at layers %s: %d trainable parameters", len(layers), cfg.kind, layers, n_params)
    return heads


def heads_state_dict(heads: nn.ModuleDict) -> dict[str, torch.Tensor]:
    """Flat `"<layer>.<param>"` dict of every head's trainable state (no shared LM head)."""
    return {f"{key}.{name}": t for key, head in heads.items() for name, t in head.trainable_state_dict().items()}


def load_heads(
    cfg: HeadsConfig, layers: Sequence[int], teacher: TeacherWeights, state: dict[str, torch.Tensor]
) -> nn.ModuleDict:
    """Inverse of `heads_state_dict`: rebuild the heads and load their saved state exactly."""
    heads = build_heads(cfg, layers, teacher)
    grouped: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in state.items():
        layer, sep, name = key.partition(".")
        if not sep:
            raise ValueError(f"head state key {key!r} is not '<layer>.<param>'; save with heads_state_dict")
        grouped[layer][name] = value
    unknown = sorted(set(grouped) - set(heads), key=int)
    missing = sorted(set(heads) - set(grouped), key=int)
    if unknown or missing:
        raise ValueError(
            f"saved heads are for layers {sorted(grouped, key=int)} but layers {list(heads)} were requested "
            f"(missing {missing}, unexpected {unknown}); load with the layers the heads were trained on"
        )
    for key, head in heads.items():
        try:
            head.load_state_dict(grouped[key], strict=True)
        except RuntimeError as e:
            raise ValueError(
                f"saved state of head {key} does not fit a {cfg.kind!r} head (rank {cfg.rank}); "
                f"load with the heads config it was trained with: {e}"
            ) from e
    return heads
