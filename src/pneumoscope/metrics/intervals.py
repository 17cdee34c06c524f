"""Intervals: part of the metrics (pure numpy/scikit-learn; positive class 1)."""

from __future__ import annotations

import numpy as np

from .classification import check_binary


def compute_wilson_interval(k: int, n: int, confidence: float = 0.95) -> list[float] | None:
    """Wilson score interval for a proportion k/n; None when n == 0.

    The same interval as statsmodels' ``proportion_confint(k, n, method="wilson")`` (the tests
    check it), written out because statsmodels is a test dependency, not a runtime one."""
    from scipy.stats import norm

    if n == 0:
        return None
    z = norm.ppf(0.5 + confidence / 2)
    p = k / n
    denom = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    # at k = 0 or k = n the bound is exactly 0 or 1; rounding would leave it a hair inside the observed rate
    lower = 0.0 if k == 0 else max(0.0, centre - half)
    upper = 1.0 if k == n else min(1.0, centre + half)
    return [float(lower), float(upper)]


def compute_pr_auc(y_true, y_prob) -> float | None:
    """Average precision (the PR-AUC), or None when only one class is present."""
    from sklearn.metrics import average_precision_score

    y_true, y_prob = check_binary(y_true, y_prob)
    if len(np.unique(y_true)) < 2:
        return None
    return float(average_precision_score(y_true, y_prob))


def compute_bootstrap_ci(
    y_true, y_prob, groups, *, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95
) -> dict[str, list[float] | None]:
    """Percentile intervals for ROC-AUC and PR-AUC, resampling patients, stratified by class.

    Patients are drawn with replacement within each class stratum (a patient's
    class is the highest label among their images), and all their images come
    along, so correlated images of one child do not narrow the interval.
    """
    y_true, y_prob = check_binary(y_true, y_prob)
    if len(np.unique(y_true)) < 2:
        return {"roc_auc": None, "pr_auc": None}
    aucs, aps = [], []
    for idx in _patient_resamples(y_true, groups, n_boot=n_boot, seed=seed):
        auc, ap = _auc_and_ap(y_true[idx], y_prob[idx])
        aucs.append(auc)
        aps.append(ap)
    lo, hi = 50 * (1 - confidence), 50 * (1 + confidence)
    return {
        "roc_auc": [float(np.percentile(aucs, lo)), float(np.percentile(aucs, hi))],
        "pr_auc": [float(np.percentile(aps, lo)), float(np.percentile(aps, hi))],
    }


def _patient_resamples(y_true: np.ndarray, groups, *, n_boot: int, seed: int):
    """Image indices of each patient-bootstrap resample that holds both classes.

    Patients are drawn with replacement within each class stratum (a patient's class
    is the highest label among their images) and bring all their images along. The
    one resampling shared by every bootstrap here, so the AUC interval and the ROC
    band of one seed see the same resamples.
    """
    groups = np.asarray(groups)
    if groups.shape != y_true.shape:
        raise ValueError(f"groups must give one patient id per image, got {groups.shape} for {y_true.shape} images")
    uniq, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    patient_label = np.array([y_true[m].max() for m in members])
    strata = [np.flatnonzero(patient_label == c) for c in (0, 1)]
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        chosen = np.concatenate([rng.choice(s, size=len(s), replace=True) for s in strata if len(s)])
        idx = np.concatenate([members[g] for g in chosen])
        if y_true[idx].min() == y_true[idx].max():
            continue
        yield idx


def compute_roc_band(
    y_true, y_prob, groups, *, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95, n_grid: int = 101
) -> dict[str, np.ndarray] | None:
    """Pointwise percentile band of the ROC curve over patient-bootstrap resamples.

    Each resample's ROC curve is read as TPR at a fixed grid of FPR (the step
    function's upper value: the best TPR reachable at that FPR), and the band is the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of TPR at each
    grid point. The resamples are those of :func:`compute_bootstrap_ci` for the same
    seed. None when only one class is present.
    """
    band = _curve_band(_tpr_at, y_true, y_prob, groups, n_boot=n_boot, seed=seed, confidence=confidence, n_grid=n_grid)
    if band is None:
        return None
    grid, lower, upper, n = band
    return {"fpr": grid, "tpr_lower": lower, "tpr_upper": upper, "n_resamples": n, "confidence": confidence}


