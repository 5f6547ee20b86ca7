"""Training of exit gates: one gate per exit layer learns whether that layer's (frozen) head
already gives the final layer's top-1, with `gate_loss` over the whole cascade.

The epoch loop is `pipeline.fit`'s; labels come from `pipeline.scoring.collect_exit_labels`.
A tenth of the rows, chosen by a hash of the row index (`heldout_mask`), is never trained on:
the per-epoch AUROC is measured there.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.config import GatesConfig
from pipeline.fit import CheckpointIO, FitTask, StepOut, fit_epochs, module_device, rng_devices
from pipeline.gates import CONFIDENCE_NAMES, build_gates, fit_confidence_prior, gate_loss
from pipeline.scoring import RowScores, auroc, collect_exit_labels, head_layers
from pipeline.sources import BatchSource, batch_tensor, check_layers, layer_key
from pipeline.teacher import TeacherWeights

logger = logging.getLogger(__name__)

GATES_CODE_VERSION = "gates-6"
"""Bump when gate training results change for the same inputs; part of the stage's content key
and of its checkpoints' signature (heads have their own). 6: gates read their heads' confidence
(`GatesConfig.features`), standardised with train statistics saved in the gate."""

GATE_HELDOUT_FRACTION = 0.1
"""Share of rows (by a hash of the row index) kept out of gate training to measure AUROC."""

GATE_EVAL_ROWS = 16384
"""At most this many held-out rows keep their hidden states in memory for the per-epoch gate
AUROC (K x H float32 per row); the standard error of an AUROC on that many rows is well under
0.01."""

_PROB_BLOCK_ROWS = 4096
"""Rows per gate forward when scoring the held-out slice."""


@dataclass(frozen=True)
class GateEpochMetrics:
    epoch: int
    loss: float
    """Mean `gate_loss` over the epoch's steps."""
    loss_curve: list[list[float]]
    """[[steps done, mean loss of the steps since the previous point], ...] (`pipeline.fit`)."""
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


class _HeldOutSlice:
    """Hidden states and labels of the first `cap` held-out rows met during the label pass, kept
    in memory so each epoch's gate AUROC costs no extra read of the source."""

    def __init__(self, layers: Sequence[int], cap: int):
        self.layers, self.cap, self.n = list(layers), cap, 0
        self.states: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.correct: dict[int, list[np.ndarray]] = defaultdict(list)
        self.entropy: dict[int, list[np.ndarray]] = defaultdict(list)
        self.features: dict[int, list[np.ndarray]] = defaultdict(list)

    def add(self, batch: dict[str, np.ndarray], scores: dict[int, RowScores]) -> None:
        if self.n >= self.cap:
            return
        sel = np.flatnonzero(heldout_mask(batch["row"]))[: self.cap - self.n]
        for layer in self.layers:
            self.states[layer].append(torch.from_numpy(np.ascontiguousarray(batch[layer_key(layer)][sel])))
            self.correct[layer].append(scores[layer].correct[sel])
            self.entropy[layer].append(scores[layer].entropy[sel])
            self.features[layer].append(scores[layer].features[sel])
        self.n += len(sel)

    def finish(self, hidden_size: int) -> None:
        for layer in self.layers:
            states, correct, entropy = self.states[layer], self.correct[layer], self.entropy[layer]
            self.states[layer] = torch.cat(states) if states else torch.empty(0, hidden_size)  # [m, H]
            self.correct[layer] = np.concatenate(correct) if correct else np.empty(0, bool)  # [m]
            self.entropy[layer] = np.concatenate(entropy) if entropy else np.empty(0, np.float32)  # [m]
            feats = self.features[layer]
            self.features[layer] = np.concatenate(feats) if feats else np.empty((0, len(CONFIDENCE_NAMES)), np.float32)


