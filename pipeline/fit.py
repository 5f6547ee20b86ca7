"""The epoch loop shared by head and gate training.

Why it is built this way:

- One loop (`fit_epochs`) serves heads and gates. Optimizer, warm-up + cosine schedule,
  gradient clipping, per-epoch checkpoints, exact resume and divergence handling exist once; a
  trainer supplies only a `FitTask`: a step function (forward + backward of one batch) and an
  end-of-epoch measurement.
- Resume is exact: a checkpoint holds the weights, optimizer, scheduler, every RNG state used,
  the step and the metrics so far, and batch order depends only on (seed, epoch). Training two
  epochs straight and one epoch + crash + resume give identical weights.
- Non-finite numbers stop training at the step they appear, before the optimizer applies
  them and before anything is saved (`TrainingDiverged`); the last good checkpoint stays.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import nn
from pipeline.progress import ProgressBar

from pipeline.config import GatesConfig, HeadsConfig
from pipeline.sources import BatchSource

logger = logging.getLogger(__name__)


LOSS_CURVE_POINTS = 200
"""About this many points of the per-step loss curve over a whole training (each the mean loss of
a window of steps), so a report can draw it without the manifest growing with the step count."""


class CheckpointIO(Protocol):
    """Where a training loop keeps its state between epochs (`stores.checkpoints.FileCheckpoints`).

    `save` must be atomic (a crash leaves the previous state loadable) and must persist a
    snapshot; the loop hands it CPU copies, so it may also just keep the dict.
    """

    def load(self) -> dict | None: ...

    def save(self, state: dict) -> None: ...


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


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (the CPU for an empty module)."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return torch.device("cpu")


def rng_devices(device: torch.device) -> list[int]:
    """CUDA device ids whose RNG `torch.random.fork_rng` must save and restore (none on CPU)."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


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


class WarmupCosine:
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
class StepOut:
    """What one training step reports back to the loop."""

    parts: torch.Tensor | None
    """[P] detached loss terms whose sum is the step's loss; None: no usable rows (no update)."""
    rows: int
    extras: dict[str, float] = field(default_factory=dict)


@dataclass
class FitTask:
    """What differs between training heads and gates; `fit_epochs` does everything else."""

    stage: str  # "heads" | "gates": in logs, errors and checkpoints
    code_version: str  # the trainer's code version, saved in its checkpoints
    module: nn.Module
    names: list[str]  # arrays each step reads
    part_names: list[str]  # what each entry of StepOut.parts is, for divergence messages
    step: Callable[[dict[str, np.ndarray]], StepOut]  # forward + backward of one batch
    end_epoch: Callable[[], dict[str, Any]]  # metrics after an epoch (no grad)
    generator: torch.Generator  # every random draw of a step uses it (candidates, exit samples)
    signature: dict[str, Any]  # what a checkpoint must match to be resumed from


@dataclass
class FitOutcome:
    """Per-epoch records (loss, its curve, tokens, seconds, extras and the task's end-of-epoch
    metrics), including epochs done before a resume. ``loss_curve``: [[steps done, mean loss of
    the window ending there], ...], windows of `loss_window` steps, the last one of an epoch
    possibly shorter."""

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


def _resume(task: FitTask, state: dict, optimizer, scheduler, device, checkpoints) -> tuple[int, int, list]:
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


def _diverged(task: FitTask, cfg, *, step: int, epoch: int, batch: int, what: str, culprits: list[str],
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


def fit_epochs(task: FitTask, cfg: HeadsConfig | GatesConfig, source: BatchSource, checkpoints: CheckpointIO | None,
         progress: bool, device: torch.device) -> FitOutcome:
    """The epoch loop shared by heads and gates: AdamW, warm-up + cosine, clipping, per-epoch
    checkpoint, exact resume, and a stop at the first non-finite loss or gradient."""
    per_epoch, total, drop_last = _plan(cfg, source)
    window = loss_window(total)
    if cfg.warmup_steps >= total:
        logger.warning("%s: warmup_steps=%d >= %d total steps, so the learning rate never reaches lr=%g; "
                       "lower warmup_steps", task.stage, cfg.warmup_steps, total, cfg.lr)
    optimizer = _adamw(task.module, cfg.lr, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(cfg.warmup_steps, total))
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

    bar = ProgressBar(total=total * cfg.batch_tokens, initial=step * cfg.batch_tokens, unit="tok", unit_scale=True,
               desc=f"train {task.stage}", disable=not progress, dynamic_ncols=True)
    try:
        for epoch in range(epochs_done, cfg.epochs):
            n_steps = min(per_epoch, total - step)
            if n_steps <= 0:
                break
            task.module.train()
            losses: list[float] = []
            curve: list[list[float]] = []
            in_window: list[float] = []
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
                        in_window.append(loss)
                        for k, v in out.extras.items():
                            extras[k] += v
                        bar.set_postfix(loss=f"{loss:.4g}", epoch=epoch, refresh=False)
                    scheduler.step()  # also on a skipped batch: the schedule is a function of the step index
                    step += 1
                    if in_window and step % window == 0:
                        curve.append([step, float(np.mean(in_window))])
                        in_window = []
                    tokens += out.rows
                    bar.update(len(next(iter(batch.values()))))  # rows read (a gate step may use fewer)
            finally:
                batches.close()
            if in_window:  # the epoch's last, shorter window
                curve.append([step, float(np.mean(in_window))])
            seconds = time.perf_counter() - t0
            task.module.eval()
            record = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan"),
                      "loss_curve": curve, "tokens": tokens, "seconds": seconds,
                      "extras": {k: v / max(1, len(losses)) for k, v in extras.items()}, **task.end_epoch()}
            history.append(record)
            logger.info("%s epoch %d: loss %.4f, %d tokens in %.1f s (%.0f tok/s) %s", task.stage, epoch,
                        record["loss"], tokens, seconds, tokens / seconds if seconds > 0 else float("nan"),
                        {k: v for k, v in record.items() if isinstance(v, dict) and k != "extras"})
            if checkpoints is not None:
                checkpoints.save(_cpu_copy({
                    "stage": task.stage, "signature": task.signature, "code_version": task.code_version,
                    "epochs_done": epoch + 1, "step": step, "model": task.module.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": _rng_state(task.generator, device), "history": history,
                }))
                last_good = epoch
    finally:
        bar.close()
    return FitOutcome(history=history, steps=step, resumed_from_epoch=resumed_from)


def loss_window(total_steps: int) -> int:
    """Steps per point of the loss curve: at most about `LOSS_CURVE_POINTS` points in all."""
    return max(1, -(-total_steps // LOSS_CURVE_POINTS))


def throughput(history: list[dict]) -> float:
    """Tokens per second over all epochs of a `FitOutcome.history`."""
    seconds = sum(r["seconds"] for r in history)
    return sum(r["tokens"] for r in history) / seconds if seconds > 0 else float("nan")
