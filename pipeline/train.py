"""Training of exit heads and exit gates from a source of hidden states, and the no-grad passes
that measure them (evaluation, logit-lens baseline, exit labels for gates and calibration).

Why it is built this way:

- A stage reads a *source*, never a path (`BatchSource`): the zarr cache's reader in the
  pipeline, `OnlineSource` (the backbone run on the fly) for users without the disk and as the
  benchmark's baseline, or an in-memory object in tests. `pipeline` never imports zarr.
- One epoch loop (`_fit`) serves heads and gates. Optimizer, warm-up + cosine schedule,
  gradient clipping, seeding, per-epoch checkpoints, exact resume and divergence handling exist
  once; a stage supplies only a step function (forward + backward of one batch) and an
  end-of-epoch measurement.
- Resume is exact: a checkpoint holds the weights, optimizer, scheduler, every RNG state used,
  the step and the metrics so far, and batch order depends only on (seed, epoch). Training two
  epochs straight and one epoch + crash + resume give identical weights.
- Non-finite numbers stop training at the step they appear, before the optimizer applies
  them and before anything is saved (`TrainingDiverged`); the last good checkpoint stays.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.config import GatesConfig, HeadsConfig
from pipeline.gates import build_gates, gate_loss
from pipeline.heads import build_heads, heads_state_dict
from pipeline.teacher import TeacherWeights
from pipeline.losses import (
    IGNORE_INDEX,
    TopkCandidates,
    head_entropy,
    head_loss,
    inclusion_probabilities,
    layer_weights,
    negative_proposal,
    topk_distill_loss,
)
from pipeline.teacher import TeacherTopK, topk_of_batch

if TYPE_CHECKING:  # only for annotations: importing the backbone module pulls in transformers
    from pipeline.backbone import Backbone
    from pipeline.data import PackedSplit

logger = logging.getLogger(__name__)

TRAIN_CODE_VERSION = "train-4"
"""Bump when training results change for the same inputs; part of the stages' content keys."""

PROBE_ROWS = 2048
"""Rows of the per-epoch probe of `train_heads` (the first rows of the source, read in order)."""

PROPOSAL_ROWS = 65536
"""Rows, evenly spaced over a precomputed teacher top-k, whose teacher mass sets the
negative proposal of the efficient loss (reading them all would cost a pass over the store)."""

PROPOSAL_EPOCH = 1_000_000
"""Shuffling epoch of the row sample behind the proposal when no top-k is stored: a stream
of its own, apart from the training epochs' orders."""

SCORE_BLOCK_ROWS = 256
"""Rows scored at once with full-vocabulary logits: bounds memory at a few [256, V] float32
tensors (~50 MB each for V = 49152) whatever the batch size."""

GATE_HELDOUT_FRACTION = 0.1
"""Share of rows (by a hash of the row index) kept out of gate training to measure AUROC."""

GATE_EVAL_ROWS = 16384
"""At most this many held-out rows keep their hidden states in memory for the per-epoch gate
AUROC (K x H float32 per row: ~150 MB for 4 SmolLM2 layers); the standard error of an AUROC on
that many rows is well under 0.01."""


# ----------------------------------------------------------------------------- protocols


class BatchSource(Protocol):
    """Per-token rows in batches. `stores.cache.CacheReader` and `OnlineSource` satisfy it.

    Names: ``layer_<l>`` (float32 [b, H]), ``final`` (final-norm state, float32 [b, H]),
    ``targets`` (int32 [b], -1 = no next token), ``row`` (int64 [b], global row index).
    Every row appears exactly once per epoch; the order is a function of (seed, epoch) alone,
    which is what makes a resumed run replay the same batches.
    """

    num_tokens: int

    def iter_batches(
        self,
        names: Sequence[str],
        batch_rows: int,
        *,
        shuffle: bool = True,
        buffer_chunks: int = 4,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
        start_batch: int = 0,
    ) -> Iterator[dict[str, np.ndarray]]: ...

    def num_batches(self, batch_rows: int, drop_last: bool = False) -> int: ...


class CheckpointIO(Protocol):
    """Where a training loop keeps its state between epochs (`stores.checkpoints.FileCheckpoints`).

    `save` must be atomic (a crash leaves the previous state loadable) and must persist a
    snapshot; the loop hands it CPU copies, so it may also just keep the dict.
    """

    def load(self) -> dict | None: ...

    def save(self, state: dict) -> None: ...


# ----------------------------------------------------------------------------- errors and results


class TrainingDiverged(RuntimeError):
    """A loss or gradient went non-finite; training stopped before applying it and saved nothing."""

    def __init__(self, message: str, *, stage: str, step: int, epoch: int, culprits: list[str],
                 last_good_epoch: int | None):
        super().__init__(message)
        self.stage = stage
        self.step = step
        self.epoch = epoch
        self.culprits = culprits
        self.last_good_epoch = last_good_epoch


class CheckpointMismatch(ValueError):
    """A checkpoint was written by a run with other inputs; resuming from it would be wrong."""


@dataclass(frozen=True)
class EpochMetrics:
    """One epoch of head training. `epoch` is 0-based (the index passed to the source).

    `agreement` / `accuracy` are measured after the epoch, with full-vocabulary logits, on the
    probe: the first `PROBE_ROWS` rows of the training source read in order. Those rows are
    also trained on, so this tracks fit, not generalisation (run `evaluate_heads` on the eval
    split for that); with rank-64 adapters over ~10^5 tokens the two hardly differ. The probe
    is used instead of the training batches because with the efficient loss a head's top-1 on
    its candidates is not its top-1 over the vocabulary. With a precomputed `TeacherTopK` the
    probe's teacher top-1 is its stored top-1 (`ids[:, 0]`), so training never computes the
    teacher's full logits.
    """

    epoch: int
    loss: float
    """Mean over the epoch's steps of sum_heads layer_weight * head loss."""
    agreement: dict[int, float]
    """Per head layer: share of probe rows whose top-1 equals the final layer's top-1."""
    accuracy: dict[int, float]
    """Per head layer: share of probe rows (with a next token) whose top-1 is the true next token."""
    tokens: int
    seconds: float
    tokens_per_s: float


