"""Classification: part of the metrics (pure numpy/scikit-learn; positive class 1)."""

from __future__ import annotations

from typing import TypedDict

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


def check_binary(y_true, y_prob) -> tuple[np.ndarray, np.ndarray]:
    """``y_true`` as ints and ``y_prob`` as floats, both flat; a ValueError for different lengths or labels other than 0 and 1."""
    y_true = np.asarray(y_true).astype(int).reshape(-1)
    y_prob = np.asarray(y_prob, dtype=float).reshape(-1)
    if y_true.shape != y_prob.shape:
        raise ValueError(f"y_true and y_prob must have the same length, got {y_true.shape} and {y_prob.shape}")
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("y_true must hold 0 (normal) and 1 (pneumonia) only")
    return y_true, y_prob


def compute_confusion(y_true, y_pred) -> dict[str, int]:
    """Counts of true/false negatives and positives: {'tn', 'fp', 'fn', 'tp'}."""
    y_true = np.asarray(y_true).astype(int)
    y_pred = np.asarray(y_pred).astype(int)
    return {
        "tn": int(((y_true == 0) & (y_pred == 0)).sum()),
        "fp": int(((y_true == 0) & (y_pred == 1)).sum()),
        "fn": int(((y_true == 1) & (y_pred == 0)).sum()),
        "tp": int(((y_true == 1) & (y_pred == 1)).sum()),
    }


def ratio(a: int, b: int) -> float | None:
    """``a / b``, or None when ``b`` is 0."""
    return a / b if b else None


LOGIT_EPS = 1e-12  # p and 1 - p are clipped to [LOGIT_EPS, 1]: |logit| <= 27.64, finite


def logit(p) -> np.ndarray:
    """log(p / (1 - p)) in float64, the one inverse of :func:`sigmoid`.

    ``p`` and ``1 - p`` are each clipped to [:data:`LOGIT_EPS`, 1], so a probability of
    exactly 0 or 1 gives a finite value (about -27.63 or +27.63) and ``logit(1 - p)``
    is ``-logit(p)`` up to rounding.
    """
    p = np.asarray(p, dtype=np.float64)
    return np.log(np.clip(p, LOGIT_EPS, 1.0)) - np.log(np.clip(1.0 - p, LOGIT_EPS, 1.0))


def sigmoid(z) -> np.ndarray:
    """1 / (1 + exp(-z)) in float64, the one logistic function: 0 (not an overflow warning) far below -700."""
    z = np.asarray(z, dtype=np.float64)
    with np.errstate(over="ignore"):  # exp(-z) is inf for z < -709: 1 / inf = 0, the right answer
        return 1.0 / (1.0 + np.exp(-z))


def calibrated_probability(logits, temperature: float = 1.0) -> np.ndarray:
    """P(PNEUMONIA) = sigmoid(logit / temperature), in float64: the one definition that
    training, site calibration and inference share."""
    return sigmoid(np.asarray(logits, dtype=np.float64) / temperature)


def decide(y_prob, threshold: float) -> np.ndarray:
    """The decision rule: 1 (PNEUMONIA) where the calibrated probability reaches the threshold
    (``prob >= threshold``), else 0. The one rule: Predictor, the metrics, shift and the CLI call it."""
    return (np.asarray(y_prob, dtype=np.float64) >= threshold).astype(int)


class ConfusionCounts(TypedDict):
    """The two-class confusion matrix as counts (positive class 1)."""

    tp: int
    tn: int
    fp: int
    fn: int


class BinaryMetrics(TypedDict):
    """The flat metrics of ``metrics.json``; a rate whose denominator is zero is None."""

    n: int
    n_positive: int
    threshold: float
    accuracy: float | None
    sensitivity: float | None
    specificity: float | None
    precision: float | None
    f1: float | None
    roc_auc: float | None  # None with one class present
    confusion_matrix: ConfusionCounts


