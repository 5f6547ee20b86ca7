"""Exit gates: a small MLP per exit layer that predicts whether that layer's head already gives
the final layer's answer, trained with sampled exit decisions over the whole cascade.

A token meets the gates in layer order and leaves at the first one that says "exit"; a token
that no gate lets out runs to the last layer. At inference a gate exits when
sigmoid(logit) > threshold (set by calibration); in training decisions are sampled so the
cost of a whole exit trajectory can be differentiated.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import GatesConfig
from pipeline.losses import softmax_entropy
from pipeline.sources import layer_key
from pipeline.teacher import TeacherWeights

logger = logging.getLogger(__name__)

_NOISE_EPS = 1e-6
"""Uniform draws are clamped to [eps, 1 - eps] so logistic noise stays finite."""


CONFIDENCE_NAMES = ("entropy", "top1_prob", "margin", "changed")
"""Per-token statistics of a head's logits, in the column order of `confidence_features`."""

FEATURE_COLUMNS: dict[str, int] = {"hidden": 0, "hidden+confidence": 3, "hidden+confidence+change": 4}
"""Per `GatesConfig.features`: how many leading `CONFIDENCE_NAMES` columns a gate reads."""

CONFIDENCE_BLOCK_ROWS = 256
"""Rows whose full-vocabulary head logits are held at once when gates compute their features."""


def confidence_features(logits: torch.Tensor, prev_top1: torch.Tensor | None = None) -> torch.Tensor:
    """The head's own confidence, [n, V] logits -> [n, 4] float32 in `CONFIDENCE_NAMES` order:
    entropy (nats), top-1 probability, top-1 minus top-2 probability, and 1.0 where the top-1
    differs from `prev_top1` (the previous exit head's top-1; 0.0 without one).

    These are CALM's and SpecEE's exit signals. At exit time the head's logits exist anyway, so
    they cost one softmax over what is already computed; a gate that reads them next to the
    hidden state starts from the best free statistic instead of having to rediscover it.
    """
    p, entropy = softmax_entropy(logits)  # [n, V], [n]
    top = p.topk(min(2, p.shape[-1]), dim=-1)  # values, indices [n, 2]
    top1_p = top.values[:, 0]  # [n]
    margin = top1_p - top.values[:, 1] if p.shape[-1] > 1 else top1_p  # [n]
    if prev_top1 is None:
        changed = torch.zeros_like(top1_p)
    else:
        changed = (top.indices[:, 0] != prev_top1.to(top.indices.device)).float()  # [n]
    return torch.stack([entropy, top1_p, margin, changed], dim=1)  # [n, 4]


def _check_features(features: str) -> int:
    if features not in FEATURE_COLUMNS:
        raise ValueError(f"gate features {features!r} are unknown; use one of {sorted(FEATURE_COLUMNS)}")
    return FEATURE_COLUMNS[features]


