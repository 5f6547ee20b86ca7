"""Decide when an early-exit head may answer: confidence thresholds per accuracy level.

Each head gives, per calibration token, a confidence score (the entropy of its distribution,
lower = more confident, or a gate's exit probability, higher = more confident) and whether its
top-1 was right. A token *exits* at a head when its score passes the head's threshold. For a
target accuracy level α we want the loosest threshold (the most exits) whose exited tokens are
right at least a share α of the time.

Two methods:

- ``empirical``: the loosest threshold whose accuracy on the calibration tokens is >= α. It is
  fitted right at the edge, so on new data it falls below α about half the time.
- ``ltt``: Learn-then-Test (Angelopoulos et al. 2021). Each candidate threshold t is a
  hypothesis test of ``H_t: accuracy of exited tokens < α`` with an exact binomial p-value;
  fixed-sequence testing keeps rejecting from strict to loose while ``p <= δ``. With
  probability at least 1 - δ over the draw of the calibration set, the returned threshold's
  *conditional* accuracy among exited tokens, on new tokens from the same distribution, is >= α.

Thresholds are reported in the units of the scores they were fitted on (entropy in nats, or
exit probability) together with their direction; internally everything works on a confidence
``conf`` (``to_confidence``) with the rule "exit when conf >= t".

Why the LTT walk starts where a small learn split says (split fixed-sequence testing)
----------------------------------------------------------------------------------------
A plain walk from the strictest threshold begins on a handful of tokens, where a single error
already stops it: with α = 0.9 and δ = 0.1 the first test needs >= 22 exited tokens and all of
them right, so on heads whose very best tokens are ~95 % right the walk dies at once and the
head never exits. LTT's remedy is to spend a small share of the calibration tokens
(``learn_fraction``, default 0.2) on choosing the hypotheses: the candidate thresholds are
quantiles of the learn split's confidences and the walk starts at the candidate with the
smallest learn-split p-value, then loosens. The p-values of the walk use only the remaining
tokens, so the grid and the start are fixed with respect to the data being tested and the
guarantee is exact, not approximate. On synthetic heads (best tokens 99 % right, 2000
calibration tokens, α = 0.9, δ = 0.1) this certifies a threshold in every draw with a mean
exit rate of 0.56 (the oracle: 0.59); the plain walk from the strictest threshold finds none in
15 % of draws and averages 0.44.

What the guarantee assumes: calibration and new tokens are exchangeable (i.i.d. from one
distribution). Tokens of one document are correlated, which shrinks the effective sample, so
draw the calib split from many documents; under a shift of text or model nothing is promised
(`evaluate_thresholds` and `drift_table` are there to notice). It holds per head and per level;
the chance that *some* of L levels fails can reach L * δ.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Iterable, Literal, Mapping, Sequence

import numpy as np
from scipy.stats import binom
from sklearn.isotonic import IsotonicRegression

log = logging.getLogger(__name__)

Method = Literal["ltt", "empirical"]
METHODS = ("ltt", "empirical")


class CalibrationError(ValueError):
    """Calibration inputs are unusable; the message names the bad value and the fix."""


# --------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class LevelResult:
    """The threshold of one head at one target accuracy level.

    ``threshold`` is in score units: a token exits when ``score <= threshold`` (entropy,
    ``higher_is_confident=False``) or ``score >= threshold`` (gate probability). ``None``
    means no threshold meets the level: the head never exits at this level. ``exit_rate``,
    ``accuracy`` and ``n_exited`` describe all ``n`` calibration tokens at that threshold.
    """

    level: float
    threshold: float | None
    exit_rate: float
    accuracy: float | None
    method: str
    delta: float | None
    n: int
    n_exited: int
    higher_is_confident: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


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


# --------------------------------------------------------------------------------------
# validation


def _check_levels(levels: Iterable[float]) -> list[float]:
    try:
        out = [float(x) for x in levels]
    except TypeError as e:
        raise CalibrationError(f"levels {levels!r} must be a list of accuracies, e.g. [0.9, 0.95]") from e
    if not out:
        raise CalibrationError("levels is empty; give target accuracies, e.g. [0.9, 0.95]")
    bad = [x for x in out if not (math.isfinite(x) and 0.0 < x < 1.0)]
    if bad:
        raise CalibrationError(f"accuracy levels {bad} are outside (0, 1); use e.g. 0.9 for 90 %")
    return out


def _check_delta(delta: float) -> float:
    if delta is None or not (math.isfinite(float(delta)) and 0.0 < float(delta) < 1.0):
        raise CalibrationError(f"delta {delta!r} must lie in (0, 1); use e.g. 0.1 (the guarantee fails at most 10 % of the time)")
    return float(delta)


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise CalibrationError(f"method {method!r} is unknown; use one of {list(METHODS)}")
    return method


def _check_learn_fraction(learn_fraction: float) -> float:
    if not (math.isfinite(float(learn_fraction)) and 0.0 < float(learn_fraction) < 1.0):
        raise CalibrationError(f"learn_fraction {learn_fraction!r} must lie in (0, 1); use e.g. 0.2")
    return float(learn_fraction)


def _check_arrays(scores, correct, what: str = "scores") -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    c = np.asarray(correct)
    if s.ndim != 1:
        raise CalibrationError(f"{what} has shape {s.shape}; pass one score per token as a 1-D array (flatten [batch, seq] first)")
    if c.shape != s.shape:
        raise CalibrationError(f"{what} has shape {s.shape} but its correct flags have shape {c.shape}; give one flag per score")
    if s.size == 0:
        raise CalibrationError(f"{what} is empty; calibration needs tokens from the calib split")
    bad = ~np.isfinite(s)
    if bad.any():
        raise CalibrationError(
            f"{what} holds {int(bad.sum())} non-finite values (first at index {int(np.argmax(bad))}); "
            "fix the head's output upstream or drop those tokens before calibrating"
        )
    if c.dtype != np.bool_:
        if not np.isin(c, (0, 1)).all():
            raise CalibrationError(f"correct flags for {what} must be booleans or 0/1, got values like {np.unique(c)[:5].tolist()}")
        c = c.astype(bool)
    return s, c


# --------------------------------------------------------------------------------------
# small shared pieces


def to_confidence(scores: np.ndarray, higher_is_confident: bool) -> np.ndarray:
    """Map scores to a confidence where higher is surer; a token exits when conf >= t."""
    s = np.asarray(scores, dtype=np.float64)
    return s.copy() if higher_is_confident else -s


def _to_score(t_conf: float | None, higher_is_confident: bool) -> float | None:
    """A confidence-space threshold back in score units (inverse of `to_confidence`)."""
    if t_conf is None:
        return None
    return float(t_conf) if higher_is_confident else float(-t_conf)


def exit_mask(scores: np.ndarray, threshold: float | None, higher_is_confident: bool = False) -> np.ndarray:
    """Which tokens exit at a score-unit threshold (``None``: none do)."""
    s = np.asarray(scores, dtype=np.float64)
    if threshold is None:
        return np.zeros(s.shape, dtype=bool)
    return s >= threshold if higher_is_confident else s <= threshold


def _binomial_p_values(errors: np.ndarray, n_exited: np.ndarray, level: float) -> np.ndarray:
    """Exact p-values of ``H: accuracy < level`` given `errors` among `n_exited` tokens.

    Under H the error count is Binomial(n, > 1 - level), so seeing this few errors has
    probability at most ``P(Binomial(n, 1 - level) <= errors)``. No exits: nothing to test, p = 1.
    """
    n = np.asarray(n_exited)
    p = binom.cdf(np.asarray(errors), np.maximum(n, 1), 1.0 - level)
    return np.where(n > 0, p, 1.0)


def _counts_at(conf: np.ndarray, correct: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exited tokens and errors among them for each confidence threshold (exit: conf >= t)."""
    order = np.argsort(-conf, kind="stable")
    desc = conf[order]  # [n], most confident first
    cum_err = np.concatenate([[0], np.cumsum(~correct[order])])  # [n + 1]
    k = np.searchsorted(-desc, -np.asarray(thresholds), side="right")  # exited = #{conf >= t}
    return k, cum_err[k]