def _curve_band(read_at, y_true, y_prob, groups, *, n_boot: int, seed: int, confidence: float, n_grid: int):
    """(grid, lower, upper, resamples) of ``read_at(grid, y_true, y_prob)`` over the patient-bootstrap resamples; None for one class."""
    y_true, y_prob = check_binary(y_true, y_prob)
    if len(np.unique(y_true)) < 2:
        return None
    grid = np.linspace(0.0, 1.0, n_grid)
    curves = np.vstack([read_at(grid, y_true[idx], y_prob[idx]) for idx in _patient_resamples(y_true, groups, n_boot=n_boot, seed=seed)])
    lo, hi = 50 * (1 - confidence), 50 * (1 + confidence)  # curves: (n_resamples, n_grid)
    return grid, np.percentile(curves, lo, axis=0), np.percentile(curves, hi, axis=0), len(curves)


def compute_pr_band(
    y_true, y_prob, groups, *, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95, n_grid: int = 101
) -> dict[str, np.ndarray] | None:
    """Pointwise percentile band of the precision-recall curve over patient-bootstrap resamples.

    Each resample's curve is read as interpolated precision at a fixed grid of recall (the best
    precision of the thresholds whose recall reaches the grid value), and the band is the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles at each grid point: the
    resamples of :func:`compute_bootstrap_ci` (and :func:`compute_roc_band`) for the same seed.
    None when only one class is present.
    """
    band = _curve_band(_precision_at, y_true, y_prob, groups, n_boot=n_boot, seed=seed, confidence=confidence, n_grid=n_grid)
    if band is None:
        return None
    grid, lower, upper, n = band
    return {"recall": grid, "precision_lower": lower, "precision_upper": upper, "n_resamples": n, "confidence": confidence}


def _precision_at(recall_grid: np.ndarray, y_true: np.ndarray, y_prob: np.ndarray) -> np.ndarray:
    """Interpolated precision at each recall of the grid: the highest precision of the thresholds with recall >= it."""
    order = np.argsort(-y_prob, kind="mergesort")
    p, y = y_prob[order], y_true[order]
    last = np.r_[np.flatnonzero(np.diff(p)), len(p) - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last].astype(float)
    recall, precision = tp / tp[-1], tp / (last + 1)
    best_from_here = np.maximum.accumulate(precision[::-1])[::-1]  # max precision at this recall or higher
    k = np.searchsorted(recall, recall_grid, side="left")  # first operating point with recall >= grid value
    return best_from_here[np.minimum(k, len(recall) - 1)]


def _tpr_at(fpr_grid: np.ndarray, y_true: np.ndarray, y_prob: np.ndarray) -> np.ndarray:
    """The ROC step function's TPR at each FPR of the grid (the highest TPR of the thresholds with FPR <= it)."""
    order = np.argsort(-y_prob, kind="mergesort")
    p, y = y_prob[order], y_true[order]
    last = np.r_[np.flatnonzero(np.diff(p)), len(p) - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last].astype(float)
    fp = (last + 1) - tp
    tpr, fpr = np.r_[0.0, tp / tp[-1]], np.r_[0.0, fp / fp[-1]]
    k = np.searchsorted(fpr, fpr_grid, side="right") - 1  # last operating point with fpr <= grid value
    return tpr[k]


def _auc_and_ap(y_true: np.ndarray, y_prob: np.ndarray) -> tuple[float, float]:
    """ROC-AUC and average precision in one sort; equal to scikit-learn's, ties included.

    The bootstrap calls this thousands of times; scikit-learn's input checks
    would dominate its run time.
    """
    order = np.argsort(-y_prob, kind="mergesort")
    p, y = y_prob[order], y_true[order]
    last = np.r_[np.flatnonzero(np.diff(p)), len(p) - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last].astype(float)
    fp = (last + 1) - tp
    n_pos, n_neg = tp[-1], fp[-1]
    tpr, fpr = np.r_[0.0, tp / n_pos], np.r_[0.0, fp / n_neg]
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # trapezoids: ties count one half
    precision = tp / (tp + fp)
    ap = float(np.sum(np.diff(tpr) * precision))
    return auc, ap


def mean_sd(values) -> dict[str, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value), e.g. of a metric over seeds."""
    values = np.asarray(values, dtype=float)
    return {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