@dataclass(frozen=True)
class HeadsResult:
    state: dict[str, torch.Tensor]
    """`heads_state_dict` of the trained heads (CPU); rebuild with `load_heads`."""
    epochs: list[EpochMetrics]
    """Every epoch, including those done before a resume."""
    steps: int
    tokens_per_s: float
    """Training throughput over all epochs (every head trained on every token)."""
    resumed_from_epoch: int
    """Epochs already done in the checkpoint this call started from (0: a fresh start)."""


@dataclass(frozen=True)
class HeadEval:
    layer: int
    agreement: float
    """Share of tokens whose top-1 equals the final layer's top-1."""
    accuracy: float
    """Share of tokens with a next token whose top-1 is that token."""
    mean_entropy: float
    """Mean entropy of the head's distribution, in nats."""
    tokens: int
    entropy_auroc: float
    """AUROC of -entropy as a predictor of agreement (NaN if every token agrees or none does)."""


@dataclass(frozen=True)
class GateEpochMetrics:
    epoch: int
    loss: float
    """Mean `gate_loss` over the epoch's steps."""
    auroc: dict[int, float]
    """Per gate layer: AUROC of p_exit for "the head agrees with the final layer", held-out rows."""
    components: dict[str, float]
    """Means over the epoch of `gate_loss`'s components (bce, decision, gate_accuracy, ...)."""
    tokens: int
    seconds: float
    tokens_per_s: float


@dataclass(frozen=True)
class GatesResult:
    state: dict[str, torch.Tensor]
    """`"<layer>.<param>"` state of the trained gates (CPU), keyed like the heads."""
    epochs: list[GateEpochMetrics]
    steps: int
    auroc: dict[int, float]
    """Per gate layer, on the held-out rows: AUROC of the trained gate's p_exit."""
    entropy_auroc: dict[int, float]
    """The same rows, the head's own -entropy as the score: the baseline a gate must beat."""
    heldout_rows: int = 0
    """Held-out rows the AUROCs are measured on."""
    resumed_from_epoch: int = 0


# ----------------------------------------------------------------------------- small helpers


def _layer_name(layer: int) -> str:
    return f"layer_{layer}"


def _check_layers(layers: Sequence[int]) -> list[int]:
    out = sorted(int(layer) for layer in layers)
    if not out:
        raise ValueError("no exit layers given; pass at least one layer, e.g. [6, 12]")
    if len(set(out)) != len(out):
        raise ValueError(f"exit layers {list(layers)} contain duplicates; give each layer once")
    return out


def _head_layers(heads: nn.ModuleDict) -> list[int]:
    return sorted(int(key) for key in heads.keys())


def _module_device(module: nn.Module) -> torch.device:
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return torch.device("cpu")