def _summary(conf: np.ndarray, correct: np.ndarray, t_conf: float | None) -> tuple[int, float | None]:
    if t_conf is None:
        return 0, None
    m = conf >= t_conf
    k = int(m.sum())
    return k, (float(correct[m].mean()) if k else None)


def _n_learn(n: int, learn_fraction: float) -> int:
    """Tokens LTT sets aside for choosing its hypotheses; at least one on each side."""
    return min(max(int(round(learn_fraction * n)), 1), n - 1)


def _learn_test_split(n: int, learn_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    k = _n_learn(n, learn_fraction)
    return perm[:k], perm[k:]


# --------------------------------------------------------------------------------------
# how much data a level needs


def min_calibration_tokens(level: float, delta: float) -> int:
    """Fewest exited tokens with which even a perfect record rejects ``accuracy < level``.

    With n exited tokens and no error the binomial p-value is ``level ** n``; it reaches
    ``delta`` once ``n >= log(delta) / log(level)``.
    """
    level = _check_levels([level])[0]
    delta = _check_delta(delta)
    need = math.log(delta) / math.log(level)
    n = math.ceil(need - 1e-9)  # guard against log rounding just above an integer
    return n if level**n <= delta else n + 1


def _min_total_tokens(need: int, learn_fraction: float) -> int:
    """Fewest calibration tokens whose held-out (test) split still holds `need` tokens."""
    total = max(need, math.ceil(need / (1.0 - learn_fraction)))
    while total - _n_learn(total, learn_fraction) < need:
        total += 1
    return total


def check_enough_tokens(n: int, levels: Iterable[float], delta: float, learn_fraction: float = 0.0) -> None:
    """Raise if `n` calibration tokens cannot certify the strictest level even when all are right.

    ``learn_fraction``: the share LTT sets aside for choosing its hypotheses (0 = none); the
    rest must hold the needed tokens.
    """
    levels = _check_levels(levels)
    delta = _check_delta(delta)
    strictest = max(levels)
    need = min_calibration_tokens(strictest, delta)
    total = _min_total_tokens(need, learn_fraction) if learn_fraction > 0 else need
    if n < total:
        split = f" ({need} in the held-out test part after the {learn_fraction:.0%} learn split)" if learn_fraction > 0 else ""
        raise CalibrationError(
            f"{n} calibration tokens are too few for level {strictest} at delta {delta}: even if every "
            f"exited token were right, at least {total} tokens are needed{split} (log(delta)/log(level) = "
            f"{math.log(delta) / math.log(strictest):.1f}), and in practice several times more since only "
            f"part of them exit. Use more calibration data (calibrate.max_tokens / data.fractions.calib), "
            f"a larger delta, or drop level {strictest} from calibrate.levels."
        )


# --------------------------------------------------------------------------------------
# per-head thresholds


def empirical_thresholds(scores, correct, levels, higher_is_confident: bool = False) -> list[LevelResult]:
    """Plain fit: per level, the loosest threshold whose exited calibration tokens are >= level right.

    No guarantee on new data: the fit sits at the edge, so new data misses the level often.
    """
    levels = _check_levels(levels)
    s, c = _check_arrays(scores, correct)
    conf = to_confidence(s, higher_is_confident)
    n = conf.size
    order = np.argsort(-conf, kind="stable")
    desc = conf[order]  # [n]
    cum_ok = np.cumsum(c[order])  # [n]
    k = np.arange(1, n + 1)
    # a threshold t = desc[k-1] exits exactly k tokens only at the end of a tie block
    valid = np.append(desc[:-1] > desc[1:], True)
    acc = cum_ok / k
    out = []
    for level in levels:
        ok = np.nonzero(valid & (acc >= level - 1e-12))[0]
        if ok.size == 0:
            out.append(LevelResult(level, None, 0.0, None, "empirical", None, n, 0, higher_is_confident))
            continue
        i = int(ok[-1])
        out.append(
            LevelResult(
                level=level,
                threshold=_to_score(desc[i], higher_is_confident),
                exit_rate=(i + 1) / n,
                accuracy=float(acc[i]),
                method="empirical",
                delta=None,
                n=n,
                n_exited=i + 1,
                higher_is_confident=higher_is_confident,
            )
        )
    return out


def ltt_thresholds(
    scores,
    correct,
    levels,
    delta: float,
    higher_is_confident: bool = False,
    grid_size: int = 200,
    *,
    learn_fraction: float = 0.2,
    seed: int = 0,
) -> list[LevelResult]:
    """Learn-then-Test thresholds with a finite-sample guarantee.

    Guarantee, per level α: with probability >= 1 - δ over the calibration draw, the
    returned threshold τ satisfies ``P(correct | token exits at τ) >= α`` on new tokens from
    the same distribution as the calibration tokens (exchangeable). It is about the accuracy
    *among exited tokens* (conditional accuracy, in the population), not about a particular
    test batch, not about all tokens, and it does not hold under distribution shift.

    Procedure: a random ``learn_fraction`` of the tokens (seeded by ``seed``) yields
    ``grid_size`` candidate thresholds (its confidence quantiles, strictest first) and the
    starting candidate (smallest learn-split p-value). On the remaining tokens each candidate
    t is tested with the exact binomial p-value of ``H_t: accuracy < α``; fixed-sequence
    testing rejects from the start towards looser thresholds while ``p <= δ`` and returns
    the loosest rejected one. If even the start is not rejected the head never exits at this
    level (threshold None). Exit rate and accuracy are reported on all calibration tokens.
    """
    levels = _check_levels(levels)
    delta = _check_delta(delta)
    learn_fraction = _check_learn_fraction(learn_fraction)
    if int(grid_size) != grid_size or grid_size < 2:
        raise CalibrationError(f"grid_size {grid_size!r} must be an integer >= 2; use e.g. 200")
    s, c = _check_arrays(scores, correct)
    conf = to_confidence(s, higher_is_confident)
    n = conf.size
    if n < 2:
        raise CalibrationError(f"{n} calibration token is too few for LTT; it needs a learn and a test part")
    learn, test = _learn_test_split(n, learn_fraction, seed)

    # candidates: learn-split quantiles, strictest (highest confidence) first, no duplicates
    q = np.quantile(conf[learn], 1.0 - np.arange(1, grid_size + 1) / grid_size)  # [grid]
    cand = np.unique(q)[::-1]  # [m], descending
    k_learn, e_learn = _counts_at(conf[learn], c[learn], cand)
    k_test, e_test = _counts_at(conf[test], c[test], cand)

    out = []
    for level in levels:
        p_learn = _binomial_p_values(e_learn, k_learn, level)
        start = int(np.argmin(p_learn))
        p_test = _binomial_p_values(e_test[start:], k_test[start:], level)
        fail = np.nonzero(p_test > delta)[0]
        n_rejected = int(fail[0]) if fail.size else p_test.size
        if n_rejected == 0:
            need = min_calibration_tokens(level, delta)
            log.info(
                "ltt level %.3f: no threshold certified (start candidate: %d of %d held-out tokens exit, "
                "p=%.3g > delta=%.3g; a perfect record needs >= %d exits)",
                level, int(k_test[start]), test.size, float(p_test[0]), delta, need,
            )
            out.append(LevelResult(level, None, 0.0, None, "ltt", delta, n, 0, higher_is_confident))
            continue
        t = float(cand[start + n_rejected - 1])
        k, acc = _summary(conf, c, t)
        out.append(LevelResult(level, _to_score(t, higher_is_confident), k / n, acc, "ltt", delta, n, k, higher_is_confident))
    return out


def calibrate_head(
    scores,
    correct,
    levels,
    delta: float,
    method: Method = "ltt",
    higher_is_confident: bool = False,
    *,
    grid_size: int = 200,
    learn_fraction: float = 0.2,
    seed: int = 0,
) -> list[LevelResult]:
    """Thresholds of one head for every level, by `method` (the stage's entry point per head).

    For ``ltt`` it first checks that the held-out tokens could certify the strictest level at
    all, and raises `CalibrationError` with the remedy otherwise.
    """
    method = _check_method(method)
    levels = _check_levels(levels)
    s, c = _check_arrays(scores, correct)
    if method == "empirical":
        results = empirical_thresholds(s, c, levels, higher_is_confident)
    else:
        check_enough_tokens(s.size, levels, delta, learn_fraction=learn_fraction)
        results = ltt_thresholds(
            s, c, levels, delta, higher_is_confident, grid_size, learn_fraction=learn_fraction, seed=seed
        )
    for r in results:
        log.info(
            "%s level %.3f: threshold %s, exit rate %.3f, accuracy %s (n=%d)",
            method, r.level, r.threshold, r.exit_rate, "-" if r.accuracy is None else f"{r.accuracy:.4f}", r.n,
        )
    return results


# --------------------------------------------------------------------------------------
# accuracy as a function of the score


def accuracy_curve(scores, correct, higher_is_confident: bool = False) -> IsotonicRegression:
    """Monotone estimate of P(correct | score), increasing in confidence.

    Fitted on the raw scores (decreasing in entropy, increasing in gate probability), so
    ``curve.predict(scores)`` takes the same units; outside the fitted range it is clipped.
    """
    s, c = _check_arrays(scores, correct)
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
    arrays = {h: _check_arrays(scores[h], correct[h], what=f"scores of head {h}") for h in layers}
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
    method = _check_method(method)
    levels = _check_levels(levels)
    if method == "ltt":
        delta = _check_delta(delta)
        learn_fraction = _check_learn_fraction(learn_fraction)
    if int(grid_size) != grid_size or grid_size < 2:
        raise CalibrationError(f"grid_size {grid_size!r} must be an integer >= 2; use e.g. 200")
    layers, arrays = _check_cascade_inputs(scores, correct, final_layer)
    n = next(iter(arrays.values()))[0].size
    confs = [to_confidence(arrays[h][0], higher_is_confident) for h in layers]
    oks = [arrays[h][1] for h in layers]
    lambdas = np.linspace(1.0, 0.0, grid_size + 1)  # strict -> loose

    if method == "ltt":
        check_enough_tokens(n, levels, delta, learn_fraction=learn_fraction)
        fit_idx, test_idx = _learn_test_split(n, learn_fraction, seed)
    else:
        fit_idx = test_idx = np.arange(n)
    curves = [accuracy_curve(arrays[h][0][fit_idx], oks[i][fit_idx], higher_is_confident) for i, h in enumerate(layers)]
    t_grids = [_curve_thresholds(curve, lambdas, higher_is_confident) for curve in curves]  # each [G], conf units
    errors, _ = _cascade_errors_per_grid([x[test_idx] for x in confs], [x[test_idx] for x in oks], t_grids)
    n_test = test_idx.size

    out = []
    for level in levels:
        if method == "ltt":
            p = _binomial_p_values(errors, np.full(errors.shape, n_test), level)
            fail = np.nonzero(p > delta)[0]
            g = (int(fail[0]) if fail.size else p.size) - 1  # -1: nothing certified
        else:
            ok = np.nonzero(errors <= (1.0 - level) * n_test + 1e-9)[0]
            g = int(ok[-1]) if ok.size else -1
        t_confs = [None if g < 0 or not np.isfinite(tg[g]) else float(tg[g]) for tg in t_grids]
        rates, acc, avg = _cascade_outcome(confs, oks, t_confs, layers, final_layer)
        res = CascadeResult(
            level=level,
            thresholds={h: _to_score(t, higher_is_confident) for h, t in zip(layers, t_confs)},
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
) -> list[dict]:
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
        out.append({"level": r.level, "exit_rates": rates, "accuracy": acc, "avg_exit_layer": avg, "met": acc >= r.level, "n": confs[0].size})
    return out


# --------------------------------------------------------------------------------------
# comparing and checking fitted thresholds


def _by_level(results) -> dict[float, dict]:
    if isinstance(results, Mapping):
        items = list(results.values()) if not {"level", "threshold"} <= set(results) else [results]
    else:
        items = list(results)
    out = {}
    for r in items:
        d = r.to_dict() if isinstance(r, LevelResult) else dict(r)
        if "level" not in d or "threshold" not in d:
            raise CalibrationError(f"{d!r} is not a calibration result; pass LevelResult objects or their to_dict() forms")
        out[float(d["level"])] = d
    return out


def _diff(a, b):
    return None if a is None or b is None else float(b) - float(a)


def drift_table(old, new) -> list[dict]:
    """Per level, how thresholds, exit rates and accuracies moved between two calibrations.

    Accepts lists of `LevelResult` (or their dicts) or mappings level -> result. ``shift`` is
    new minus old threshold in score units (for entropy, positive = looser).
    """
    a, b = _by_level(old), _by_level(new)
    dirs = {d.get("higher_is_confident", False) for d in (*a.values(), *b.values())}
    if len(dirs) > 1:
        raise CalibrationError("old and new results use opposite score directions (entropy vs gate); compare like with like")
    rows = []
    for level in sorted(set(a) | set(b)):
        o, w = a.get(level, {}), b.get(level, {})
        rows.append(
            {
                "level": level,
                "old_threshold": o.get("threshold"),
                "new_threshold": w.get("threshold"),
                "shift": _diff(o.get("threshold"), w.get("threshold")),
                "old_exit_rate": o.get("exit_rate"),
                "new_exit_rate": w.get("exit_rate"),
                "exit_rate_change": _diff(o.get("exit_rate"), w.get("exit_rate")),
                "old_accuracy": o.get("accuracy"),
                "new_accuracy": w.get("accuracy"),
                "accuracy_change": _diff(o.get("accuracy"), w.get("accuracy")),
            }
        )
    return rows


def evaluate_thresholds(scores, correct, results: Sequence[LevelResult], higher_is_confident: bool = False,
                        alpha: float = 0.05) -> list[dict]:
    """Apply fitted thresholds to new tokens: per level exit rate, accuracy, and whether it held.

    ``met`` is True when the exited tokens are >= level right, or when none exit.
    ``held`` is the verdict to act on with a finite sample: False only when the exited tokens'
    accuracy is significantly below the level (one-sided exact binomial test at ``alpha``,
    p-value in ``p_below``). A threshold whose true accuracy sits just above its target misses
    ``met`` on about half of all held-out samples; ``held`` fails that way with probability
    at most ``alpha``.
    """
    s, c = _check_arrays(scores, correct)
    out = []
    for r in results:
        d = r.to_dict() if isinstance(r, LevelResult) else dict(r)
        if d.get("higher_is_confident", higher_is_confident) != higher_is_confident:
            raise CalibrationError(
                f"level {d['level']} was fitted with higher_is_confident={d['higher_is_confident']} but evaluated "
                f"with {higher_is_confident}; pass the same score kind and flag as at calibration"
            )
        m = exit_mask(s, d["threshold"], higher_is_confident)
        k = int(m.sum())
        acc = float(c[m].mean()) if k else None
        p_below = float(binom.cdf(int(c[m].sum()), k, d["level"])) if k else 1.0
        out.append(
            {
                "level": d["level"],
                "threshold": d["threshold"],
                "n": s.size,
                "n_exited": k,
                "exit_rate": k / s.size,
                "accuracy": acc,
                "met": acc is None or acc >= d["level"],
                "p_below": p_below,
                "held": p_below > alpha,
                "calib_exit_rate": d.get("exit_rate"),
                "calib_accuracy": d.get("accuracy"),
            }
        )
    return out


# --------------------------------------------------------------------------------------
# the calibrate stage: every head and predictor at once


PREDICTORS = {"entropy": False, "gate": True}
"""Confidence scores a head can exit on, and whether higher means more confident."""


def calibrate_exits(
    labels: Mapping[str, np.ndarray],
    gate_probs: Mapping[int, np.ndarray] | None,
    layers: Sequence[int],
    final_layer: int,
    cfg,
) -> dict:
    """Thresholds for every head x predictor (entropy, gate) x level, by Learn-then-Test and
    by the plain empirical fit, plus a cascade per predictor: the content of calibration.json.

    `labels` comes from `pipeline.train.collect_exit_labels` (``correct_<l>``,
    ``correct_true_<l>``, ``entropy_<l>``, ``has_target``); `gate_probs` are the gates' exit
    probabilities on the same rows. `cfg` is a `CalibrateConfig`. Accuracy is measured against
    the final layer's top-1 (``reference: final``) or the true next token (``true``).
    """
    layers = [int(layer) for layer in layers]
    keep = np.ones(len(labels["row"]), dtype=bool)
    if cfg.reference == "true":
        keep = labels["has_target"].astype(bool)
    if cfg.max_tokens is not None:
        keep &= np.cumsum(keep) <= cfg.max_tokens
    n = int(keep.sum())
    check_enough_tokens(n, cfg.levels, cfg.delta, learn_fraction=cfg.learn_fraction if cfg.method == "ltt" else 0.0)
    prefix = "correct_true_" if cfg.reference == "true" else "correct_"
    correct = {layer: labels[f"{prefix}{layer}"][keep].astype(bool) for layer in layers}
    scores = {"entropy": {layer: labels[f"entropy_{layer}"][keep] for layer in layers}}
    if gate_probs is not None:
        scores["gate"] = {layer: np.asarray(gate_probs[layer])[keep] for layer in layers}
    opts = {"grid_size": cfg.grid_size, "learn_fraction": cfg.learn_fraction, "seed": cfg.seed}
    delta = cfg.delta
    heads: dict[str, dict] = {}
    cascades: dict[str, dict] = {}
    for predictor, by_layer in scores.items():
        hic = PREDICTORS[predictor]
        for layer in layers:
            entry = heads.setdefault(str(layer), {"agreement": float(correct[layer].mean()), "n": n})
            entry[predictor] = {
                method: [r.to_dict() for r in calibrate_head(by_layer[layer], correct[layer], cfg.levels, delta, method, hic, **opts)]
                for method in ("ltt", "empirical")
            }
        cascades[predictor] = {
            method: [r.to_dict() for r in calibrate_cascade(by_layer, correct, final_layer, cfg.levels, delta, method, hic, **opts)]
            for method in ("ltt", "empirical")
        }
    return {
        "levels": list(cfg.levels), "delta": delta, "method": cfg.method, "reference": cfg.reference,
        "n": n, "layers": layers, "final_layer": final_layer, "heads": heads, "cascade": cascades,
    }


def chosen(calibration: Mapping, predictor: str = "entropy") -> dict[int, list[LevelResult]]:
    """The thresholds a deployment uses: per head, the configured method's results."""
    method = calibration["method"]
    return {int(layer): [LevelResult(**r) for r in entry[predictor][method]]
            for layer, entry in calibration["heads"].items() if predictor in entry}


def check_held_out(calibration: Mapping, labels: Mapping[str, np.ndarray],
                   gate_probs: Mapping[int, np.ndarray] | None, predictor: str = "entropy") -> list[dict]:
    """Apply a calibration's chosen thresholds to held-out tokens: per head and level, the exit
    rate and accuracy there and whether the target held (``met``)."""
    prefix = "correct_true_" if calibration["reference"] == "true" else "correct_"
    keep = labels["has_target"].astype(bool) if calibration["reference"] == "true" else np.ones(len(labels["row"]), bool)
    rows = []
    for layer, results in chosen(calibration, predictor).items():
        score = labels[f"entropy_{layer}"] if predictor == "entropy" else np.asarray(gate_probs[layer])
        for r in evaluate_thresholds(score[keep], labels[f"{prefix}{layer}"][keep].astype(bool), results,
                                     higher_is_confident=PREDICTORS[predictor]):
            rows.append({"layer": layer, "predictor": predictor, **r})
    return rows