def compute_binary_metrics(y_true, y_prob, threshold: float) -> BinaryMetrics:
    """The flat metrics of ``metrics.json``: predicted positive when ``prob >= threshold`` (:func:`decide`).

    A rate whose denominator is zero is ``None``, and so is ROC-AUC when only
    one class is present.
    """
    y_true, y_prob = check_binary(y_true, y_prob)
    cm = compute_confusion(y_true, decide(y_prob, threshold))
    tp, tn, fp, fn = cm["tp"], cm["tn"], cm["fp"], cm["fn"]
    sens, prec = ratio(tp, tp + fn), ratio(tp, tp + fp)
    f1 = ratio(2 * tp, 2 * tp + fp + fn)
    return {
        "n": int(y_true.size),
        "n_positive": int(y_true.sum()),
        "threshold": float(threshold),
        "accuracy": ratio(tp + tn, y_true.size),
        "sensitivity": sens,
        "specificity": ratio(tn, tn + fp),
        "precision": prec,
        "f1": f1,
        "roc_auc": compute_roc_auc(y_true, y_prob),
        "confusion_matrix": cm,
    }


def compute_roc_auc(y_true, y_prob) -> float | None:
    """ROC-AUC, or None when only one class is present."""
    y_true, y_prob = check_binary(y_true, y_prob)
    if len(np.unique(y_true)) < 2:
        return None
    return float(roc_auc_score(y_true, y_prob))


def compute_youden_threshold(y_true, y_prob) -> float:
    """The threshold maximising sensitivity + specificity - 1 (Youden's J).

    Among tied thresholds the middle one is taken, and the result is the
    midpoint between neighbouring scores so that it does not sit on a sample.
    """
    y_true, y_prob = check_binary(y_true, y_prob)
    if len(np.unique(y_true)) < 2:
        raise ValueError("choosing a threshold needs both classes in the validation data")
    fpr, tpr, thr = roc_curve(y_true, y_prob, drop_intermediate=False)
    j = tpr - fpr
    best = np.flatnonzero(np.isclose(j, j.max()))
    k = best[len(best) // 2]
    if k == 0:  # roc_curve's first threshold is +inf
        return float(np.nextafter(thr[1], np.inf))
    lower = thr[k + 1] if k + 1 < len(thr) else thr[k]
    return float((thr[k] + lower) / 2) if lower < thr[k] else float(thr[k])


def compute_smoothed_youden_threshold(y_true, y_prob) -> float:
    """Youden's J maximised on kernel-smoothed class distributions of the logit.

    On a near-separable validation split the empirical J is flat over the whole gap
    between the classes, and where in the gap the threshold lands depends on the few
    images at its edges. Smoothing each class's logits with a Gaussian kernel (Scott's
    bandwidth) lets every validation image weigh in: the threshold is where
    ``F_normal(t) - F_pneumonia(t)`` peaks, i.e. where the smoothed densities cross.
    """
    from scipy.special import ndtr

    y_true, y_prob = check_binary(y_true, y_prob)
    if len(np.unique(y_true)) < 2:
        raise ValueError("choosing a threshold needs both classes in the validation data")
    z = logit(y_prob)

    def smoothed_cdf(x: np.ndarray, grid: np.ndarray) -> np.ndarray:
        h = max(1.06 * x.std() * len(x) ** -0.2, 1e-3)  # Scott's rule
        return ndtr((grid[:, None] - x[None, :]) / h).mean(axis=1)  # (G,)

    neg, pos = z[y_true == 0], z[y_true == 1]
    grid = np.linspace(min(np.median(neg), np.median(pos)), max(np.median(neg), np.median(pos)), 2001)
    j = smoothed_cdf(neg, grid) - smoothed_cdf(pos, grid)
    return float(sigmoid(grid[int(np.argmax(j))]))


def compute_roc_curve(y_true, y_prob) -> dict[str, np.ndarray]:
    """The ROC curve: {'fpr', 'tpr', 'thresholds'} (scikit-learn's)."""
    y_true, y_prob = check_binary(y_true, y_prob)
    fpr, tpr, thr = roc_curve(y_true, y_prob)
    return {"fpr": fpr, "tpr": tpr, "thresholds": thr}
