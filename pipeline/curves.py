"""Curves a report draws, small enough for a manifest: a ROC curve thinned to a hundred points
whose area is still the AUROC, and a head's agreement in quantile bins of its entropy.

Why thinning by triangle area: on a polyline, dropping point i changes the area under it by
exactly the triangle (p[i-1], p[i], p[i+1]). Dropping the smallest triangles first (Visvalingam
and Whyatt 1993) therefore keeps the trapezoid area, i.e. the AUROC, as close as possible to the
exact one, while the shape stays where the curve bends.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["CURVE_DIGITS", "CURVE_POINTS", "ENTROPY_BINS", "EntropyBins", "RocCurve", "entropy_bins", "roc_points",
           "thin_polyline"]

CURVE_POINTS = 100
"""At most this many points per ROC curve: enough to draw it, few enough for a manifest."""
ENTROPY_BINS = 20
"""Quantile bins of a head's entropy in its agreement-against-entropy curve."""
CURVE_DIGITS = 5
"""Curve values are rounded to this many digits (the ROC area moves by less than 1e-5)."""


@dataclass(frozen=True)
class RocCurve:
    """A ROC curve of a score for "the head agrees with the final layer", thinned to at most
    `CURVE_POINTS` points: from (0, 0) to (1, 1), both coordinates non-decreasing, and its
    trapezoid area is the AUROC up to the thinning (well under 1e-3)."""

    fpr: list[float]
    tpr: list[float]


@dataclass(frozen=True)
class EntropyBins:
    """A head's tokens in quantile bins of its entropy, as columns (one entry per non-empty bin,
    entropy rising): how often the head is right where it is this sure. Bin i holds the tokens
    with lo[i] <= entropy < hi[i] (the last bin includes its hi)."""

    lo: list[float]
    hi: list[float]
    centre: list[float]
    """Mean entropy of the bin's tokens, in nats."""
    tokens: list[int]
    """Tokens per bin; they sum to the tokens binned."""
    agreement: list[float]
    """Share of the bin's tokens whose top-1 is the final layer's top-1."""
    accuracy: list[float | None]
    """Share of the bin's tokens with a next token whose top-1 is that token (None: none has one)."""


def thin_polyline(x: np.ndarray, y: np.ndarray, max_points: int) -> np.ndarray:
    """Indices (ascending) of at most `max_points` points of the polyline (x, y), its first and
    last kept. Vectorised Visvalingam-Whyatt: each round drops up to a third of the interior
    points, those with the smallest triangles, never two neighbours at once (so each dropped
    triangle is exactly the area it removes)."""
    keep = np.arange(len(x))
    while keep.size > max(max_points, 2):
        px, py = x[keep], y[keep]
        area = 0.5 * np.abs((px[1:-1] - px[:-2]) * (py[2:] - py[:-2]) - (px[2:] - px[:-2]) * (py[1:-1] - py[:-2]))
        excess = keep.size - max(max_points, 2)
        k = min(excess, max(1, area.size // 3))
        drop = area <= np.partition(area, k - 1)[k - 1]  # [n - 2] candidates among interior points
        drop[1:] &= ~drop[:-1]  # of two neighbouring candidates, only the first goes this round
        keep = np.delete(keep, np.flatnonzero(drop)[:excess] + 1)
    return keep


def roc_points(agrees: np.ndarray, scores: np.ndarray, max_points: int = CURVE_POINTS) -> RocCurve | None:
    """The ROC curve of `scores` (higher: more likely to agree) for the bool `agrees`, thinned
    to at most `max_points` points; None when one class is absent (no curve exists then)."""
    agrees = np.asarray(agrees, dtype=bool)
    if agrees.size == 0 or agrees.all() or not agrees.any():
        return None
    # imported here, as in pipeline.scoring.auroc: sklearn takes ~1 s to import
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(agrees, np.asarray(scores, dtype=np.float64))
    keep = thin_polyline(fpr, tpr, max_points)
    return RocCurve(fpr=[round(float(v), CURVE_DIGITS) for v in fpr[keep]],
                    tpr=[round(float(v), CURVE_DIGITS) for v in tpr[keep]])


def entropy_bins(entropy: np.ndarray, agrees: np.ndarray, right_true: np.ndarray, has_target: np.ndarray,
                 bins: int = ENTROPY_BINS) -> EntropyBins:
    """Agreement (and accuracy on the true next token, over tokens that have one) of one head in
    `bins` quantile bins of its entropy; bins that ties leave empty are dropped."""
    e = np.asarray(entropy, dtype=np.float64)  # [N]
    valid = np.asarray(has_target, dtype=bool)  # [N]
    edges = np.unique(np.quantile(e, np.linspace(0.0, 1.0, bins + 1)))  # [<= bins + 1]
    if edges.size == 1:  # every token has the same entropy: one bin
        edges = np.repeat(edges, 2)
    idx = np.clip(np.searchsorted(edges, e, side="right") - 1, 0, edges.size - 2)  # [N] bin of each token
    n_bins = edges.size - 1
    count = np.bincount(idx, minlength=n_bins)
    agree = np.bincount(idx, weights=np.asarray(agrees, dtype=np.float64), minlength=n_bins)
    entropy_sum = np.bincount(idx, weights=e, minlength=n_bins)
    n_true = np.bincount(idx[valid], minlength=n_bins)
    right = np.bincount(idx[valid], weights=np.asarray(right_true, dtype=np.float64)[valid], minlength=n_bins)
    used = np.flatnonzero(count)

    def r(v: float) -> float:
        return round(float(v), CURVE_DIGITS)

    return EntropyBins(lo=[r(edges[i]) for i in used], hi=[r(edges[i + 1]) for i in used],
                       centre=[r(entropy_sum[i] / count[i]) for i in used], tokens=[int(count[i]) for i in used],
                       agreement=[r(agree[i] / count[i]) for i in used],
                       accuracy=[r(right[i] / n_true[i]) if n_true[i] else None for i in used])
