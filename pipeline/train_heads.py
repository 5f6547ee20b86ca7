"""Training of exit heads from a source of hidden states: one head per exit layer learns to
reproduce the final layer (and/or the true next token).

The epoch loop, schedule, checkpoints, resume and divergence handling are `pipeline.fit`'s;
this module supplies the step (the losses of every head on one batch) and the per-epoch probe.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.config import HeadsConfig
from pipeline.fit import CheckpointIO, FitTask, StepOut, fit_epochs, rng_devices, throughput
from pipeline.heads import build_heads, heads_state_dict
from pipeline.losses import (
    TopkCandidates,
    head_loss,
    inclusion_probabilities,
    layer_weights,
    negative_proposal,
    topk_distill_loss,
)
from pipeline.scoring import score_rows
from pipeline.sources import BatchSource, batch_tensor, check_layers, layer_key
from pipeline.teacher import TeacherTopK, TeacherWeights, topk_of_batch

logger = logging.getLogger(__name__)

HEADS_CODE_VERSION = "heads-5"
"""Bump when head training results change for the same inputs; part of the stage's content key
and of its checkpoints' signature (gates have their own, so a gates change keeps the heads)."""

PROBE_ROWS = 2048
"""Rows of the per-epoch probe of `train_heads` (the first rows of the source, read in order)."""

PROPOSAL_ROWS = 65536
"""Rows, evenly spaced over a precomputed teacher top-k, whose teacher mass sets the
negative proposal of the efficient loss (reading them all would cost a pass over the store)."""

PROPOSAL_EPOCH = 1_000_000
"""Shuffling epoch of the row sample behind the proposal when no top-k is stored: a stream
of its own, apart from the training epochs' orders."""


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
    loss_curve: list[list[float]]
    """[[steps done, mean loss of the steps since the previous point], ...] (`pipeline.fit`);
    empty for an epoch restored from a checkpoint that predates the curve."""
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
        ids, logprobs = batch_tensor(ids.astype(np.int64), device), batch_tensor(logprobs, device)
    else:
        batches = source.iter_batches(["final"], min(PROBE_ROWS, source.num_tokens), shuffle=True, seed=cfg.seed,
                                      epoch=PROPOSAL_EPOCH)
        try:
            final = next(batches)["final"]  # [p, H]
        finally:
            batches.close()
        ids, logprobs = topk_of_batch(teacher, batch_tensor(final, device), cfg.topk)  # [p, k] x2
    mass = torch.zeros(teacher.vocab_size, dtype=torch.float64, device=device)  # [V]
    return mass.index_add_(0, ids.reshape(-1), logprobs.reshape(-1).double().exp())


def _check_topk(cfg: HeadsConfig, stored: TeacherTopK, source: BatchSource) -> None:
    if stored.num_tokens != source.num_tokens:
        raise ValueError(f"the teacher top-k covers {stored.num_tokens} rows but the source has {source.num_tokens}; "
                         "pass the top-k computed for this source's cache")
    if stored.k < cfg.topk:
        raise ValueError(f"the teacher top-k holds k={stored.k} per row but heads.topk={cfg.topk}; "
                         f"recompute it with k >= {cfg.topk} or lower heads.topk")


