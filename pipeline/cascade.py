"""Thresholds for a cascade of exit heads at once, for one overall accuracy level.

A token exits at the first head (in layer order) whose score passes its threshold; tokens
passing none run to the final layer and count as correct. Where `pipeline.thresholds` bounds
the accuracy *among exited tokens* of one head, here the target is the accuracy over *all*
tokens of the whole cascade; one knob (a predicted-accuracy level λ read off each head's
isotonic accuracy curve) sets every head's threshold, and Learn-then-Test walks it from strict
to loose. The per-head checks and the binomial test are `pipeline.thresholds`'s.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:  # sklearn takes seconds to import; only fitting a curve needs it
    from sklearn.isotonic import IsotonicRegression

from pipeline.thresholds import (
    CalibrationError,
    Method,
    binomial_p_values,
    check_delta,
    check_enough_tokens,
    check_learn_fraction,
    check_levels,
    check_method,
    check_scores,
    learn_test_split,
    to_confidence,
    to_score,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class CascadeResult:
    """Thresholds for all heads at once, for one overall accuracy level.

    A token exits at the first head (in layer order) whose score passes its threshold;
    tokens passing none run to ``final_layer`` and count as correct. ``exit_rates`` holds the
    share of all tokens leaving at each head layer, plus the final layer's share.
    """

    level: float
    thresholds: dict[int, float | None]
    exit_rates: dict[int, float]
    accuracy: float
    avg_exit_layer: float
    method: str
    delta: float | None
    n: int
    higher_is_confident: bool = False
    final_layer: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "CascadeResult":
        """Inverse of `to_dict` after a JSON round trip (layer keys come back as strings)."""
        return cls(**{**d, "thresholds": {int(k): v for k, v in d["thresholds"].items()},
                      "exit_rates": {int(k): float(v) for k, v in d["exit_rates"].items()}})


@dataclass(frozen=True)
class CascadeCheck:
    """Fitted cascade thresholds applied to new tokens (`evaluate_cascade`)."""

    level: float
    exit_rates: dict[int, float]
    accuracy: float
    avg_exit_layer: float
    met: bool
    """Overall accuracy on the new tokens is >= level."""
    n: int


# --------------------------------------------------------------------------------------
# accuracy as a function of the score


def accuracy_curve(scores, correct, higher_is_confident: bool = False) -> IsotonicRegression:
    """Monotone estimate of P(correct | score), increasing in confidence.

    Fitted on the raw scores (decreasing in entropy, increasing in gate probability), so
    ``curve.predict(scores)`` takes the same units; outside the fitted range it is clipped.
    """
    from sklearn.isotonic import IsotonicRegression

    s, c = check_scores(scores, correct)
    iso = IsotonicRegression(increasing=higher_is_confident, y_min=0.0, y_max=1.0, out_of_bounds="clip")
    return iso.fit(s, c.astype(np.float64))


def _curve_thresholds(curve: IsotonicRegression, lambdas: np.ndarray, higher_is_confident: bool) -> np.ndarray:
    """Per λ, the least confidence at which the centred curve predicts accuracy >= λ (conf units).

    An isotonic fit is a staircase of flat blocks, so inverting it directly maps a whole
    range of λ onto one block edge and the λ grid moves the thresholds in big jumps (the
    overall accuracy then steps by 2-3 points and the cascade ends up needlessly strict).
    Instead the curve is read through its block centres, linearly interpolated between them
    (centred isotonic regression, Oron & Flournoy 2017): still monotone, strictly increasing
    between blocks, so thresholds move continuously with λ.

    +inf where the curve never reaches λ (the head never exits); the lowest fitted confidence
    where it is >= λ everywhere (tokens less confident than any calibration token stay).
    """
    xs = to_confidence(curve.X_thresholds_, higher_is_confident)
    ys = np.asarray(curve.y_thresholds_, dtype=np.float64)
    if not higher_is_confident:  # make xs increasing in confidence
        xs, ys = xs[::-1], ys[::-1]
    ys = np.maximum.accumulate(ys)  # guard: non-decreasing in confidence
    lowest = xs[0]
    block = np.concatenate([[0], np.cumsum(np.diff(ys) > 0)])  # [knots] block id per knot
    counts = np.bincount(block)
    xs = np.bincount(block, weights=xs) / counts  # [blocks] centre of each flat block
    ys = np.bincount(block, weights=ys) / counts  # [blocks] strictly increasing
    lam = np.asarray(lambdas, dtype=np.float64)
    i = np.searchsorted(ys, lam, side="left")  # first centre with ys >= λ
    out = np.full(lam.shape, np.inf)
    inside = (i > 0) & (i < ys.size)
    j = i[inside]
    x0, x1, y0, y1 = xs[j - 1], xs[j], ys[j - 1], ys[j]
    out[inside] = x0 + (lam[inside] - y0) * (x1 - x0) / (y1 - y0)  # y0 < λ <= y1
    out[i == 0] = lowest
    return out


# --------------------------------------------------------------------------------------
# a cascade of heads


def _check_cascade_inputs(scores: Mapping[int, np.ndarray], correct: Mapping[int, np.ndarray], final_layer: int):
    if not scores:
        raise CalibrationError("scores holds no heads; pass {layer: per-token scores} for at least one head")
    if set(scores) != set(correct):
        raise CalibrationError(
            f"scores has heads {sorted(scores)} but correct has {sorted(correct)}; give correct flags for exactly the same head layers"
        )
    layers = sorted(int(h) for h in scores)
    if layers[-1] >= final_layer:
        raise CalibrationError(f"head layers {layers} must all lie below final_layer={final_layer}; pass the backbone's last layer as final_layer")
    arrays = {h: check_scores(scores[h], correct[h], what=f"scores of head {h}") for h in layers}
    sizes = {h: a[0].size for h, a in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise CalibrationError(f"heads score different numbers of tokens {sizes}; every head must score the same calibration tokens")
    return layers, arrays


def _first_pass_index(conf: np.ndarray, t_grid: np.ndarray) -> np.ndarray:
    """Per token, the first grid index (t_grid non-increasing) whose threshold it passes."""
    return np.searchsorted(-t_grid, -conf, side="left")  # = #{g : t_grid[g] > conf}


def _cascade_errors_per_grid(confs: list[np.ndarray], oks: list[np.ndarray], t_grids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Errors and exits per head for every grid point of a cascade, in O(heads * tokens).

    Token i leaves at head h for grid indices g in [first_h(i), min_{j<h} first_j(i)): it
    passes h from first_h on and has passed no earlier head before the earliest of theirs.
    Counting these intervals with difference arrays avoids a [grid, tokens] matrix.
    """
    G = t_grids[0].size
    n = confs[0].size
    errors = np.zeros(G + 1, dtype=np.int64)
    exits = np.zeros((len(confs), G + 1), dtype=np.int64)
    earliest = np.full(n, G)  # min first-pass index over earlier heads
    for h, (conf, ok, t_grid) in enumerate(zip(confs, oks, t_grids)):
        first = _first_pass_index(conf, t_grid)  # [n]
        live = first < earliest
        lo, hi = first[live], earliest[live]
        exits[h] += np.bincount(lo, minlength=G + 1) - np.bincount(hi, minlength=G + 1)
        wrong = ~ok[live]
        errors += np.bincount(lo[wrong], minlength=G + 1) - np.bincount(hi[wrong], minlength=G + 1)
        earliest = np.minimum(earliest, first)
    return np.cumsum(errors)[:G], np.cumsum(exits, axis=1)[:, :G]