class ExitGate(nn.Module):
    """p_exit = sigmoid(Linear(ReLU(Linear(norm(h)) [+ C c])) [+ d . c]), hidden width H // hidden_ratio.

    `norm` is a trainable copy of the backbone's final norm (`pipeline.norm.FinalNorm`), the
    same module heads and the logit lens use: raw residual-stream states have layer-dependent
    scales (values up to ~23,000 on a few dimensions in SmolLM2), and the gate then starts from
    the very features the LM head reads. It runs in float32 for the same reason. The
    bottleneck keeps a gate at ~H^2/4 parameters, negligible next to a decoder layer, so
    evaluating it at every exit point costs nothing measurable. Returns logits; a sigmoid
    gives p_exit, and BCE on logits is numerically safer than on probabilities.

    With ``features`` other than ``hidden`` the gate also reads c, its head's standardised
    `confidence_features` (mean and std are buffers, saved with the weights): into the hidden
    layer (C) and straight to the logit (d). C starts at zero and d at zero or, in training, at
    the logistic regression of the label on c (`set_confidence_prior`): the gate starts as the
    best linear read-out of its head's confidence, which ranks at least as well as entropy
    alone, and the MLP learns what the hidden state adds. A fixed prior such as "exit on low
    entropy" would instead cost the gate on heads whose entropy says little: a gate trains for a
    few hundred steps, and Adam undoes a wrong weight no faster than it learns a right one.
    """

    def __init__(self, teacher: TeacherWeights, hidden_ratio: int = 4, layer: int | None = None,
                 features: str = "hidden"):
        super().__init__()
        self.layer = layer
        self.features = features
        self.num_features = _check_features(features)
        hidden_size = teacher.hidden_size
        width = max(1, hidden_size // hidden_ratio)
        self.norm = teacher.norm_module()
        self.mlp = nn.Sequential(nn.Linear(hidden_size, width), nn.ReLU(), nn.Linear(width, 1))
        if self.num_features:
            k = self.num_features
            self.register_buffer("feature_mean", torch.zeros(k))
            self.register_buffer("feature_std", torch.ones(k))
            self.confidence = nn.Linear(k, width)
            self.direct = nn.Linear(k, 1, bias=False)
            with torch.no_grad():  # untrained, the gate is the hidden-state gate
                self.confidence.weight.zero_()
                self.confidence.bias.zero_()
                self.direct.weight.zero_()

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise the confidence features with these per-column statistics (of the train
        rows); a constant column (std 0) is only centred."""
        k = self.num_features
        if not k:
            return
        mean, std = torch.as_tensor(mean, dtype=torch.float32)[:k], torch.as_tensor(std, dtype=torch.float32)[:k]
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    @torch.no_grad()
    def set_confidence_prior(self, weight: torch.Tensor, bias: float) -> None:
        """Start the confidence-to-logit weights at `weight` [k] (on standardised features) and add
        `bias` to the output bias: the gate's logit then starts at that linear score of c (plus the
        still small MLP output)."""
        if self.num_features:
            self.direct.weight.copy_(torch.as_tensor(weight, dtype=torch.float32).reshape(1, -1)[:, : self.num_features])
            self.mlp[2].bias.add_(float(bias))

    def forward(self, h: torch.Tensor, confidence: torch.Tensor | None = None) -> torch.Tensor:
        z = self.mlp[0](self.norm(h))  # [n, width] float32
        if not self.num_features:
            return self.mlp[2](self.mlp[1](z)).squeeze(-1)  # [n]
        if confidence is None:
            raise ValueError(f"gate {self.layer} reads its head's confidence ({self.features}); pass the head's "
                             "confidence_features(logits) as the second argument")
        c = (confidence[:, : self.num_features].float().to(z.device) - self.feature_mean) / self.feature_std  # [n, k]
        out = self.mlp[2](self.mlp[1](z + self.confidence(c)))  # [n, 1]
        return (out + self.direct(c)).squeeze(-1)  # [n]

    def exit_probability(self, h: torch.Tensor, confidence: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self(h, confidence))  # [n]


def build_gates(cfg: GatesConfig, layers: Sequence[int], teacher: TeacherWeights,
                features: str | None = None) -> nn.ModuleDict:
    """One fresh gate per exit layer, keyed by str(layer) like the heads; each normalises its
    input with its own copy of the teacher's final norm. `features` overrides `cfg.features`."""
    layers = [int(layer) for layer in layers]
    if not layers:
        raise ValueError("no exit layers given; pass at least one layer, e.g. [6, 12]")
    if not isinstance(teacher, TeacherWeights):
        raise TypeError(f"build_gates takes the TeacherWeights (for the final norm), not {type(teacher).__name__}; "
                        "pass backbone.teacher_weights() or the cache's teacher")
    features = cfg.features if features is None else features
    gates = nn.ModuleDict({str(layer): ExitGate(teacher, cfg.hidden_ratio, layer, features) for layer in layers})
    logger.info("built %d gates (width %d, features %s) at layers %s", len(layers),
                max(1, teacher.hidden_size // cfg.hidden_ratio), features, layers)
    return gates


def gates_need_confidence(gates: nn.ModuleDict) -> bool:
    """Whether any gate reads its head's confidence features (then scoring it needs the heads)."""
    return any(getattr(g, "num_features", 0) for g in gates.values())


@torch.no_grad()
def head_confidence(heads: nn.ModuleDict, hidden: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """`confidence_features` of each head on its layer's states [n, H] -> [n, 4], in layer order
    (the previous layer's head gives ``changed``), in blocks of `CONFIDENCE_BLOCK_ROWS` rows."""
    layers = sorted(hidden)
    n = len(hidden[layers[0]]) if layers else 0
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for a in range(0, n, CONFIDENCE_BLOCK_ROWS):
        prev = None
        for layer in layers:
            logits = heads[str(layer)](hidden[layer][a : a + CONFIDENCE_BLOCK_ROWS])  # [b, V]
            out[layer].append(confidence_features(logits, prev))  # [b, 4]
            prev = logits.argmax(-1)  # [b]
    return {layer: torch.cat(parts) if parts else torch.empty(0, len(CONFIDENCE_NAMES)) for layer, parts in out.items()}


@torch.no_grad()
def gate_exit_probabilities(gates: nn.ModuleDict, source, *, max_tokens: int | None = None,
                            batch_rows: int = 4096, heads: nn.ModuleDict | None = None,
                            features: dict[int, np.ndarray] | None = None) -> dict[int, np.ndarray]:
    """Each gate's p_exit for the source's rows in order (the first `max_tokens`): the same
    rows, in the same order, as `pipeline.scoring.collect_exit_labels` reads.

    Gates that read their head's confidence take it from `features` (per layer [N, 4], e.g.
    `ExitLabels.features` of the same rows: no second vocabulary pass) or compute it with
    `heads`; one of the two is needed then."""
    layers = [int(k) for k in gates.keys()]
    device = next(gates.parameters()).device
    need = gates_need_confidence(gates)
    if need and features is None and heads is None:
        raise ValueError(f"gates at layers {layers} read their heads' confidence features; pass heads= (the heads "
                         "the gates were trained on) or features= (ExitLabels.features of the same rows)")
    out: dict[int, list] = {layer: [] for layer in layers}
    seen = 0
    for batch in source.iter_batches([layer_key(layer) for layer in layers], batch_rows, shuffle=False):
        take = len(next(iter(batch.values())))
        if max_tokens is not None:
            take = min(take, max_tokens - seen)
        hidden = {layer: torch.from_numpy(batch[layer_key(layer)][:take]).to(device) for layer in layers}  # [b, H]
        conf: dict[int, torch.Tensor | None] = {layer: None for layer in layers}
        if need and features is not None:
            conf = {layer: torch.from_numpy(np.asarray(features[layer][seen : seen + take])) for layer in layers}
        elif need:
            conf = head_confidence(heads, hidden)
        for layer in layers:
            p = gates[str(layer)].exit_probability(hidden[layer], conf[layer])  # [b]
            out[layer].append(p.float().cpu().numpy())
        seen += take
        if max_tokens is not None and seen >= max_tokens:
            break
    return {layer: np.concatenate(v) if v else np.empty(0, np.float32) for layer, v in out.items()}


def gates_state_dict(gates: nn.ModuleDict) -> dict[str, torch.Tensor]:
    """Flat ``<layer>.<param>`` state of all gates, for safetensors."""
    return {f"{k}.{name}": t.detach().cpu().contiguous() for k, g in gates.items() for name, t in g.state_dict().items()}


def state_features(state: dict[str, torch.Tensor], layer: str | int) -> str:
    """The `GatesConfig.features` a saved gate was built with, read off its state's shapes (a
    gate saved before gates read confidence has none: ``hidden``)."""
    mean = state.get(f"{layer}.feature_mean")
    if mean is None:
        return "hidden"
    by_width = {k: name for name, k in FEATURE_COLUMNS.items()}
    if mean.numel() not in by_width:
        raise ValueError(f"gate {layer} stores {mean.numel()} confidence statistics; known widths are "
                         f"{sorted(by_width)}: load it with the code version that saved it")
    return by_width[mean.numel()]


def load_gates(cfg: GatesConfig, teacher: TeacherWeights, state: dict[str, torch.Tensor]) -> nn.ModuleDict:
    """Inverse of `gates_state_dict`, for gates built on this teacher's final norm. The features
    each gate reads come from its saved state, so gates saved before `cfg.features` existed (or
    with another setting) load as they were trained."""
    layers = sorted({int(k.split(".", 1)[0]) for k in state})
    gates = nn.ModuleDict({str(layer): ExitGate(teacher, cfg.hidden_ratio, layer, state_features(state, layer))
                           for layer in layers})
    for k, g in gates.items():
        own = {name.split(".", 1)[1]: t for name, t in state.items() if name.split(".", 1)[0] == k}
        try:
            g.load_state_dict(own)
        except RuntimeError as e:
            raise ValueError(
                f"saved state of gate {k} does not fit a gate on this teacher (hidden {teacher.hidden_size}, "
                f"{teacher.norm_kind} norm{' with bias' if teacher.final_norm_bias is not None else ''}, "
                f"hidden_ratio {cfg.hidden_ratio}); load with the teacher and gates config it was trained with: {e}"
            ) from e
    return gates


def straight_through_bernoulli(p: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Forward: a Bernoulli(p) sample, exactly 0 or 1. Backward: identity to p.

    Written as d + (p - p.detach()) rather than p + (d - p).detach() so the forward value is
    exactly d in floating point (the latter can give 0.99999994).
    """
    u = torch.rand(p.shape, generator=generator, device=p.device, dtype=p.dtype)  # [...]
    d = (u < p.detach()).to(p.dtype)  # [...] in {0, 1}; NaN p gives 0 and a NaN loss, not a crash here
    return d + (p - p.detach())


def gumbel_sigmoid(
    logits: torch.Tensor, tau_forward: float, tau_backward: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Binary straight-through Gumbel-softmax with decoupled temperatures.

    With logistic noise g (the difference of two Gumbels) and z = logits + tau_forward * g:
    - forward: d = [z > 0], exactly 0/1, distributed Bernoulli(sigmoid(logits / tau_forward));
      tau_forward sets how much the forward pass explores: 1 samples from the gate's own
      p_exit, -> 0 gives the deterministic inference rule p_exit > 0.5, > 1 explores more;
    - backward: the gradient of the relaxed sample sigmoid(z / tau_backward); tau_backward sets
      how smooth (biased, low-variance) or sharp (less biased, high-variance) the gradient is,
      independently of the forward behaviour. The relaxed sample uses the same noise, so it
      tends to d as tau_backward -> 0.
    At tau_forward = 1 this is the ordinary binary ST Gumbel-softmax at temperature tau_backward.
    """
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    u = u.clamp(_NOISE_EPS, 1.0 - _NOISE_EPS).to(logits.dtype)  # [...]
    g = torch.log(u) - torch.log1p(-u)  # [...] logistic noise
    z = logits + tau_forward * g  # [...]
    hard = (z > 0).to(logits.dtype)  # [...] in {0, 1}
    soft = torch.sigmoid(z / tau_backward)  # [...]
    return hard + (soft - soft.detach())


def sample_exit_decisions(
    gate_logits: torch.Tensor, cfg: GatesConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Training-time exit decisions [n, K] in {0, 1} with a gradient, per `cfg.sampling`."""
    if cfg.sampling == "gumbel":
        return gumbel_sigmoid(gate_logits, cfg.tau_forward, cfg.tau_backward, generator)
    return straight_through_bernoulli(torch.sigmoid(gate_logits), generator)


def _check_layers(n_gates: int, layers: Sequence[int], final_layer: int) -> list[int]:
    layers = [int(layer) for layer in layers]
    if len(layers) != n_gates:
        raise ValueError(f"got {n_gates} gate columns but {len(layers)} layers {layers}; pass one layer per column")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"layers {layers} must be strictly increasing: columns are the cascade in depth order")
    if layers and layers[-1] > final_layer:
        raise ValueError(f"exit layer {layers[-1]} is past final_layer {final_layer}")
    return layers


def _reach(stop: torch.Tensor) -> torch.Tensor:
    """Probability (or indicator) of reaching gate k without stopping earlier:
    reach_k = prod_{i<k} (1 - stop_i). stop [n, K] -> [n, K]."""
    ones = torch.ones_like(stop[:, :1])  # [n, 1]
    return torch.cumprod(torch.cat([ones, 1.0 - stop[:, :-1]], dim=1), dim=1)  # [n, K]


def expected_exit_layer(p: torch.Tensor, layers: Sequence[int], final_layer: int) -> torch.Tensor:
    """E[exit layer] of the cascade, p [n, K] -> [n]:
    sum_k layer_k * p_k * prod_{i<k}(1 - p_i) + final_layer * prod_k (1 - p_k)
    (a token no gate lets out runs to the end)."""
    layers = _check_layers(p.shape[1], layers, final_layer)
    reach = _reach(p)  # [n, K]
    depth = torch.tensor(layers, dtype=p.dtype, device=p.device)  # [K]
    never = reach[:, -1] * (1.0 - p[:, -1])  # [n]
    return (reach * p) @ depth + final_layer * never  # [n]


def routing_loss(
    p: torch.Tensor, layers: Sequence[int], final_layer: int, target_layer: float | torch.Tensor
) -> torch.Tensor:
    """MSE between the expected and the target exit layer, in units of the backbone depth.

    Dividing by final_layer makes the term a squared *fraction of depth*, so routing_weight
    means the same for a 12- and a 30-layer backbone and sits on the scale of the BCE term
    (in raw layers it would be up to final_layer^2 ~ 900 times larger). target_layer is one
    number or a per-token tensor [n].
    """
    expected = expected_exit_layer(p, layers, final_layer)  # [n]
    target = torch.as_tensor(target_layer, dtype=expected.dtype, device=expected.device)
    return F.mse_loss(expected / final_layer, (target / final_layer).expand_as(expected))


def gate_targets(head: torch.Tensor, teacher_top1: torch.Tensor) -> torch.Tensor:
    """1.0 where the head's top-1 equals the teacher's, else 0.0: what a gate should predict.

    head: logits [n, V] (or subset logits sharing the teacher's index space) or top-1 ids [n];
    teacher_top1: ids [n] or logits [n, V]. Returns [n] float.
    """
    head_top1 = head.argmax(dim=-1) if head.ndim == 2 else head  # [n]
    teacher_top1 = teacher_top1.argmax(dim=-1) if teacher_top1.ndim == 2 else teacher_top1  # [n]
    return (head_top1 == teacher_top1).float()  # [n]


def oracle_exit_layer(correct: torch.Tensor, layers: Sequence[int], final_layer: int) -> torch.Tensor:
    """The earliest exit layer whose head is correct, final_layer where none is: the exit a
    perfect gate cascade would take. correct [n, K] -> [n] float."""
    layers = _check_layers(correct.shape[1], layers, final_layer)
    depth = torch.tensor(layers + [final_layer], dtype=torch.float32, device=correct.device)  # [K+1]
    hit = torch.cat([correct > 0.5, torch.ones_like(correct[:, :1], dtype=torch.bool)], dim=1)  # [n, K+1]
    return depth[hit.int().argmax(dim=1)]  # [n] (argmax returns the first maximum)


def exit_decision_cost(d: torch.Tensor, correct: torch.Tensor, threshold: float) -> torch.Tensor:
    """Mean per-token, per-gate cost of exit trajectories d [n, K] (0/1 with a gradient) given
    correct [n, K]; see `gate_loss` for the formulation and why c = (1 - threshold) / threshold."""
    c = (1.0 - threshold) / threshold
    reach = _reach(d)  # [n, K] 1 while no earlier gate exited
    step_cost = d * (1.0 - correct) + c * (1.0 - d) * correct  # [n, K]
    return (reach * step_cost).sum(dim=1).mean() / d.shape[1]


def gate_loss(
    gate_logits: torch.Tensor,
    correct: torch.Tensor,
    cfg: GatesConfig,
    layers: Sequence[int],
    final_layer: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of all gates of one batch. gate_logits [n, K] (columns in layer order), correct
    [n, K] (1 where that head's top-1 equals the final layer's).

    loss = BCE(p, correct) + decision + routing_weight * routing

    - BCE: every gate, on every token, learns P(its head agrees with the final layer). It is
      the low-variance signal, and its scores are what calibration later thresholds.
    - decision: the cost of a sampled exit trajectory. Decisions d ~ p are sampled (straight-
      through or Gumbel per cfg.sampling); a token reaches gate k if no earlier gate exited,
      reach_k = prod_{i<k}(1 - d_i). At each reached gate, exiting with a wrong head costs 1,
      passing a correct head costs c = (1 - threshold) / threshold (compute spent for nothing):
          decision = mean_tokens (1/K) sum_k reach_k * [d_k (1 - correct_k) + c (1 - d_k) correct_k]
      For one gate in isolation the Bayes-optimal rule for this cost is p > 1 / (1 + c) =
      threshold: the training objective and the inference rule agree, with no extra constant.
      Through reach_k, the gradient of d_k is the cost of exiting at k minus the cost of the
      rest of the trajectory, so gates learn as a cascade: an early gate is pushed to exit
      when later gates would only waste compute, and not when later heads fix its error.
    - routing: MSE (in fractions of depth) between the expected exit layer under p and the
      token's oracle exit layer (first correct head, else final_layer), weighted by
      cfg.routing_weight; skipped at weight 0.
    Returns the loss and float components for logging. Raises FloatingPointError if the loss
    is not finite (the components are read back anyway, so the check costs nothing extra).
    """
    layers = _check_layers(gate_logits.shape[1], layers, final_layer)
    logits = gate_logits.float()  # [n, K]
    correct = correct.to(logits.dtype)  # [n, K]
    p = torch.sigmoid(logits)  # [n, K]

    bce = F.binary_cross_entropy_with_logits(logits, correct)

    d = sample_exit_decisions(logits, cfg, generator)  # [n, K] in {0, 1}
    decision = exit_decision_cost(d, correct, cfg.threshold)
    reach = _reach(d)  # [n, K]

    target = oracle_exit_layer(correct, layers, final_layer)  # [n]
    routing = routing_loss(p, layers, final_layer, target)
    loss = bce + decision
    if cfg.routing_weight > 0:
        loss = loss + cfg.routing_weight * routing

    with torch.no_grad():
        stayed = reach[:, -1] * (1.0 - d[:, -1])  # [n] 1 where the sampled trajectory never exits
        values = {
            "loss": loss,
            "bce": bce,
            "decision": decision,
            "routing": routing,
            "sampled_exit_rate": (1.0 - stayed).mean(),
            "expected_exit_layer": expected_exit_layer(p, layers, final_layer).mean(),
            "oracle_exit_layer": target.mean(),
            "gate_accuracy": ((p > cfg.threshold).to(correct.dtype) == correct).float().mean(),
        }
        # one device-to-host copy for all components
        parts = dict(zip(values, torch.stack([v.float() for v in values.values()]).tolist()))
    if not math.isfinite(parts["loss"]):
        raise FloatingPointError(
            f"gate loss is not finite ({parts}); check the cached hidden states for inf/NaN "
            "(float16 overflow) or lower gates.lr"
        )
    return loss, parts


def fit_confidence_prior(features: torch.Tensor, labels: torch.Tensor, steps: int = 50) -> tuple[torch.Tensor, float]:
    """Logistic regression of `labels` [n] (0/1) on standardised `features` [n, k]: weights [k] and
    intercept, by L-BFGS on the mean BCE (k is 3 or 4, so this takes well under a second for a
    few hundred thousand rows). Returns zeros when one class is absent."""
    x, y = features.float(), labels.float()  # [n, k], [n]
    if y.numel() == 0 or bool((y == y[0]).all()):
        return torch.zeros(x.shape[1]), 0.0
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    if not (torch.isfinite(w).all() and torch.isfinite(b)):
        return torch.zeros(x.shape[1]), 0.0
    return w.detach(), float(b.detach())
