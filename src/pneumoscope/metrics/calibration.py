"""Calibration: part of the metrics (pure numpy/scikit-learn; positive class 1)."""

from __future__ import annotations

import numpy as np

from .classification import check_binary
from .intervals import compute_wilson_interval

TEMPERATURE_RANGE = (0.05, 20.0)  # what fit_temperature may fit; outside it every probability is near 0, 0.5 or 1


def compute_brier(y_true, y_prob) -> float:
    """The Brier score: mean squared difference between probability and label."""
    y_true, y_prob = check_binary(y_true, y_prob)
    return float(np.mean((y_prob - y_true) ** 2))


def compute_reliability(y_true, y_prob, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Equal-width bins of predicted probability: mean prediction, observed frequency, count."""
    y_true, y_prob = check_binary(y_true, y_prob)
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.digitize(y_prob, edges[1:-1]), 0, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins)
    sums_p = np.bincount(which, weights=y_prob, minlength=n_bins)
    sums_y = np.bincount(which, weights=y_true, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"edges": edges, "mean_predicted": sums_p / counts, "observed": sums_y / counts, "count": counts}


def compute_adaptive_reliability(
    y_true, y_prob, n_bins: int = 10, confidence: float = 0.95, *, min_width: float = 0.05, min_count: int = 20
) -> dict[str, np.ndarray]:
    """Reliability bins placed where the predictions are, each with a Wilson interval for its observed frequency.

    Images are sorted by predicted probability and cut into equal-count groups (sizes differ
    by at most one; tied probabilities may straddle a cut). With equal-width bins most test
    images sit in the two end bins and the middle bins hold a handful, which makes the
    diagram jump by chance. Equal-count bins alone go wrong the other way: when 60% of the
    predictions lie above 0.97, six of ten bins sit on top of each other at x ~ 1 and the
    range where the model hesitates gets one or two. So neighbouring groups whose predictions
    all lie within ``min_width`` of each other are one bin (a crowd near 0 or 1 is one point,
    with a narrow interval), and the number of equal-count groups is raised, up to groups of
    ``min_count`` images, while that gives more bins, at most ``n_bins``: the freed bins go to
    where the predictions spread out. With ``min_width=0`` these are plain equal-count bins.
    ``edges`` are the lowest and highest prediction of each bin: bin i spans ``edges[i, 0]``
    to ``edges[i, 1]``.

    Not scikit-learn's ``calibration_curve(strategy="quantile")``: its bins agree with plain
    equal-count ones only when n is a multiple of ``n_bins`` and no probabilities tie (the tests
    check that case). It cuts at interpolated percentiles: otherwise its cuts fall elsewhere,
    tied probabilities can leave a bin empty (and it drops empty bins), and it returns neither
    the counts nor the edges that the intervals and the plot need.
    """
    y_true, y_prob = check_binary(y_true, y_prob)
    if y_true.size == 0:
        raise ValueError("a reliability diagram needs at least one image, got none")
    if n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    order = np.argsort(y_prob, kind="mergesort")
    fewest = min(n_bins, y_true.size)
    bins = _merged_bins(order, y_prob, fewest, min_width)
    for k in range(fewest + 1, max(fewest, y_true.size // max(min_count, 1)) + 1):
        candidate = _merged_bins(order, y_prob, k, min_width)
        if len(candidate) > n_bins:
            break
        if len(candidate) > len(bins):
            bins = candidate
    count = np.array([len(b) for b in bins])
    positives = np.array([int(y_true[b].sum()) for b in bins])
    intervals = np.array([compute_wilson_interval(k, n, confidence) for k, n in zip(positives, count, strict=True)])  # (n_bins, 2)
    return {
        "mean_predicted": np.array([y_prob[b].mean() for b in bins]),
        "observed": positives / count,
        "count": count,
        "positives": positives,
        "observed_lower": intervals[:, 0],
        "observed_upper": intervals[:, 1],
        "edges": np.array([[y_prob[b].min(), y_prob[b].max()] for b in bins]),
        "confidence": confidence,
    }


def _merged_bins(order: np.ndarray, y_prob: np.ndarray, k: int, min_width: float) -> list[np.ndarray]:
    """``order`` (indices by ascending probability) cut into ``k`` equal-count groups; a group joins the bin before it
    while all the bin's predictions then lie within ``min_width`` of each other."""
    merged: list[np.ndarray] = []
    for group in np.array_split(order, k):
        if merged and y_prob[group[-1]] - y_prob[merged[-1][0]] < min_width:
            merged[-1] = np.concatenate([merged[-1], group])
        else:
            merged.append(group)
    return merged


def compute_ece(y_true, y_prob, n_bins: int = 15) -> float:
    """Expected calibration error: count-weighted |observed - predicted| over equal-width bins."""
    rel = compute_reliability(y_true, y_prob, n_bins)
    used = rel["count"] > 0
    gaps = np.abs(rel["observed"][used] - rel["mean_predicted"][used])
    return float(np.sum(gaps * rel["count"][used]) / rel["count"].sum())


def fit_temperature(logits, y_true) -> float:
    """Temperature T > 0 minimising the NLL of sigmoid(logits / T) (Guo et al. 2017)."""
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=float).reshape(-1)
    y_true = np.asarray(y_true, dtype=float).reshape(-1)
    if len(np.unique(y_true)) < 2:
        raise ValueError("fitting a temperature needs both classes")

    def nll(log_t: float) -> float:
        z = logits / np.exp(log_t)
        return float(np.mean(np.logaddexp(0, z) - y_true * z))  # -log sigmoid for y=1, -log(1-sigmoid) for y=0

    res = minimize_scalar(nll, bounds=tuple(np.log(TEMPERATURE_RANGE)), method="bounded")
    return float(np.exp(res.x))