def _cascade_outcome(confs, oks, t_confs, layers, final_layer) -> tuple[dict[int, float], float, float]:
    """Exit shares per layer, overall accuracy and average exit layer at fixed thresholds."""
    n = confs[0].size
    remaining = np.ones(n, dtype=bool)
    wrong = 0
    rates: dict[int, float] = {}
    for conf, ok, t, layer in zip(confs, oks, t_confs, layers):
        leave = remaining & (conf >= t) if t is not None else np.zeros(n, dtype=bool)
        rates[layer] = float(leave.sum()) / n
        wrong += int((leave & ~ok).sum())
        remaining &= ~leave
    rates[final_layer] = float(remaining.sum()) / n
    avg = float(sum(layer * r for layer, r in rates.items()))
    return rates, 1.0 - wrong / n, avg


def calibrate_cascade(
    scores: Mapping[int, np.ndarray],
    correct: Mapping[int, np.ndarray],
    final_layer: int,
    levels,
    delta: float | None,
    method: Method = "ltt",
    higher_is_confident: bool = False,
    *,
    grid_size: int = 200,
    learn_fraction: float = 0.2,
    seed: int = 0,
) -> list[CascadeResult]:
    """Per-head thresholds so that the whole cascade is right on a share >= level of ALL tokens.

    A token exits at the first head (in layer order) passing its threshold; tokens passing
    none reach `final_layer` and count as correct. Searching all threshold combinations is
    out of reach, so one knob λ sets them all: each head's threshold is where its isotonic
    accuracy curve (`accuracy_curve`) predicts P(correct) >= λ. Heads then exit exactly the
    tokens they are likely to get right, comparably across heads, and lowering λ loosens
    every head at once, so the average exit layer falls monotonically along the λ grid
    (``grid_size + 1`` points from 1 to 0).

    ``empirical``: curves and the search use all tokens; the loosest λ whose overall
    accuracy is >= level. ``ltt``: curves come from a ``learn_fraction`` split (so the
    λ -> thresholds map is fixed before testing) and the other tokens test
    ``H_λ: overall accuracy < level`` with the exact binomial p-value of the error count
    among all of them, walking from λ = 1 (nothing exits, trivially rejected) towards 0
    while ``p <= δ``. Guarantee: with probability >= 1 - δ the returned thresholds give
    overall accuracy >= level on new tokens of the same distribution. Here the target is
    accuracy over all tokens, not among exited ones, so the walk can start at the strictest
    point with no power lost. Reported rates and accuracy are on all calibration tokens.
    """
    method = check_method(method)
    levels = check_levels(levels)
    if method == "ltt":
        delta = check_delta(delta)
        learn_fraction = check_learn_fraction(learn_fraction)
    if int(grid_size) != grid_size or grid_size < 2:
        raise CalibrationError(f"grid_size {grid_size!r} must be an integer >= 2; use e.g. 200")
    layers, arrays = _check_cascade_inputs(scores, correct, final_layer)
    n = next(iter(arrays.values()))[0].size
    confs = [to_confidence(arrays[h][0], higher_is_confident) for h in layers]
    oks = [arrays[h][1] for h in layers]
    lambdas = np.linspace(1.0, 0.0, grid_size + 1)  # strict -> loose

    if method == "ltt":
        check_enough_tokens(n, levels, delta, learn_fraction=learn_fraction)
        fit_idx, test_idx = learn_test_split(n, learn_fraction, seed)
    else:
        fit_idx = test_idx = np.arange(n)
    curves = [accuracy_curve(arrays[h][0][fit_idx], oks[i][fit_idx], higher_is_confident) for i, h in enumerate(layers)]
    t_grids = [_curve_thresholds(curve, lambdas, higher_is_confident) for curve in curves]  # each [G], conf units
    errors, _ = _cascade_errors_per_grid([x[test_idx] for x in confs], [x[test_idx] for x in oks], t_grids)
    n_test = test_idx.size

    out = []
    for level in levels:
        if method == "ltt":
            p = binomial_p_values(errors, np.full(errors.shape, n_test), level)
            fail = np.nonzero(p > delta)[0]
            g = (int(fail[0]) if fail.size else p.size) - 1  # -1: nothing certified
        else:
            ok = np.nonzero(errors <= (1.0 - level) * n_test + 1e-9)[0]
            g = int(ok[-1]) if ok.size else -1
        t_confs = [None if g < 0 or not np.isfinite(tg[g]) else float(tg[g]) for tg in t_grids]
        rates, acc, avg = _cascade_outcome(confs, oks, t_confs, layers, final_layer)
        res = CascadeResult(
            level=level,
            thresholds={h: to_score(t, higher_is_confident) for h, t in zip(layers, t_confs)},
            exit_rates=rates,
            accuracy=acc,
            avg_exit_layer=avg,
            method=method,
            delta=delta if method == "ltt" else None,
            n=n,
            higher_is_confident=higher_is_confident,
            final_layer=final_layer,
        )
        log.info(
            "cascade %s level %.3f: lambda=%s, accuracy %.4f, avg exit layer %.2f of %d",
            method, level, "-" if g < 0 else f"{lambdas[g]:.3f}", acc, avg, final_layer,
        )
        out.append(res)
    return out