def _rng_devices(device: torch.device) -> list[int]:
    """CUDA device ids whose RNG `fork_rng` must save and restore (none on CPU)."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def _tensor(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)


def _teacher_on(teacher: TeacherWeights, device: torch.device) -> TeacherWeights:
    """The teacher with its tensors on `device`, so `teacher.logits` does not copy the LM head
    to the device on every batch."""
    if teacher.lm_head.device == device:
        return teacher
    bias = None if teacher.lm_head_bias is None else teacher.lm_head_bias.to(device)
    return dataclasses.replace(teacher, lm_head=teacher.lm_head.to(device),
                               final_norm=teacher.final_norm.to(device), lm_head_bias=bias)


def _cpu_copy(obj: Any) -> Any:
    """Deep copy with every tensor detached onto the CPU: a checkpoint is a snapshot, not a
    view of tensors that keep training."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of `scores` for binary `labels`; NaN when one class is absent (undefined then,
    and 0.5 would read as "no signal")."""
    labels = np.asarray(labels, dtype=bool)
    if labels.size == 0 or labels.all() or not labels.any():
        return float("nan")
    from sklearn.metrics import roc_auc_score  # sklearn takes ~1 s to import; only AUROC needs it

    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


def heldout_mask(rows: np.ndarray, fraction: float = GATE_HELDOUT_FRACTION) -> np.ndarray:
    """True for the rows held out of gate training: a splitmix64 hash of the global row index
    below `fraction`. A hash, not `row % 10`, because rows are sequence-major and a stride would
    pick the same positions in every sequence; a function of the row alone, so the same rows are
    held out whatever the read order, source or resume."""
    z = np.asarray(rows, dtype=np.int64).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)  # [n]
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return z < np.uint64(int(fraction * 2.0**64))  # [n]


# ----------------------------------------------------------------------------- online source


class OnlineSource:
    """The batches a cache would give, computed by running the frozen backbone every time.

    For users without the disk for a cache, and as the benchmark's baseline: one epoch online
    costs one backbone forward over every token, which the cache pays once. Rows are the
    cache's (``row = sequence * seq_len + position``, sequences in split order).

    Shuffling permutes whole sequences by (seed, epoch), runs them `sequences_per_forward` at a
    time, permutes the rows of each forward and cuts the stream into batches; `buffer_chunks`
    is accepted for the protocol and ignored (a forward group is the shuffle buffer).
    `start_batch` skips the forwards of skipped batches.
    """

    _COLUMNS = ("input_ids", "targets", "doc_ids", "positions")

    def __init__(self, backbone: "Backbone", split: "PackedSplit", layers: Sequence[int],
                 sequences_per_forward: int = 8, max_sequences: int | None = None):
        if sequences_per_forward <= 0:
            raise ValueError(f"sequences_per_forward={sequences_per_forward} must be positive, e.g. 8")
        self.layers = tuple(_check_layers(layers))
        backbone.check_layers(self.layers)
        n_seq, seq_len = split.input_ids.shape
        backbone.check_seq_len(seq_len)
        if max_sequences is not None:
            if max_sequences <= 0:
                raise ValueError(f"max_sequences={max_sequences} must be positive or None")
            n_seq = min(n_seq, max_sequences)
        if n_seq == 0:
            raise ValueError(f"split {split.name!r} holds no sequences; nothing to read")
        self.backbone = backbone
        self.split = split
        self.sequences_per_forward = int(sequences_per_forward)
        self.num_sequences = int(n_seq)
        self.seq_len = int(seq_len)
        self.num_tokens = self.num_sequences * self.seq_len
        self.hidden_size = int(backbone.hidden_size)

    def names(self) -> list[str]:
        return [_layer_name(layer) for layer in self.layers] + ["final", *self._COLUMNS, "row"]

    def num_batches(self, batch_rows: int, drop_last: bool = False) -> int:
        return self.num_tokens // batch_rows if drop_last else -(-self.num_tokens // batch_rows)

    def _rows(self, names: Sequence[str], seqs: np.ndarray) -> dict[str, np.ndarray]:
        """All requested arrays for sequences `seqs` [g], flattened to [g * seq_len] rows."""
        out: dict[str, np.ndarray] = {}
        layers = [layer for layer in self.layers if _layer_name(layer) in names]
        if layers or "final" in names:
            ids = torch.from_numpy(self.split.input_ids[seqs].astype(np.int64))  # [g, seq]
            per_layer, final = self.backbone.hidden_states(ids, layers)  # {l: [g, seq, H]}, [g, seq, H]
            for layer in layers:
                out[_layer_name(layer)] = per_layer[layer].reshape(-1, self.hidden_size).float().cpu().numpy()
            if "final" in names:
                out["final"] = final.reshape(-1, self.hidden_size).float().cpu().numpy()  # [g*seq, H]
        for name in self._COLUMNS:
            if name in names:
                out[name] = getattr(self.split, name)[seqs].reshape(-1).astype(np.int32)  # [g*seq]
        if "row" in names:
            pos = np.arange(self.seq_len, dtype=np.int64)
            out["row"] = (seqs.astype(np.int64)[:, None] * self.seq_len + pos).reshape(-1)  # [g*seq]
        return out

    def iter_batches(self, names: Sequence[str], batch_rows: int, *, shuffle: bool = True, buffer_chunks: int = 4,
                     seed: int = 0, epoch: int = 0, drop_last: bool = False,
                     start_batch: int = 0) -> Iterator[dict[str, np.ndarray]]:
        names = list(names)
        if not names:
            raise ValueError("iter_batches got no names; ask for e.g. ['layer_6', 'final', 'targets']")
        unknown = [n for n in names if n not in self.names()]
        if unknown:
            raise ValueError(f"OnlineSource has no array(s) {unknown}; available: {', '.join(self.names())} "
                             "(add the layer to `layers` when building the source)")
        if batch_rows <= 0 or start_batch < 0:
            raise ValueError(f"batch_rows={batch_rows} must be positive and start_batch={start_batch} >= 0")
        rng = np.random.default_rng([seed, epoch]) if shuffle else None
        order = rng.permutation(self.num_sequences) if rng is not None else np.arange(self.num_sequences)
        skip = start_batch * batch_rows  # rows of the stream before the first wanted batch
        done = 0  # rows of the stream passed so far
        buf: dict[str, np.ndarray] | None = None
        for g in range(0, self.num_sequences, self.sequences_per_forward):
            seqs = order[g : g + self.sequences_per_forward]
            n = len(seqs) * self.seq_len
            perm = rng.permutation(n) if rng is not None else None  # drawn even when skipped: later groups stay equal
            if done + n <= skip:
                done += n
                continue
            data = self._rows(names, seqs)
            cut = max(0, skip - done)
            data = {k: (v[perm] if perm is not None else v)[cut:] for k, v in data.items()}
            done += n
            buf = data if buf is None else {k: np.concatenate([buf[k], data[k]]) for k in names}
            n_full = len(buf[names[0]]) // batch_rows
            for j in range(n_full):
                yield {k: buf[k][j * batch_rows : (j + 1) * batch_rows] for k in names}
            buf = {k: buf[k][n_full * batch_rows :] for k in names}
        if buf is not None and len(buf[names[0]]) and not drop_last:
            yield buf


# ----------------------------------------------------------------------------- the shared loop


class _WarmupCosine:
    """LR multiplier at optimizer step s: linear warm-up to 1 over `warmup` steps, then cosine
    decay reaching 0 at `total`. A class, not a lambda, so LambdaLR saves it in its state."""

    def __init__(self, warmup: int, total: int):
        self.warmup = int(warmup)
        self.total = int(total)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class _StepOut:
    parts: torch.Tensor | None
    """[P] detached loss terms whose sum is the step's loss; None: no usable rows (no update)."""
    rows: int
    extras: dict[str, float] = field(default_factory=dict)


@dataclass
class _Task:
    """What differs between training heads and gates; `_fit` does everything else."""

    stage: str  # "heads" | "gates": in logs, errors and checkpoints
    module: nn.Module
    names: list[str]  # arrays each step reads
    part_names: list[str]  # what each entry of _StepOut.parts is, for divergence messages
    step: Callable[[dict[str, np.ndarray]], _StepOut]  # forward + backward of one batch
    end_epoch: Callable[[], dict[str, Any]]  # metrics after an epoch (no grad)
    generator: torch.Generator  # every random draw of a step uses it (candidates, exit samples)
    signature: dict[str, Any]  # what a checkpoint must match to be resumed from


@dataclass
class _Fit:
    history: list[dict[str, Any]]
    steps: int
    resumed_from_epoch: int


