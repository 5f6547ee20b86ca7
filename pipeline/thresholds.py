"""Decide when one early-exit head may answer: confidence thresholds per accuracy level.

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
(`evaluate_thresholds` and `pipeline.recalibrate.drift_table` are there to notice). It holds per
head and per level; the chance that *some* of L levels fails can reach L * δ.

The cascade over all heads is `pipeline.cascade`; the calibrate stage, every head and
predictor at once, is `pipeline.calibrate`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Iterable, Literal, Sequence

import numpy as np

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


# --------------------------------------------------------------------------------------
# validation


def check_levels(levels: Iterable[float]) -> list[float]:
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


def check_delta(delta: float) -> float:
    if delta is None or not (math.isfinite(float(delta)) and 0.0 < float(delta) < 1.0):
        raise CalibrationError(f"delta {delta!r} must lie in (0, 1); use e.g. 0.1 (the guarantee fails at most 10 % of the time)")
    return float(delta)


def check_method(method: str) -> str:
    if method not in METHODS:
        raise CalibrationError(f"method {method!r} is unknown; use one of {list(METHODS)}")
    return method


def check_learn_fraction(learn_fraction: float) -> float:
    if not (math.isfinite(float(learn_fraction)) and 0.0 < float(learn_fraction) < 1.0):
        raise CalibrationError(f"learn_fraction {learn_fraction!r} must lie in (0, 1); use e.g. 0.2")
    return float(learn_fraction)


def check_scores(scores, correct, what: str = "scores") -> tuple[np.ndarray, np.ndarray]:
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


def to_score(t_conf: float | None, higher_is_confident: bool) -> float | None:
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


def _binom():
    """scipy's binomial distribution, imported on first use: scipy.stats takes seconds to import,
    and a run whose stages are all cache hits never tests a threshold."""
    from scipy.stats import binom

    return binom


def binomial_p_values(errors: np.ndarray, n_exited: np.ndarray, level: float) -> np.ndarray:
    """Exact p-values of ``H: accuracy < level`` given `errors` among `n_exited` tokens.

    Under H the error count is Binomial(n, > 1 - level), so seeing this few errors has
    probability at most ``P(Binomial(n, 1 - level) <= errors)``. No exits: nothing to test, p = 1.
    """
    n = np.asarray(n_exited)
    p = _binom().cdf(np.asarray(errors), np.maximum(n, 1), 1.0 - level)
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


def learn_test_split(n: int, learn_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
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
    level = check_levels([level])[0]
    delta = check_delta(delta)
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
    levels = check_levels(levels)
    delta = check_delta(delta)
    strictest = max(levels)
    need = min_calibration_tokens(strictest, delta)
    total = _min_total_tokens(need, learn_fraction) if learn_fraction > 0 else need
    if n < total:
        split = f" ({need} in the held-out test part after the {learn_fraction:.0%} learn split)" if learn_fraction > 0 else ""
        raise CalibrationError(
            f"{n} calibration tokens are too few for level {strictest} at delta {delta}: even if every "
            f"exited token were right, at least {total} tokens are needed{split} (log(delta)/log(level) = "
            f"{math.log(delta) / math.log(strictest):.1f}), and in practice several times more since only "
            f"part of them exit. Give calibration more data: a larger calib share in data.fractions or more "
            f"documents in data.source (calibrate.max_tokens and extract.max_tokens only cap the tokens used, "
            f"they add none); or allow a larger calibrate.delta, or drop level {strictest} from calibrate.levels."
        )


# --------------------------------------------------------------------------------------
# per-head thresholds


def empirical_thresholds(scores, correct, levels, higher_is_confident: bool = False) -> list[LevelResult]:
    """Plain fit: per level, the loosest threshold whose exited calibration tokens are >= level right.

    No guarantee on new data: the fit sits at the edge, so new data misses the level often.
    """
    levels = check_levels(levels)
    s, c = check_scores(scores, correct)
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
                threshold=to_score(desc[i], higher_is_confident),
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
    levels = check_levels(levels)
    delta = check_delta(delta)
    learn_fraction = check_learn_fraction(learn_fraction)
    if int(grid_size) != grid_size or grid_size < 2:
        raise CalibrationError(f"grid_size {grid_size!r} must be an integer >= 2; use e.g. 200")
    s, c = check_scores(scores, correct)
    conf = to_confidence(s, higher_is_confident)
    n = conf.size
    if n < 2:
        raise CalibrationError(f"{n} calibration token is too few for LTT; it needs a learn and a test part")
    learn, test = learn_test_split(n, learn_fraction, seed)

    # candidates: learn-split quantiles, strictest (highest confidence) first, no duplicates
    q = np.quantile(conf[learn], 1.0 - np.arange(1, grid_size + 1) / grid_size)  # [grid]
    cand = np.unique(q)[::-1]  # [m], descending
    k_learn, e_learn = _counts_at(conf[learn], c[learn], cand)
    k_test, e_test = _counts_at(conf[test], c[test], cand)

    out = []
    for level in levels:
        p_learn = binomial_p_values(e_learn, k_learn, level)
        start = int(np.argmin(p_learn))
        p_test = binomial_p_values(e_test[start:], k_test[start:], level)
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
        out.append(LevelResult(level, to_score(t, higher_is_confident), k / n, acc, "ltt", delta, n, k, higher_is_confident))
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
    method = check_method(method)
    levels = check_levels(levels)
    s, c = check_scores(scores, correct)
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
# checking fitted thresholds on new tokens


@dataclass(frozen=True)
class ThresholdCheck:
    """One fitted threshold applied to new tokens (`evaluate_thresholds`)."""

    level: float
    threshold: float | None
    n: int
    n_exited: int
    exit_rate: float
    accuracy: float | None
    """Accuracy of the exited new tokens (None: none exit)."""
    met: bool
    """The exited tokens are >= level right, or none exit (a point estimate)."""
    p_below: float
    """One-sided exact binomial p-value of "accuracy >= level" given the exited tokens."""
    held: bool
    """The verdict to act on: False only on a significant shortfall (p_below <= alpha)."""
    calib_exit_rate: float | None
    calib_accuracy: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_thresholds(scores, correct, results: Sequence[LevelResult], higher_is_confident: bool = False,
                        alpha: float = 0.05) -> list[ThresholdCheck]:
    """Apply fitted thresholds to new tokens: per level exit rate, accuracy, and whether it held.

    ``met`` is True when the exited tokens are >= level right, or when none exit.
    ``held`` is the verdict to act on with a finite sample: False only when the exited tokens'
    accuracy is significantly below the level (one-sided exact binomial test at ``alpha``,
    p-value in ``p_below``). A threshold whose true accuracy sits just above its target misses
    ``met`` on about half of all held-out samples; ``held`` fails that way with probability
    at most ``alpha``. `results` may be `LevelResult`s or their `to_dict()` forms.
    """
    s, c = check_scores(scores, correct)
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
        p_below = float(_binom().cdf(int(c[m].sum()), k, d["level"])) if k else 1.0
        out.append(ThresholdCheck(
            level=d["level"], threshold=d["threshold"], n=int(s.size), n_exited=k, exit_rate=k / s.size,
            accuracy=acc, met=acc is None or acc >= d["level"], p_below=p_below, held=p_below > alpha,
            calib_exit_rate=d.get("exit_rate"), calib_accuracy=d.get("accuracy"),
        ))
    return out