def evaluate_cascade(
    scores: Mapping[int, np.ndarray],
    correct: Mapping[int, np.ndarray],
    results: Sequence[CascadeResult],
    final_layer: int | None = None,
) -> list[CascadeCheck]:
    """Apply fitted cascade thresholds to new tokens: per level exit shares, accuracy, depth, met."""
    out = []
    for r in results:
        fl = final_layer if final_layer is not None else r.final_layer
        if fl is None:
            raise CalibrationError("the cascade result carries no final_layer; pass final_layer=")
        layers, arrays = _check_cascade_inputs(scores, correct, fl)
        if layers != sorted(r.thresholds):
            raise CalibrationError(f"new data has heads {layers} but the result was fitted for {sorted(r.thresholds)}")
        confs = [to_confidence(arrays[h][0], r.higher_is_confident) for h in layers]
        oks = [arrays[h][1] for h in layers]
        t_confs = [None if r.thresholds[h] is None else float(to_confidence(np.float64(r.thresholds[h]), r.higher_is_confident)) for h in layers]
        rates, acc, avg = _cascade_outcome(confs, oks, t_confs, layers, fl)
        out.append(CascadeCheck(level=r.level, exit_rates=rates, accuracy=acc, avg_exit_layer=avg,
                                met=acc >= r.level, n=int(confs[0].size)))
    return out
