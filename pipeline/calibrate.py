"""The calibrate stage: thresholds for every head x predictor (entropy, gate) x level, by
Learn-then-Test and by the plain empirical fit, plus a cascade per predictor, as one typed
`Calibration` (the content of calibration.json), and how its thresholds hold on held-out tokens.

The math is `pipeline.thresholds` (one head) and `pipeline.cascade` (all heads at once); this
module only chooses the scores and correct flags per head and collects the results, so a
reader of calibration.json and a caller in Python see the same structure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Mapping, Sequence

import numpy as np

from pipeline.cascade import CascadeResult, calibrate_cascade
from pipeline.config import CalibrateConfig
from pipeline.scoring import ExitLabels
from pipeline.thresholds import (
    CalibrationError,
    LevelResult,
    ThresholdCheck,
    calibrate_head,
    check_enough_tokens,
    evaluate_thresholds,
)

__all__ = ["CALIBRATE_CODE_VERSION", "DEPLOY_RULE", "PREDICTORS", "CalibrationError", "Calibration", "Deployment",
           "HeadCalibration", "HeldOutCheck", "calibrate_exits", "check_held_out", "choose_deployed"]

CALIBRATE_CODE_VERSION = "calibrate-4"
"""Bump when calibration results (or calibration.json's shape) change for the same inputs; part
of the stage's content key. 2: typed `Calibration`; held-out rows name the head ``head``.
3: ``deployed``, the predictor each head exits on per level. 4: held-out ``held`` judged by the
family-wise rule of promotion (``held_out_rule``), not each check at 0.05."""

DEPLOY_RULE = ("per head and level, the predictor whose certified threshold lets the most tokens exit "
               "(on eval tokens when calibrated with an eval split, else on calib tokens); ties: entropy")
"""How `choose_deployed` picks; written into calibration.json beside the choice."""

PREDICTORS: dict[str, bool] = {"entropy": False, "gate": True}
"""Confidence scores a head can exit on, and whether higher means more confident."""

_METHODS = ("ltt", "empirical")
"""Both methods are always fitted, so a report can show what the guarantee costs."""


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class HeadCalibration:
    """One head's thresholds: per predictor and method, one `LevelResult` per level."""

    head: int
    agreement: float
    """Share of the calibration tokens this head gets right (against the calibration's reference)."""
    n: int
    results: dict[str, dict[str, list[LevelResult]]]
    """predictor -> method -> results in level order."""

    def to_dict(self) -> dict:
        per_predictor = {p: {m: [r.to_dict() for r in rs] for m, rs in by_method.items()}
                         for p, by_method in self.results.items()}
        return {"agreement": self.agreement, "n": self.n, **per_predictor}

    @classmethod
    def from_dict(cls, head: int, d: Mapping) -> "HeadCalibration":
        results = {p: {m: [LevelResult(**r) for r in rs] for m, rs in d[p].items()} for p in PREDICTORS if p in d}
        return cls(head=int(head), agreement=float(d["agreement"]), n=int(d["n"]), results=results)


@dataclass(frozen=True, kw_only=True)
class HeldOutCheck(ThresholdCheck):
    """A deployed (chosen) threshold of one head and predictor applied to held-out tokens."""

    predictor: str
    head: int

    def to_dict(self) -> dict:
        d = asdict(self)
        return {"predictor": d.pop("predictor"), "head": d.pop("head"), **d}

    @classmethod
    def from_dict(cls, d: Mapping) -> "HeldOutCheck":
        """Also reads rows written before the head was called ``head`` (``layer``)."""
        d = dict(d)
        if "head" not in d and "layer" in d:
            d["head"] = d.pop("layer")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class Deployment:
    """The predictor one head exits on at one level: of the predictors' certified thresholds
    (the calibration's method), the one with the highest exit rate (`choose_deployed`)."""

    head: int
    level: float
    predictor: str
    threshold: float | None
    """The deployed predictor's threshold (None: no predictor certified one; the head never exits)."""
    exit_rates: dict[str, float]
    """Per predictor: the share of tokens its threshold lets exit, on `Calibration.deployed_on` tokens."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "Deployment":
        return cls(head=int(d["head"]), level=float(d["level"]), predictor=str(d["predictor"]),
                   threshold=d["threshold"], exit_rates={k: float(v) for k, v in d["exit_rates"].items()})


@dataclass(frozen=True)
class Calibration:
    """Every head's thresholds per predictor, method and level, the cascade per predictor and
    method, and (once checked) the chosen thresholds on held-out tokens."""

    levels: list[float]
    delta: float
    method: str
    """The method a deployment uses (`chosen`); both are fitted."""
    reference: str
    """``final``: right = the final layer's top-1; ``true``: the true next token."""
    n: int
    """Calibration tokens used."""
    layers: list[int]
    final_layer: int
    heads: dict[int, HeadCalibration]
    cascade: dict[str, dict[str, list[CascadeResult]]]
    """predictor -> method -> one `CascadeResult` per level."""
    held_out: list[HeldOutCheck] | None = field(default=None)
    """The chosen thresholds on held-out tokens (`check_held_out`); None: not checked."""
    deployed: list[Deployment] | None = field(default=None)
    """Per head and level, the predictor a deployment exits on (`choose_deployed`); None: not chosen."""
    deployed_on: str | None = field(default=None)
    """``eval`` or ``calib``: the tokens whose exit rates chose `deployed`."""

    @property
    def predictors(self) -> list[str]:
        """Predictors calibrated (entropy always; gate when gate scores were given)."""
        return [p for p in PREDICTORS if p in self.cascade]

    def _check_predictor(self, predictor: str) -> None:
        if predictor not in self.predictors:
            raise CalibrationError(f"predictor {predictor!r} was not calibrated (calibrated: {self.predictors}); "
                                   "calibrate with gates to get gate thresholds")

    def chosen(self, predictor: str = "entropy") -> dict[int, list[LevelResult]]:
        """The thresholds a deployment uses: per head, the configured method's results."""
        self._check_predictor(predictor)
        return {layer: head.results[predictor][self.method] for layer, head in sorted(self.heads.items())}

    def chosen_cascade(self, predictor: str = "entropy") -> list[CascadeResult]:
        """The configured method's cascade thresholds, one result per level."""
        self._check_predictor(predictor)
        return self.cascade[predictor][self.method]

    def with_held_out(self, checks: Sequence[HeldOutCheck]) -> "Calibration":
        return replace(self, held_out=list(checks))

    def deployment(self, head: int, level: float) -> Deployment:
        """The deployed predictor of one head at one level."""
        for d in self.deployed or []:
            if d.head == head and abs(d.level - level) < 1e-9:
                return d
        raise CalibrationError(f"no deployed predictor for head {head} at level {level} (levels {self.levels}, "
                               f"heads {self.layers}{'' if self.deployed else '; none chosen: run choose_deployed'})")

    def to_dict(self) -> dict:
        """The JSON form (calibration.json); ``held_out`` only once checked."""
        out = {
            "levels": list(self.levels), "delta": self.delta, "method": self.method, "reference": self.reference,
            "n": self.n, "layers": list(self.layers), "final_layer": self.final_layer,
            "heads": {str(layer): head.to_dict() for layer, head in sorted(self.heads.items())},
            "cascade": {p: {m: [r.to_dict() for r in rs] for m, rs in by_method.items()}
                        for p, by_method in self.cascade.items()},
        }
        if self.held_out is not None:
            out["held_out"] = [r.to_dict() for r in self.held_out]
        if self.deployed is not None:
            out["deployed"] = {"rule": DEPLOY_RULE, "measured_on": self.deployed_on,
                               "choices": [d.to_dict() for d in self.deployed]}
        return out

    @classmethod
    def from_dict(cls, d: Mapping) -> "Calibration":
        """Inverse of `to_dict`, also after a JSON round trip."""
        try:
            held, deployed = d.get("held_out"), d.get("deployed")
            return cls(
                levels=[float(x) for x in d["levels"]], delta=float(d["delta"]), method=d["method"],
                reference=d["reference"], n=int(d["n"]), layers=[int(x) for x in d["layers"]],
                final_layer=int(d["final_layer"]),
                heads={int(k): HeadCalibration.from_dict(int(k), v) for k, v in d["heads"].items()},
                cascade={p: {m: [CascadeResult.from_dict(r) for r in rs] for m, rs in by_method.items()}
                         for p, by_method in d["cascade"].items()},
                held_out=None if held is None else [HeldOutCheck.from_dict(r) for r in held],
                deployed=None if deployed is None else [Deployment.from_dict(r) for r in deployed["choices"]],
                deployed_on=None if deployed is None else deployed.get("measured_on"),
            )
        except (KeyError, TypeError) as e:
            raise CalibrationError(f"not a calibration (calibration.json) dict: {e!r}; pass what "
                                   "Calibration.to_dict wrote") from e


# ----------------------------------------------------------------------------- the stage


def _kept(labels: ExitLabels, reference: str, max_tokens: int | None = None) -> np.ndarray:
    """Tokens calibration uses: all, or those with a next token when right means the true token;
    the first `max_tokens` of them."""
    keep = labels.has_target.astype(bool) if reference == "true" else np.ones(labels.num_tokens, dtype=bool)
    if max_tokens is not None:
        keep &= np.cumsum(keep) <= max_tokens
    return keep  # [N]


def _gate_scores(gate_probs: Mapping[int, np.ndarray], layers: Sequence[int], num_tokens: int) -> dict[int, np.ndarray]:
    missing = [layer for layer in layers if layer not in gate_probs]
    if missing:
        raise CalibrationError(f"no gate scores for heads {missing} (gates for {sorted(gate_probs)}); "
                               "pass the gates trained on these heads")
    out = {layer: np.asarray(gate_probs[layer]) for layer in layers}
    bad = {layer: p.shape for layer, p in out.items() if p.shape != (num_tokens,)}
    if bad:
        raise CalibrationError(f"gate scores have shapes {bad} but the labels hold {num_tokens} tokens; score gates "
                               "and heads on the same rows (gate_exit_probabilities on the same source)")
    return out


def calibrate_exits(labels: ExitLabels, gate_probs: Mapping[int, np.ndarray] | None, layers: Sequence[int],
                    final_layer: int, cfg: CalibrateConfig) -> Calibration:
    """Thresholds for every head x predictor (entropy, gate) x level, by Learn-then-Test and
    by the plain empirical fit, plus a cascade per predictor and method.

    `labels` come from `pipeline.scoring.collect_exit_labels` on the calib split; `gate_probs`
    are the gates' exit probabilities on the same rows (`pipeline.gates.gate_exit_probabilities`),
    or None without gates. Accuracy is measured against the final layer's top-1
    (``cfg.reference == "final"``) or the true next token (``"true"``).
    """
    layers = sorted(int(layer) for layer in layers)
    unknown = [layer for layer in layers if layer not in labels.correct]
    if unknown:
        raise CalibrationError(f"no labels for heads {unknown} (labelled: {labels.layers}); label those heads")
    keep = _kept(labels, cfg.reference, cfg.max_tokens)
    n = int(keep.sum())
    try:
        check_enough_tokens(n, cfg.levels, cfg.delta, learn_fraction=cfg.learn_fraction if cfg.method == "ltt" else 0.0)
    except CalibrationError as e:
        available = int(_kept(labels, cfg.reference).sum())
        if available > n:  # the cap, not the data, is short: say so first
            raise CalibrationError(f"calibrate.max_tokens={cfg.max_tokens} keeps {n} of the {available} calib tokens; "
                                   f"raise or unset it. {e}") from None
        raise
    right = labels.correct_for(cfg.reference)
    correct = {layer: right[layer][keep].astype(bool) for layer in layers}
    scores = {"entropy": {layer: labels.entropy[layer][keep] for layer in layers}}
    if gate_probs is not None:
        scores["gate"] = {layer: p[keep] for layer, p in _gate_scores(gate_probs, layers, labels.num_tokens).items()}
    opts = {"grid_size": cfg.grid_size, "learn_fraction": cfg.learn_fraction, "seed": cfg.seed}
    per_head: dict[int, dict[str, dict[str, list[LevelResult]]]] = {layer: {} for layer in layers}
    cascade: dict[str, dict[str, list[CascadeResult]]] = {}
    for predictor, by_layer in scores.items():
        hic = PREDICTORS[predictor]
        for layer in layers:
            per_head[layer][predictor] = {
                method: calibrate_head(by_layer[layer], correct[layer], cfg.levels, cfg.delta, method, hic, **opts)
                for method in _METHODS
            }
        cascade[predictor] = {
            method: calibrate_cascade(by_layer, correct, final_layer, cfg.levels, cfg.delta, method, hic, **opts)
            for method in _METHODS
        }
    heads = {layer: HeadCalibration(head=layer, agreement=float(correct[layer].mean()), n=n, results=per_head[layer])
             for layer in layers}
    return Calibration(levels=list(cfg.levels), delta=cfg.delta, method=cfg.method, reference=cfg.reference, n=n,
                       layers=layers, final_layer=int(final_layer), heads=heads, cascade=cascade)


def check_held_out(calibration: Calibration, labels: ExitLabels, gate_probs: Mapping[int, np.ndarray] | None,
                   predictor: str | None = None) -> list[HeldOutCheck]:
    """Apply a calibration's chosen thresholds to held-out tokens (the eval split): per
    predictor, head and level, the exit rate and accuracy there and whether the target held.
    `predictor` None: every predictor the calibration has."""
    predictors = calibration.predictors if predictor is None else [predictor]
    keep = _kept(labels, calibration.reference)
    right = labels.correct_for(calibration.reference)  # type: ignore[arg-type]
    rows: list[HeldOutCheck] = []
    for p in predictors:
        chosen = calibration.chosen(p)
        if p == "gate":
            if gate_probs is None:
                raise CalibrationError("the calibration has gate thresholds but no gate scores were given; pass the "
                                       "gates' exit probabilities on the held-out rows, or predictor='entropy'")
            scores = _gate_scores(gate_probs, list(chosen), labels.num_tokens)
        else:
            scores = {layer: labels.entropy[layer] for layer in chosen}
        for layer, results in chosen.items():
            if layer not in right:
                raise CalibrationError(f"held-out labels lack head {layer} (labelled: {labels.layers}); "
                                       "label the heads that were calibrated")
            for r in evaluate_thresholds(scores[layer][keep], right[layer][keep].astype(bool), results,
                                         higher_is_confident=PREDICTORS[p]):
                rows.append(HeldOutCheck(**asdict(r), predictor=p, head=layer))
    return rows


def choose_deployed(calibration: Calibration) -> Calibration:
    """Per head and level, deploy the predictor whose certified threshold lets the most tokens
    exit (`DEPLOY_RULE`); a tie goes to entropy, which costs nothing to compute.

    Exit rates are read from the held-out check when there is one (eval tokens), else from the
    calibration itself (calib tokens). Choosing on eval tokens keeps each threshold's guarantee
    for the chosen one: the choice depends only on data independent of the calib draw that
    certified it. Choosing on calib tokens picks the larger of two certified results, which
    holds with probability >= 1 - (number of predictors) * delta (a union bound)."""
    held = {(r.predictor, r.head, round(r.level, 9)): r.exit_rate for r in calibration.held_out or []}
    on = "eval" if held else "calib"
    choices = []
    for layer in calibration.layers:
        by_predictor = {p: calibration.chosen(p)[layer] for p in calibration.predictors}
        for i, level in enumerate(calibration.levels):
            rates, thresholds = {}, {}
            for p, results in by_predictor.items():
                r = results[i]
                thresholds[p] = r.threshold
                rates[p] = 0.0 if r.threshold is None else float(
                    held[(p, layer, round(r.level, 9))] if held else r.exit_rate)
            best = max(rates, key=lambda p: (rates[p], p == "entropy"))  # ties: entropy
            choices.append(Deployment(head=layer, level=float(level), predictor=best, threshold=thresholds[best],
                                      exit_rates=rates))
    return replace(calibration, deployed=choices, deployed_on=on)
