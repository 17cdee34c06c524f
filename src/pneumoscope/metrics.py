"""Pure numpy/scikit-learn metrics. Positive class is pneumonia (1)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


def _check(y_true, y_prob) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true).astype(int).reshape(-1)
    y_prob = np.asarray(y_prob, dtype=float).reshape(-1)
    if y_true.shape != y_prob.shape:
        raise ValueError(f"y_true and y_prob must have the same length, got {y_true.shape} and {y_prob.shape}")
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("y_true must hold 0 (normal) and 1 (pneumonia) only")
    return y_true, y_prob


def compute_confusion(y_true, y_pred) -> dict[str, int]:
    y_true = np.asarray(y_true).astype(int)
    y_pred = np.asarray(y_pred).astype(int)
    return {
        "tn": int(((y_true == 0) & (y_pred == 0)).sum()),
        "fp": int(((y_true == 0) & (y_pred == 1)).sum()),
        "fn": int(((y_true == 1) & (y_pred == 0)).sum()),
        "tp": int(((y_true == 1) & (y_pred == 1)).sum()),
    }


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def compute_binary_metrics(y_true, y_prob, threshold: float) -> dict:
    """The flat metrics of ``metrics.json``: predicted positive when ``prob >= threshold``.

    A rate whose denominator is zero is ``None``, and so is ROC-AUC when only
    one class is present.
    """
    y_true, y_prob = _check(y_true, y_prob)
    cm = compute_confusion(y_true, y_prob >= threshold)
    tp, tn, fp, fn = cm["tp"], cm["tn"], cm["fp"], cm["fn"]
    sens, prec = _ratio(tp, tp + fn), _ratio(tp, tp + fp)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    return {
        "n": int(y_true.size),
        "n_positive": int(y_true.sum()),
        "threshold": float(threshold),
        "accuracy": _ratio(tp + tn, y_true.size),
        "sensitivity": sens,
        "specificity": _ratio(tn, tn + fp),
        "precision": prec,
        "f1": f1,
        "roc_auc": compute_roc_auc(y_true, y_prob),
        "confusion_matrix": cm,
    }


def compute_roc_auc(y_true, y_prob) -> float | None:
    y_true, y_prob = _check(y_true, y_prob)
    if len(np.unique(y_true)) < 2:
        return None
    return float(roc_auc_score(y_true, y_prob))


def compute_youden_threshold(y_true, y_prob) -> float:
    """The threshold maximising sensitivity + specificity - 1 (Youden's J).

    Among tied thresholds the middle one is taken, and the result is the
    midpoint between neighbouring scores so that it does not sit on a sample.
    """
    y_true, y_prob = _check(y_true, y_prob)
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


def compute_roc_curve(y_true, y_prob) -> dict[str, np.ndarray]:
    y_true, y_prob = _check(y_true, y_prob)
    fpr, tpr, thr = roc_curve(y_true, y_prob)
    return {"fpr": fpr, "tpr": tpr, "thresholds": thr}