@dataclass
class HeadObjective:
    """What a head-training step and the per-epoch probe need, apart from which heads train:
    `train_heads` (float heads) and `pipeline.quantize` (their ternary retraining) share it, so
    both minimise one loss, probed one way. Built by `prepare_head_objective`."""

    cfg: HeadsConfig
    layers: list[int]
    weights: list[float]
    """Per-layer loss weights (`layer_weights`), in `layers` order."""
    names: list[str]
    """Arrays each step reads."""
    teacher: TeacherWeights
    """On `device`."""
    stored: TeacherTopK | None
    """The precomputed teacher top-k the efficient loss reads by row, or None."""
    probe: dict[str, np.ndarray]
    probe_top1: np.ndarray | None
    """[p] the probe's teacher top-1 from `stored`; None: from the probe's final states."""
    inclusion: torch.Tensor | None
    """[V] each token's chance to be a negative (the `frequency` proposal), set once per run."""
    generator: torch.Generator
    device: torch.device

    def candidates(self, batch: dict[str, np.ndarray], targets: torch.Tensor) -> TopkCandidates:
        cfg, device = self.cfg, self.device
        if self.stored is not None:
            ids, logprobs = self.stored.rows(batch["row"], cfg.topk)  # [n, k], [n, k]
            ids, logprobs = batch_tensor(ids, device), batch_tensor(logprobs, device)
        else:
            ids, logprobs = topk_of_batch(self.teacher, batch_tensor(batch["final"], device), cfg.topk)  # [n, k] x2
        return TopkCandidates.build(ids, logprobs, targets, self.teacher.vocab_size, cfg.negatives,
                                    with_target=cfg.loss != "kl", generator=self.generator, inclusion=self.inclusion)

    def step(self, heads: nn.ModuleDict, batch: dict[str, np.ndarray],
             extra: Callable[[nn.Module], torch.Tensor] | None = None) -> StepOut:
        """Forward and backward of every head on one batch. Each head's weighted loss (plus
        `extra(head)`, a regulariser of that head alone) is backpropagated as soon as it is
        computed, so only one head's graph is alive at a time (the gradient equals that of the
        summed loss: heads share no trainable parameter). Parts: one per head."""
        cfg, device = self.cfg, self.device
        targets = batch_tensor(batch["targets"].astype(np.int64), device)  # [n]
        with torch.no_grad():
            if cfg.efficient_loss:
                cand, teacher_logits = self.candidates(batch, targets), None
            else:
                cand, teacher_logits = None, self.teacher.logits(batch_tensor(batch["final"], device))  # [n, V], once
        losses = []
        for w, layer in zip(self.weights, self.layers):
            head = heads[str(layer)]
            feats = head.features(batch_tensor(batch[layer_key(layer)], device))  # [n, H]
            if cand is not None:
                loss = topk_distill_loss(head, feats, cand, cfg)  # via [n, k + m (+1)]
            else:
                loss = head_loss(head.project(feats), teacher_logits, targets, cfg)  # via [n, V]
            loss = w * loss if extra is None else w * loss + extra(head)
            loss.backward()
            losses.append(loss.detach())
        return StepOut(parts=torch.stack(losses), rows=int(targets.shape[0]))  # [K]

    def probe_metrics(self, heads: nn.ModuleDict) -> dict[str, Any]:
        """Full-vocabulary agreement and accuracy of every head on the probe (no grad)."""
        scores, valid = score_rows(heads, self.teacher, self.probe, self.layers, self.device,
                                   teacher_top1=self.probe_top1)
        return {
            "agreement": {layer: float(s.correct.mean()) for layer, s in scores.items()},
            "accuracy": {layer: float(s.correct_true[valid].mean()) if valid.any() else float("nan")
                         for layer, s in scores.items()},
        }

    def signature(self, num_layers: int, num_tokens: int) -> dict[str, Any]:
        """What a checkpoint of a training with this objective must match."""
        return {"config": self.cfg.model_dump(mode="json"), "layers": self.layers, "num_layers": int(num_layers),
                "vocab_size": self.teacher.vocab_size, "hidden_size": self.teacher.hidden_size,
                "num_tokens": int(num_tokens), "teacher_topk": None if self.stored is None else "precomputed"}