@dataclass
class GateLabels:
    """The label pass of gate training, kept for its epochs: per row, whether each head agrees
    with the final layer, which rows train, and the held-out slice the AUROC is measured on.
    `train_gates` and the ternary retraining (`pipeline.quantize`) share it."""

    layers: list[int]
    table: np.ndarray
    """[num_tokens, K] bool: head k agrees with the final layer at that row (False: unlabelled)."""
    usable: np.ndarray
    """[num_tokens] bool: labelled and not held out."""
    features: np.ndarray
    """[num_tokens, K, 4] float32: each head's `confidence_features` at that row (0: unlabelled)."""
    held: _HeldOutSlice
    sha256: str
    """Hash of the labelled rows and their labels: a checkpoint refuses to resume on others."""

    def step(self, gates: nn.ModuleDict, batch: dict[str, np.ndarray], cfg: GatesConfig, num_layers: int,
             generator: torch.Generator, device: torch.device,
             extra: Callable[[], torch.Tensor] | None = None) -> StepOut:
        """`gate_loss` of every gate on the batch's usable rows (plus `extra()`), backpropagated.
        Parts: the one loss; extras: `gate_loss`'s components."""
        r = batch["row"].astype(np.int64)  # [b]
        keep = self.usable[r]  # [b]
        if not keep.any():
            return StepOut(parts=None, rows=0)
        feats = batch_tensor(self.features[r[keep]], device)  # [n, K, 4]
        logits = torch.stack([gates[str(layer)](batch_tensor(batch[layer_key(layer)][keep], device), feats[:, k])
                              for k, layer in enumerate(self.layers)], dim=1)  # [n, K]
        target = batch_tensor(self.table[r[keep]], device)  # [n, K] bool
        loss, parts = gate_loss(logits, target, cfg, self.layers, num_layers, generator=generator)
        if extra is not None:
            loss = loss + extra()
        loss.backward()
        return StepOut(parts=loss.detach().reshape(1), rows=int(keep.sum()),
                       extras={k: v for k, v in parts.items() if k != "loss"})

    @torch.no_grad()
    def gate_auroc(self, gates: nn.ModuleDict, device: torch.device) -> dict[int, float]:
        """Per gate: AUROC of p_exit for "the head agrees" on the held-out slice."""
        out = {}
        for layer in self.layers:
            states, feats = self.held.states[layer], torch.from_numpy(self.held.features[layer])  # [m, H], [m, 4]
            p = torch.cat([gates[str(layer)].exit_probability(states[a : a + _PROB_BLOCK_ROWS].to(device),
                                                              feats[a : a + _PROB_BLOCK_ROWS].to(device))
                           for a in range(0, len(states), _PROB_BLOCK_ROWS)]) if len(states) else torch.empty(0)  # [m]
            out[layer] = auroc(self.held.correct[layer], p.float().cpu().numpy())
        return out

    def feature_stats(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Per head: mean and std [4] of its confidence features over the training rows, what
        `ExitGate.set_feature_stats` standardises with."""
        rows = self.features[self.usable]  # [n, K, 4]
        return {layer: (rows[:, k].mean(axis=0), rows[:, k].std(axis=0)) for k, layer in enumerate(self.layers)}

    def standardize(self, gates: nn.ModuleDict) -> None:
        """Give every gate that reads confidence its training rows' feature statistics, and start
        it at the logistic regression of its label on them (`fit_confidence_prior`)."""
        train = self.features[self.usable]  # [n, K, 4]
        for k, (layer, (mean, std)) in enumerate(self.feature_stats().items()):
            gate = gates[str(layer)]
            if not getattr(gate, "num_features", 0):
                continue
            gate.set_feature_stats(torch.from_numpy(mean), torch.from_numpy(std))
            x = (torch.from_numpy(train[:, k, : gate.num_features]) - gate.feature_mean.cpu()) / gate.feature_std.cpu()
            w, b = fit_confidence_prior(x, torch.from_numpy(self.table[self.usable, k]))
            gate.set_confidence_prior(w.to(gate.feature_mean.device), b)
            logger.info("gate %d: confidence prior %s (+ %.3f) on %s", layer, [round(v, 3) for v in w.tolist()], b,
                        CONFIDENCE_NAMES[: gate.num_features])

    def entropy_auroc(self) -> dict[int, float]:
        """The same rows with the head's own -entropy as the score: the baseline a gate must beat."""
        return {layer: auroc(self.held.correct[layer], -self.held.entropy[layer]) for layer in self.layers}


def label_gate_rows(heads: nn.ModuleDict, layers: Sequence[int], teacher: TeacherWeights, source: BatchSource, *,
                    batch_rows: int, max_label_tokens: int | None = None, progress: bool = False) -> GateLabels:
    """One no-grad pass (`collect_exit_labels`) labels every row, kept in RAM indexed by row
    (N x K booleans); the first `GATE_EVAL_ROWS` held-out rows keep their states for the AUROC."""
    layers = check_layers(layers)
    missing = sorted(set(layers) - set(head_layers(heads)))
    if missing:
        raise ValueError(f"no heads for gate layers {missing} (heads exist for {head_layers(heads)}); "
                         "train heads for those layers or drop them from the gate layers")
    heads = nn.ModuleDict({str(layer): heads[str(layer)] for layer in layers})  # a view, no copy
    held = _HeldOutSlice(layers, GATE_EVAL_ROWS)
    labels = collect_exit_labels(heads, teacher, source, max_tokens=max_label_tokens, batch_rows=max(batch_rows, 1),
                                 on_batch=held.add, progress=progress)
    held.finish(teacher.hidden_size)
    rows = labels.row  # [N]
    if rows.min() < 0 or rows.max() >= source.num_tokens:
        raise ValueError(f"source rows span {rows.min()}..{rows.max()}, outside 0..{source.num_tokens - 1}; "
                         "the source's `row` must be the global row index")
    correct = np.stack([labels.correct[layer] for layer in layers], axis=1)  # [N, K] bool
    table = np.zeros((source.num_tokens, len(layers)), dtype=bool)  # [num_tokens, K]
    table[rows] = correct
    features = np.zeros((source.num_tokens, len(layers), len(CONFIDENCE_NAMES)), dtype=np.float32)  # [num_tokens, K, 4]
    features[rows] = np.stack([labels.features[layer] for layer in layers], axis=1)
    usable = np.zeros(source.num_tokens, dtype=bool)  # [num_tokens] labelled and not held out
    usable[rows[~heldout_mask(rows)]] = True
    logger.info("gate labels: %d rows (%d for training, %d held out, %d in the AUROC slice); head agreement %s",
                len(rows), int(usable.sum()), len(rows) - int(usable.sum()), held.n,
                {layer: round(float(correct[:, k].mean()), 4) for k, layer in enumerate(layers)})
    if not usable.any():
        raise ValueError(f"no labelled training rows (max_label_tokens={max_label_tokens}); label more tokens")
    sha = hashlib.sha256(rows.tobytes() + np.packbits(correct).tobytes()).hexdigest()
    return GateLabels(layers=layers, table=table, usable=usable, features=features, held=held, sha256=sha)


def gate_epoch_metrics(history: list[dict[str, Any]]) -> list[GateEpochMetrics]:
    """`GateEpochMetrics` of a `FitOutcome.history` whose end-of-epoch metrics hold `auroc`."""
    return [
        GateEpochMetrics(epoch=r["epoch"], loss=r["loss"], loss_curve=list(r.get("loss_curve", [])),
                         auroc=dict(r["auroc"]), components=dict(r["extras"]),
                         tokens=r["tokens"], seconds=r["seconds"],
                         tokens_per_s=r["tokens"] / r["seconds"] if r["seconds"] > 0 else float("nan"))
        for r in history
    ]


def train_gates(cfg: GatesConfig, heads: nn.ModuleDict, layers: Sequence[int], num_layers: int,
                teacher: TeacherWeights, source: BatchSource, *, checkpoints: CheckpointIO | None = None,
                progress: bool = True, max_label_tokens: int | None = None,
                device: str | torch.device | None = None) -> GatesResult:
    """Train one exit gate per layer to predict whether that layer's (frozen) head already gives
    the final layer's top-1, with `gate_loss` over the whole cascade.

    First one no-grad pass labels every row (`label_gate_rows`); then the gates train on
    ``layer_<l>`` + ``row`` batches. Rows whose row-hash falls in the held-out 10 %
    (`heldout_mask`) are never trained on; the AUROC of p_exit on them (the first
    `GATE_EVAL_ROWS`) is reported per epoch, beside the head's own -entropy on the same rows.
    `max_label_tokens` labels only the first rows (quick runs): batches keep only labelled
    rows then, so most of each read is wasted. On resume the labels are recomputed
    (deterministic); the checkpoint stores a hash of them and refuses to resume on other labels.
    """
    layers = check_layers(layers)
    device = torch.device(device) if device is not None else module_device(heads)
    labels = label_gate_rows(heads, layers, teacher, source, batch_rows=cfg.batch_tokens,
                             max_label_tokens=max_label_tokens, progress=progress)

    with torch.random.fork_rng(devices=rng_devices(device)):
        torch.manual_seed(cfg.seed)
        gates = build_gates(cfg, layers, teacher).to(device)
        labels.standardize(gates)
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        task = FitTask(
            stage="gates", code_version=GATES_CODE_VERSION, module=gates,
            names=[layer_key(layer) for layer in layers] + ["row"],
            part_names=["gates " + ",".join(map(str, layers))],
            step=lambda batch: labels.step(gates, batch, cfg, num_layers, generator, device),
            end_epoch=lambda: {"auroc": labels.gate_auroc(gates, device)}, generator=generator,
            signature={"config": cfg.model_dump(mode="json"), "layers": layers, "num_layers": int(num_layers),
                       "hidden_size": teacher.hidden_size, "num_tokens": int(source.num_tokens),
                       "labels_sha256": labels.sha256, "code_version": GATES_CODE_VERSION},
        )
        fit = fit_epochs(task, cfg, source, checkpoints, progress, device)

    gate_auroc, entropy_auroc = labels.gate_auroc(gates, device), labels.entropy_auroc()
    logger.info("gates: held-out AUROC of p_exit %s vs -entropy %s", gate_auroc, entropy_auroc)
    state = {k: v.detach().cpu().clone() for k, v in gates.state_dict().items()}
    return GatesResult(state=state, epochs=gate_epoch_metrics(fit.history), steps=fit.steps, auroc=gate_auroc,
                       entropy_auroc=entropy_auroc, heldout_rows=labels.held.n,
                       resumed_from_epoch=fit.resumed_from_epoch)


def gates_below_entropy(gate_auroc: dict[int, float], entropy_auroc: dict[int, float]) -> list[dict]:
    """The heads whose gate ranks tokens worse than the head's own entropy (a free statistic):
    ``[{"head", "gate_auroc", "entropy_auroc"}]``, by layer. A NaN AUROC (one class) is no verdict."""
    rows = []
    for layer in sorted(gate_auroc):
        g, e = gate_auroc[layer], entropy_auroc.get(layer, float("nan"))
        if g == g and e == e and g < e:  # NaN != NaN
            rows.append({"head": layer, "gate_auroc": round(float(g), 4), "entropy_auroc": round(float(e), 4)})
    return rows