def _adamw(module: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over trainable parameters only. Weight decay applies to matrices (adapters, gate
    layers, linear heads) and not to norm gains or biases: decaying an RMSNorm gain pulls the
    head's scale toward 0, which is no prior anyone wants (as in nanoGPT / litgpt)."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: the module has no parameters with requires_grad=True")
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def _plan(cfg: HeadsConfig | GatesConfig, source: BatchSource) -> tuple[int, int, bool]:
    """(steps per epoch, total steps, drop_last). Full batches only when there is at least one,
    so every step has the same size; `max_steps` caps the total, spread evenly over epochs so
    each epoch still sees a differently shuffled slice."""
    if source.num_tokens <= 0:
        raise ValueError("the training source holds no rows; extract the split first")
    drop_last = source.num_batches(cfg.batch_tokens, drop_last=True) > 0
    per_epoch = source.num_batches(cfg.batch_tokens, drop_last=drop_last)
    total = per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        per_epoch = min(per_epoch, -(-cfg.max_steps // cfg.epochs))
        total = min(cfg.max_steps, per_epoch * cfg.epochs)
    return per_epoch, total, drop_last


def _rng_state(generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [f"{prefix.rstrip('.')}: checkpoint {a!r}, this run {b!r}"]


def _resume(task: _Task, state: dict, optimizer, scheduler, device, checkpoints) -> tuple[int, int, list]:
    """Load a checkpoint into the live objects; returns (epochs done, step, history)."""
    if state.get("stage") != task.stage or state.get("signature") != task.signature:
        diffs = _diff(state.get("signature"), task.signature) or [f"stage: {state.get('stage')!r} vs {task.stage!r}"]
        raise CheckpointMismatch(
            f"checkpoint in {checkpoints!r} was written by a {state.get('stage')} run with other inputs "
            f"({'; '.join(diffs[:6])}); resuming from it would mix two trainings. Delete it, or give this "
            "run its own checkpoint folder."
        )
    task.module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"], task.generator, device)
    return int(state["epochs_done"]), int(state["step"]), list(state["history"])


def _diverged(task: _Task, cfg, *, step: int, epoch: int, batch: int, what: str, culprits: list[str],
              last_good: int | None, checkpoints: CheckpointIO | None) -> TrainingDiverged:
    if checkpoints is None:
        kept = "No checkpoints were configured, so nothing was saved."
    elif last_good is None:
        kept = f"No checkpoint had been written yet ({checkpoints!r} is unchanged)."
    else:
        kept = (f"The last good checkpoint (after epoch {last_good}, 0-based) in {checkpoints!r} was kept "
                "unchanged; this epoch was not saved.")
    msg = (
        f"{task.stage} training diverged at step {step} (epoch {epoch}, batch {batch}): {what} for "
        f"{', '.join(culprits)}. {kept} Remedies: lower {task.stage}.lr (now {cfg.lr:g}) or raise "
        f"{task.stage}.warmup_steps (now {cfg.warmup_steps}); lower {task.stage}.grad_clip (now {cfg.grad_clip:g}); "
        "check the cache for overflow (huge or non-finite hidden states: re-extract with "
        "extract.storage_dtype=bfloat16 or the backbone in float32)."
    )
    return TrainingDiverged(msg, stage=task.stage, step=step, epoch=epoch, culprits=culprits, last_good_epoch=last_good)


def _fit(task: _Task, cfg: HeadsConfig | GatesConfig, source: BatchSource, checkpoints: CheckpointIO | None,
         progress: bool, device: torch.device) -> _Fit:
    """The epoch loop shared by heads and gates: AdamW, warm-up + cosine, clipping, per-epoch
    checkpoint, exact resume, and a stop at the first non-finite loss or gradient."""
    per_epoch, total, drop_last = _plan(cfg, source)
    if cfg.warmup_steps >= total:
        logger.warning("%s: warmup_steps=%d >= %d total steps, so the learning rate never reaches lr=%g; "
                       "lower warmup_steps", task.stage, cfg.warmup_steps, total, cfg.lr)
    optimizer = _adamw(task.module, cfg.lr, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _WarmupCosine(cfg.warmup_steps, total))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    task.signature = {**task.signature, "total_steps": total, "steps_per_epoch": per_epoch, "drop_last": drop_last}

    epochs_done, step, history = 0, 0, []
    state = checkpoints.load() if checkpoints is not None else None
    if state is not None:
        epochs_done, step, history = _resume(task, state, optimizer, scheduler, device, checkpoints)
        logger.info("%s: resuming after epoch %d (step %d of %d)", task.stage, epochs_done - 1, step, total)
    resumed_from = epochs_done
    last_good = epochs_done - 1 if state is not None else None
    logger.info("%s: %d steps (%d epochs x %d batches of %d rows), lr %g, warm-up %d", task.stage, total,
                cfg.epochs, per_epoch, cfg.batch_tokens, cfg.lr, cfg.warmup_steps)

    bar = tqdm(total=total * cfg.batch_tokens, initial=step * cfg.batch_tokens, unit="tok", unit_scale=True,
               desc=f"train {task.stage}", disable=not progress, dynamic_ncols=True)
    try:
        for epoch in range(epochs_done, cfg.epochs):
            n_steps = min(per_epoch, total - step)
            if n_steps <= 0:
                break
            task.module.train()
            losses: list[float] = []
            extras: dict[str, float] = defaultdict(float)
            tokens = 0
            t0 = time.perf_counter()
            batches = source.iter_batches(task.names, cfg.batch_tokens, shuffle=True, buffer_chunks=cfg.buffer_chunks,
                                          seed=cfg.seed, epoch=epoch, drop_last=drop_last)
            try:
                for i, batch in enumerate(itertools.islice(batches, n_steps)):
                    optimizer.zero_grad(set_to_none=True)
                    try:
                        out = task.step(batch)
                    except FloatingPointError as e:  # raised by gate_loss on a non-finite loss
                        raise _diverged(task, cfg, step=step, epoch=epoch, batch=i,
                                        what=f"the loss is not finite ({e})", culprits=task.part_names,
                                        last_good=last_good, checkpoints=checkpoints) from e
                    if out.parts is not None:
                        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                        values = torch.cat([out.parts.float().reshape(-1), norm.float().reshape(1)])  # [P + 1]
                        values = values.tolist()  # the step's one host sync
                        bad = [name for name, v in zip(task.part_names, values) if not math.isfinite(v)]
                        if bad or not math.isfinite(values[-1]):
                            what = (f"the loss is {[values[task.part_names.index(b)] for b in bad]}" if bad
                                    else f"the gradient norm is {values[-1]}")
                            raise _diverged(task, cfg, step=step, epoch=epoch, batch=i, what=what,
                                            culprits=bad or task.part_names, last_good=last_good,
                                            checkpoints=checkpoints)
                        optimizer.step()
                        loss = sum(values[:-1])
                        losses.append(loss)
                        for k, v in out.extras.items():
                            extras[k] += v
                        bar.set_postfix(loss=f"{loss:.4g}", epoch=epoch, refresh=False)
                    scheduler.step()  # also on a skipped batch: the schedule is a function of the step index
                    step += 1
                    tokens += out.rows
                    bar.update(len(next(iter(batch.values()))))  # rows read (a gate step may use fewer)
            finally:
                batches.close()
            seconds = time.perf_counter() - t0
            task.module.eval()
            record = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan"), "tokens": tokens,
                      "seconds": seconds, "extras": {k: v / max(1, len(losses)) for k, v in extras.items()},
                      **task.end_epoch()}
            history.append(record)
            logger.info("%s epoch %d: loss %.4f, %d tokens in %.1f s (%.0f tok/s) %s", task.stage, epoch,
                        record["loss"], tokens, seconds, tokens / seconds if seconds > 0 else float("nan"),
                        {k: v for k, v in record.items() if isinstance(v, dict) and k != "extras"})
            if checkpoints is not None:
                checkpoints.save(_cpu_copy({
                    "stage": task.stage, "signature": task.signature, "code_version": TRAIN_CODE_VERSION,
                    "epochs_done": epoch + 1, "step": step, "model": task.module.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": _rng_state(task.generator, device), "history": history,
                }))
                last_good = epoch
    finally:
        bar.close()
    return _Fit(history=history, steps=step, resumed_from_epoch=resumed_from)


def _throughput(history: list[dict]) -> float:
    seconds = sum(r["seconds"] for r in history)
    return sum(r["tokens"] for r in history) / seconds if seconds > 0 else float("nan")


# ----------------------------------------------------------------------------- scoring (no grad)


@torch.no_grad()
def _score_rows(heads: nn.ModuleDict, teacher: TeacherWeights, batch: dict[str, np.ndarray], layers: Sequence[int],
                device: torch.device, teacher_top1: np.ndarray | None = None
                ) -> tuple[dict[int, dict[str, np.ndarray]], np.ndarray]:
    """Full-vocabulary top-1 and entropy of every head on a batch, against the teacher's top-1
    (from the batch's final states, or `teacher_top1` [n] when given) and the true next token.
    Blocks of `SCORE_BLOCK_ROWS` keep memory bounded."""
    targets = _tensor(batch["targets"].astype(np.int64), device)  # [n]
    n, blk = targets.shape[0], SCORE_BLOCK_ROWS
    if teacher_top1 is not None:
        t_top1 = _tensor(np.asarray(teacher_top1).astype(np.int64), device)  # [n]
    else:
        final = _tensor(batch["final"], device)  # [n, H]
        t_top1 = torch.cat([teacher.logits(final[a : a + blk]).argmax(-1) for a in range(0, n, blk)])  # [n]
    scores: dict[int, dict[str, np.ndarray]] = {}
    for layer in layers:
        head = heads[str(layer)]
        h = _tensor(batch[_layer_name(layer)], device)  # [n, H]
        top1, entropy = [], []
        for a in range(0, n, blk):
            logits = head(h[a : a + blk])  # [b, V]
            top1.append(logits.argmax(-1))  # [b]
            entropy.append(head_entropy(logits))  # [b]
        top1_t = torch.cat(top1)  # [n]
        scores[layer] = {
            "correct": (top1_t == t_top1).cpu().numpy(),
            "correct_true": (top1_t == targets).cpu().numpy(),  # never true where targets == -1
            "entropy": torch.cat(entropy).float().cpu().numpy(),
        }
    return scores, (targets != IGNORE_INDEX).cpu().numpy()


def _label_pass(heads: nn.ModuleDict, teacher: TeacherWeights, source: BatchSource, *, max_tokens: int | None,
                batch_rows: int, with_rows: bool, on_batch: Callable[[dict, dict], None] | None = None,
                progress: bool = False, desc: str = "score") -> dict[str, np.ndarray]:
    """One sequential no-grad pass over the first `max_tokens` rows: per token and head,
    whether the head's top-1 matches the teacher / the true token, and its entropy."""
    if max_tokens is not None and max_tokens <= 0:
        raise ValueError(f"max_tokens={max_tokens} must be positive or None")
    layers = _head_layers(heads)
    device = _module_device(heads)
    teacher = _teacher_on(teacher, device)
    names = [_layer_name(layer) for layer in layers] + ["final", "targets"] + (["row"] if with_rows else [])
    limit = source.num_tokens if max_tokens is None else min(max_tokens, source.num_tokens)
    parts: dict[str, list[np.ndarray]] = defaultdict(list)
    seen = 0
    was_training = heads.training
    heads.eval()
    bar = tqdm(total=limit, unit="tok", unit_scale=True, desc=desc, disable=not progress, dynamic_ncols=True)
    batches = source.iter_batches(names, batch_rows, shuffle=False)
    try:
        for batch in batches:
            take = min(len(batch["targets"]), limit - seen)
            if take < len(batch["targets"]):
                batch = {k: v[:take] for k, v in batch.items()}
            scores, valid = _score_rows(heads, teacher, batch, layers, device)
            if with_rows:
                parts["row"].append(batch["row"].astype(np.int64))
            parts["has_target"].append(valid)
            for layer, s in scores.items():
                for key, value in s.items():
                    parts[f"{key}_{layer}"].append(value)
            if on_batch is not None:
                on_batch(batch, scores)
            seen += take
            bar.update(take)
            if seen >= limit:
                break
    finally:
        batches.close()
        bar.close()
        heads.train(was_training)
    if not seen:
        raise ValueError("the source yielded no rows to score; check that the split was extracted")
    return {k: np.concatenate(v) for k, v in parts.items()}


def collect_exit_labels(heads: nn.ModuleDict, teacher: TeacherWeights, source: BatchSource, *,
                        max_tokens: int | None = None, batch_rows: int = 2048,
                        progress: bool = False) -> dict[str, np.ndarray]:
    """Per-token exit labels from one no-grad pass (the first `max_tokens` rows, in order), for
    gate training and calibration: ``row`` (int64), and per head layer l ``correct_<l>`` (top-1 ==
    the final layer's top-1), ``correct_true_<l>`` (top-1 == true next token), ``entropy_<l>``
    (float32, nats); ``has_target`` marks rows with a next token. Needs the source's ``row``."""
    return _label_pass(heads, teacher, source, max_tokens=max_tokens, batch_rows=batch_rows, with_rows=True,
                       progress=progress, desc="exit labels")


def evaluate_heads(heads: nn.ModuleDict, teacher: TeacherWeights, source: BatchSource, *,
                   max_tokens: int | None = None, batch_rows: int = 2048,
                   progress: bool = False) -> dict[int, HeadEval]:
    """Per-head quality on a source (the eval split; the logit lens for the baseline): a
    sequential no-grad pass with full-vocabulary logits over the first `max_tokens` rows."""
    labels = _label_pass(heads, teacher, source, max_tokens=max_tokens, batch_rows=batch_rows, with_rows=False,
                         progress=progress, desc="evaluate heads")
    valid = labels["has_target"]
    out = {}
    for layer in _head_layers(heads):
        correct, entropy = labels[f"correct_{layer}"], labels[f"entropy_{layer}"]
        out[layer] = HeadEval(
            layer=layer,
            agreement=float(correct.mean()),
            accuracy=float(labels[f"correct_true_{layer}"][valid].mean()) if valid.any() else float("nan"),
            mean_entropy=float(entropy.mean()),
            tokens=int(correct.size),
            entropy_auroc=_auroc(correct, -entropy),
        )
    return out


def logit_lens(teacher: TeacherWeights, layers: Sequence[int]) -> nn.ModuleDict:
    """The untrained baseline: per layer, exactly the backbone's final norm + LM head.

    A fresh adapter head is that (its up-projection starts at zero, so features = norm(h) + 0),
    which keeps one code path for scoring baselines and trained heads. Frozen; built under a
    forked RNG so asking for a baseline does not move the caller's random stream.
    """
    cfg = HeadsConfig(kind="adapter", rank=1)
    with torch.random.fork_rng(devices=[]):
        heads = build_heads(cfg, _check_layers(layers), teacher)
    heads.requires_grad_(False)
    return heads.eval()


# ----------------------------------------------------------------------------- heads


def _read_probe(source: BatchSource, names: list[str], rows: int) -> dict[str, np.ndarray]:
    """The first `rows` rows of the source in order: the same sample after every epoch."""
    batches = source.iter_batches(names, min(rows, source.num_tokens), shuffle=False)
    try:
        return next(batches)
    finally:
        batches.close()


def _token_mass(cfg: HeadsConfig, teacher: TeacherWeights, stored: TeacherTopK | None, source: BatchSource,
                device: torch.device) -> torch.Tensor:
    """[V] teacher probability summed per token over a sample of rows, from their top-k: up
    to `PROPOSAL_ROWS` evenly spaced rows of the stored top-k, else the final states of
    `PROBE_ROWS` shuffled rows (online: one extra backbone pass over them; the probe itself is
    the source's first rows, often a single document). A fixed sample (not a running count),
    so a resumed run draws from the same proposal."""
    if stored is not None:
        rows = np.unique(np.linspace(0, stored.num_tokens - 1, min(stored.num_tokens, PROPOSAL_ROWS)).astype(np.int64))
        ids, logprobs = stored.rows(rows)  # [r, k_stored] x2
        ids, logprobs = _tensor(ids.astype(np.int64), device), _tensor(logprobs, device)
    else:
        batches = source.iter_batches(["final"], min(PROBE_ROWS, source.num_tokens), shuffle=True, seed=cfg.seed,
                                      epoch=PROPOSAL_EPOCH)
        try:
            final = next(batches)["final"]  # [p, H]
        finally:
            batches.close()
        ids, logprobs = topk_of_batch(teacher, _tensor(final, device), cfg.topk)  # [p, k] x2
    mass = torch.zeros(teacher.vocab_size, dtype=torch.float64, device=device)  # [V]
    return mass.index_add_(0, ids.reshape(-1), logprobs.reshape(-1).double().exp())


def train_heads(cfg: HeadsConfig, layers: Sequence[int], num_layers: int, teacher: TeacherWeights,
                source: BatchSource, *, checkpoints: CheckpointIO | None = None, progress: bool = True,
                device: str | torch.device = "cpu", teacher_topk: TeacherTopK | None = None) -> HeadsResult:
    """Train one exit head per layer to reproduce the final layer (and/or the true next token).

    Per step one batch of `cfg.batch_tokens` rows is read. Each head's weighted loss is
    backpropagated as soon as it is computed, so only one head's graph is alive at a time (the
    gradient equals that of the summed loss: heads share no trainable parameter).

    Full loss: the teacher's logits are computed once per batch from the cached final state
    and shared by every head; each head builds [n, V] logits.
    `cfg.efficient_loss`: each row is scored on its teacher top-k (`cfg.topk`) plus
    `cfg.negatives` shared sampled ids (`topk_distill_loss`; drawn from `negative_proposal`
    over the teacher mass of a fixed sample of rows, or uniformly); no [n, V] tensor for the
    heads.
    The teacher's top-k comes from `teacher_topk` (precomputed once per cache, read by the
    source's ``row``: the teacher's full logits are then never computed, not even for the
    probe) or, without it, from the batch's final states (`topk_of_batch`: online training,
    or a cache without a precomputed top-k). `teacher_topk` is ignored by the full loss.
    """
    layers = _check_layers(layers)
    weights = layer_weights(layers, num_layers, cfg.layer_weights)
    device = torch.device(device)
    teacher_d = _teacher_on(teacher, device)
    stored = teacher_topk if cfg.efficient_loss else None
    if teacher_topk is not None and stored is None:
        logger.info("heads: the full loss does not use the precomputed teacher top-k; ignoring it")
    if stored is not None:
        if stored.num_tokens != source.num_tokens:
            raise ValueError(f"the teacher top-k covers {stored.num_tokens} rows but the source has {source.num_tokens}; "
                             "pass the top-k computed for this source's cache")
        if stored.k < cfg.topk:
            raise ValueError(f"the teacher top-k holds k={stored.k} per row but heads.topk={cfg.topk}; "
                             f"recompute it with k >= {cfg.topk} or lower heads.topk")
    layer_names = [_layer_name(layer) for layer in layers]
    names = layer_names + (["targets", "row"] if stored is not None else ["final", "targets"])
    part_names = [f"head {layer}" for layer in layers]

    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(cfg.seed)
        heads = build_heads(cfg, layers, teacher).to(device)
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        probe = _read_probe(source, names, PROBE_ROWS)
        probe_top1 = None if stored is None else stored.rows(probe["row"], 1)[0][:, 0]  # [p] teacher top-1
        inclusion = None  # [V] each token's chance to be a negative, set once per run
        if cfg.efficient_loss and cfg.negative_proposal == "frequency":
            proposal = negative_proposal(_token_mass(cfg, teacher_d, stored, source, device), cfg.proposal_power)  # [V]
            inclusion = inclusion_probabilities(proposal, cfg.negatives)  # [V]

        def candidates(batch: dict[str, np.ndarray], targets: torch.Tensor) -> TopkCandidates:
            if stored is not None:
                ids, logprobs = stored.rows(batch["row"], cfg.topk)  # [n, k], [n, k]
                ids, logprobs = _tensor(ids, device), _tensor(logprobs, device)
            else:
                ids, logprobs = topk_of_batch(teacher_d, _tensor(batch["final"], device), cfg.topk)  # [n, k] x2
            return TopkCandidates.build(ids, logprobs, targets, teacher.vocab_size, cfg.negatives,
                                        with_target=cfg.loss != "kl", generator=generator, inclusion=inclusion)

        def step(batch: dict[str, np.ndarray]) -> _StepOut:
            targets = _tensor(batch["targets"].astype(np.int64), device)  # [n]
            with torch.no_grad():
                if cfg.efficient_loss:
                    cand, teacher_logits = candidates(batch, targets), None
                else:
                    cand, teacher_logits = None, teacher_d.logits(_tensor(batch["final"], device))  # [n, V], once
            losses = []
            for w, layer in zip(weights, layers):
                head = heads[str(layer)]
                feats = head.features(_tensor(batch[_layer_name(layer)], device))  # [n, H]
                if cand is not None:
                    loss = topk_distill_loss(head, feats, cand, cfg)  # via [n, k + m (+1)]
                else:
                    loss = head_loss(head.project(feats), teacher_logits, targets, cfg)  # via [n, V]
                (w * loss).backward()
                losses.append((w * loss).detach())
            return _StepOut(parts=torch.stack(losses), rows=int(targets.shape[0]))  # [K]

        def end_epoch() -> dict[str, Any]:
            scores, valid = _score_rows(heads, teacher_d, probe, layers, device, teacher_top1=probe_top1)
            return {
                "agreement": {layer: float(s["correct"].mean()) for layer, s in scores.items()},
                "accuracy": {layer: float(s["correct_true"][valid].mean()) if valid.any() else float("nan")
                             for layer, s in scores.items()},
            }

        base = end_epoch()
        logger.info("heads before training (logit lens with the final norm), probe agreement %s", base["agreement"])
        task = _Task(
            stage="heads", module=heads, names=names, part_names=part_names, step=step, end_epoch=end_epoch,
            generator=generator,
            signature={"config": cfg.model_dump(mode="json"), "layers": layers, "num_layers": int(num_layers),
                       "vocab_size": teacher.vocab_size, "hidden_size": teacher.hidden_size,
                       "num_tokens": int(source.num_tokens), "code_version": TRAIN_CODE_VERSION,
                       "teacher_topk": None if stored is None else "precomputed"},
        )
        fit = _fit(task, cfg, source, checkpoints, progress, device)

    epochs = [
        EpochMetrics(epoch=r["epoch"], loss=r["loss"], agreement=dict(r["agreement"]), accuracy=dict(r["accuracy"]),
                     tokens=r["tokens"], seconds=r["seconds"],
                     tokens_per_s=r["tokens"] / r["seconds"] if r["seconds"] > 0 else float("nan"))
        for r in fit.history
    ]
    state = {k: v.detach().cpu().clone() for k, v in heads_state_dict(heads).items()}
    return HeadsResult(state=state, epochs=epochs, steps=fit.steps, tokens_per_s=_throughput(fit.history),
                       resumed_from_epoch=fit.resumed_from_epoch)


# ----------------------------------------------------------------------------- gates


class _HeldOutSlice:
    """Hidden states and labels of the first `cap` held-out rows met during the label pass, kept
    in memory so each epoch's gate AUROC costs no extra read of the source."""

    def __init__(self, layers: Sequence[int], cap: int):
        self.layers, self.cap, self.n = list(layers), cap, 0
        self.states: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.correct: dict[int, list[np.ndarray]] = defaultdict(list)
        self.entropy: dict[int, list[np.ndarray]] = defaultdict(list)

    def add(self, batch: dict[str, np.ndarray], scores: dict[int, dict[str, np.ndarray]]) -> None:
        if self.n >= self.cap:
            return
        sel = np.flatnonzero(heldout_mask(batch["row"]))[: self.cap - self.n]
        for layer in self.layers:
            self.states[layer].append(torch.from_numpy(np.ascontiguousarray(batch[_layer_name(layer)][sel])))
            self.correct[layer].append(scores[layer]["correct"][sel])
            self.entropy[layer].append(scores[layer]["entropy"][sel])
        self.n += len(sel)

    def finish(self, hidden_size: int) -> None:
        for layer in self.layers:
            states, correct, entropy = self.states[layer], self.correct[layer], self.entropy[layer]
            self.states[layer] = torch.cat(states) if states else torch.empty(0, hidden_size)  # [m, H]
            self.correct[layer] = np.concatenate(correct) if correct else np.empty(0, bool)  # [m]
            self.entropy[layer] = np.concatenate(entropy) if entropy else np.empty(0, np.float32)  # [m]


@torch.no_grad()
def _gate_auroc(gates: nn.ModuleDict, held: _HeldOutSlice, device: torch.device) -> dict[int, float]:
    out = {}
    for layer in held.layers:
        states = held.states[layer]
        p = torch.cat([gates[str(layer)].exit_probability(states[a : a + 4096].to(device))
                       for a in range(0, len(states), 4096)]) if len(states) else torch.empty(0)  # [m]
        out[layer] = _auroc(held.correct[layer], p.float().cpu().numpy())
    return out


def train_gates(cfg: GatesConfig, heads: nn.ModuleDict, layers: Sequence[int], num_layers: int,
                teacher: TeacherWeights, source: BatchSource, *, checkpoints: CheckpointIO | None = None,
                progress: bool = True, max_label_tokens: int | None = None,
                device: str | torch.device | None = None) -> GatesResult:
    """Train one exit gate per layer to predict whether that layer's (frozen) head already gives
    the final layer's top-1, with `gate_loss` over the whole cascade.

    First one no-grad pass labels every row (`collect_exit_labels`), kept in RAM indexed by row
    (N x K booleans); then the gates train on ``layer_<l>`` + ``row`` batches. Rows whose row-hash
    falls in the held-out 10 % (`heldout_mask`) are never trained on; the AUROC of p_exit on them
    (the first `GATE_EVAL_ROWS`) is reported per epoch, beside the head's own -entropy on the same
    rows. `max_label_tokens` labels only the first rows (quick runs): batches keep only labelled
    rows then, so most of each read is wasted. On resume the labels are recomputed (deterministic);
    the checkpoint stores a hash of them and refuses to resume on other labels.
    """
    layers = _check_layers(layers)
    missing = sorted(set(layers) - set(_head_layers(heads)))
    if missing:
        raise ValueError(f"no heads for gate layers {missing} (heads exist for {_head_layers(heads)}); "
                         "train heads for those layers or drop them from the gate layers")
    device = torch.device(device) if device is not None else _module_device(heads)
    heads = nn.ModuleDict({str(layer): heads[str(layer)] for layer in layers})  # a view, no copy
    K = len(layers)

    held = _HeldOutSlice(layers, GATE_EVAL_ROWS)
    labels = _label_pass(heads, teacher, source, max_tokens=max_label_tokens, batch_rows=max(cfg.batch_tokens, 1),
                         with_rows=True, on_batch=held.add, progress=progress, desc="gate labels")
    held.finish(teacher.hidden_size)
    rows = labels["row"]  # [N]
    if rows.min() < 0 or rows.max() >= source.num_tokens:
        raise ValueError(f"source rows span {rows.min()}..{rows.max()}, outside 0..{source.num_tokens - 1}; "
                         "the source's `row` must be the global row index")
    correct = np.stack([labels[f"correct_{layer}"] for layer in layers], axis=1)  # [N, K] bool
    table = np.zeros((source.num_tokens, K), dtype=bool)  # [num_tokens, K]
    table[rows] = correct
    usable = np.zeros(source.num_tokens, dtype=bool)  # [num_tokens] labelled and not held out
    usable[rows[~heldout_mask(rows)]] = True
    logger.info("gate labels: %d rows (%d for training, %d held out, %d in the AUROC slice); head agreement %s",
                len(rows), int(usable.sum()), len(rows) - int(usable.sum()), held.n,
                {layer: round(float(correct[:, k].mean()), 4) for k, layer in enumerate(layers)})
    if not usable.any():
        raise ValueError(f"no labelled training rows (max_label_tokens={max_label_tokens}); label more tokens")
    labels_hash = hashlib.sha256(rows.tobytes() + np.packbits(correct).tobytes()).hexdigest()

    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(cfg.seed)
        gates = build_gates(cfg, layers, teacher.hidden_size).to(device)
        generator = torch.Generator(device=device).manual_seed(cfg.seed)

        def step(batch: dict[str, np.ndarray]) -> _StepOut:
            r = batch["row"].astype(np.int64)  # [b]
            keep = usable[r]  # [b]
            if not keep.any():
                return _StepOut(parts=None, rows=0)
            logits = torch.stack([gates[str(layer)](_tensor(batch[_layer_name(layer)][keep], device))
                                  for layer in layers], dim=1)  # [n, K]
            target = _tensor(table[r[keep]], device)  # [n, K] bool
            loss, parts = gate_loss(logits, target, cfg, layers, num_layers, generator=generator)
            loss.backward()
            return _StepOut(parts=loss.detach().reshape(1), rows=int(keep.sum()),
                            extras={k: v for k, v in parts.items() if k != "loss"})

        task = _Task(
            stage="gates", module=gates, names=[_layer_name(layer) for layer in layers] + ["row"],
            part_names=["gates " + ",".join(map(str, layers))], step=step,
            end_epoch=lambda: {"auroc": _gate_auroc(gates, held, device)}, generator=generator,
            signature={"config": cfg.model_dump(mode="json"), "layers": layers, "num_layers": int(num_layers),
                       "hidden_size": teacher.hidden_size, "num_tokens": int(source.num_tokens),
                       "labels_sha256": labels_hash, "code_version": TRAIN_CODE_VERSION},
        )
        fit = _fit(task, cfg, source, checkpoints, progress, device)

    auroc = _gate_auroc(gates, held, device)
    entropy_auroc = {layer: _auroc(held.correct[layer], -held.entropy[layer]) for layer in layers}
    logger.info("gates: held-out AUROC of p_exit %s vs -entropy %s", auroc, entropy_auroc)
    epochs = [
        GateEpochMetrics(epoch=r["epoch"], loss=r["loss"], auroc=dict(r["auroc"]), components=dict(r["extras"]),
                         tokens=r["tokens"], seconds=r["seconds"],
                         tokens_per_s=r["tokens"] / r["seconds"] if r["seconds"] > 0 else float("nan"))
        for r in fit.history
    ]
    state = {k: v.detach().cpu().clone() for k, v in gates.state_dict().items()}
    return GatesResult(state=state, epochs=epochs, steps=fit.steps, auroc=auroc, entropy_auroc=entropy_auroc,
                       heldout_rows=held.n, resumed_from_epoch=fit.resumed_from_epoch)