def prepare_head_objective(cfg: HeadsConfig, layers: Sequence[int], num_layers: int, teacher: TeacherWeights,
                           source: BatchSource, generator: torch.Generator, device: torch.device,
                           teacher_topk: TeacherTopK | None = None) -> HeadObjective:
    """Check the inputs, read the probe and (for the `frequency` proposal) the token mass once
    per run. Draws nothing from the torch RNG, so it can follow the heads' initialisation."""
    layers = check_layers(layers)
    teacher_d = teacher.to(device)  # once, not per batch
    stored = teacher_topk if cfg.efficient_loss else None
    if teacher_topk is not None and stored is None:
        logger.info("heads: the full loss does not use the precomputed teacher top-k; ignoring it")
    if stored is not None:
        _check_topk(cfg, stored, source)
    names = [layer_key(layer) for layer in layers]
    names += ["targets", "row"] if stored is not None else ["final", "targets"]
    probe = _read_probe(source, names, PROBE_ROWS)
    probe_top1 = None if stored is None else stored.rows(probe["row"], 1)[0][:, 0]  # [p] teacher top-1
    inclusion = None
    if cfg.efficient_loss and cfg.negative_proposal == "frequency":
        proposal = negative_proposal(_token_mass(cfg, teacher_d, stored, source, device), cfg.proposal_power)  # [V]
        inclusion = inclusion_probabilities(proposal, cfg.negatives)  # [V]
    return HeadObjective(cfg=cfg, layers=layers, weights=layer_weights(layers, num_layers, cfg.layer_weights),
                         names=names, teacher=teacher_d, stored=stored, probe=probe, probe_top1=probe_top1,
                         inclusion=inclusion, generator=generator, device=device)


def head_epoch_metrics(history: list[dict[str, Any]]) -> list[EpochMetrics]:
    """`EpochMetrics` of a `FitOutcome.history` whose end-of-epoch metrics are `probe_metrics`."""
    return [
        EpochMetrics(epoch=r["epoch"], loss=r["loss"], loss_curve=list(r.get("loss_curve", [])),
                     agreement=dict(r["agreement"]), accuracy=dict(r["accuracy"]),
                     tokens=r["tokens"], seconds=r["seconds"],
                     tokens_per_s=r["tokens"] / r["seconds"] if r["seconds"] > 0 else float("nan"))
        for r in history
    ]


def train_heads(cfg: HeadsConfig, layers: Sequence[int], num_layers: int, teacher: TeacherWeights,
                source: BatchSource, *, checkpoints: CheckpointIO | None = None, progress: bool = True,
                device: str | torch.device = "cpu", teacher_topk: TeacherTopK | None = None) -> HeadsResult:
    """Train one exit head per layer to reproduce the final layer (and/or the true next token).

    Per step one batch of `cfg.batch_tokens` rows is read; `HeadObjective.step` computes and
    backpropagates each head's weighted loss in turn.

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
    layers = check_layers(layers)
    device = torch.device(device)

    with torch.random.fork_rng(devices=rng_devices(device)):
        torch.manual_seed(cfg.seed)
        heads = build_heads(cfg, layers, teacher).to(device)
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        objective = prepare_head_objective(cfg, layers, num_layers, teacher, source, generator, device, teacher_topk)

        base = objective.probe_metrics(heads)
        logger.info("heads before training (logit lens with the final norm), probe agreement %s", base["agreement"])
        task = FitTask(
            stage="heads", code_version=HEADS_CODE_VERSION, module=heads, names=objective.names,
            part_names=[f"head {layer}" for layer in layers], step=lambda batch: objective.step(heads, batch),
            end_epoch=lambda: objective.probe_metrics(heads), generator=generator,
            signature={**objective.signature(num_layers, source.num_tokens), "code_version": HEADS_CODE_VERSION},
        )
        fit = fit_epochs(task, cfg, source, checkpoints, progress, device)

    state = {k: v.detach().cpu().clone() for k, v in heads_state_dict(heads).items()}
    return HeadsResult(state=state, epochs=head_epoch_metrics(fit.history), steps=fit.steps,
                       tokens_per_s=throughput(fit.history), resumed_from_epoch=fit.resumed_from_epoch)
