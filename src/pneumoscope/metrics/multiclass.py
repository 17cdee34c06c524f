"""Metrics of an N-class classifier (class probabilities per image): top-1 accuracy, one-vs-rest rates and AUCs,
macro and micro AUC with patient-bootstrap intervals, the N x N confusion matrix, classwise calibration, and the
paired comparison of two such classifiers. Pure numpy/scikit-learn; two classes work as well as ten."""

from typing import TypedDict

import numpy as np

from .calibration import TEMPERATURE_RANGE, compute_ece
from .intervals import compute_wilson_interval


def check_multiclass(y_true, probs, n_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(labels as int (n,), probabilities as float64 (n, K)), checked: finite, rows summing to 1, labels in range."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0] or y.ndim != 1:
        raise ValueError(f"need labels (n,) and class probabilities (n, K), got {y.shape} and {p.shape}")
    k = n_classes or p.shape[1]
    if p.shape[1] != k or k < 2:
        raise ValueError(f"need probabilities for {k} classes (at least 2), got {p.shape[1]} columns")
    if not np.isfinite(p).all() or (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-6):
        raise ValueError("class probabilities must be finite, non-negative and sum to 1 per image")
    if y.size and (y.dtype.kind not in "iu" or y.min() < 0 or y.max() >= k):
        raise ValueError(f"labels must be integers in [0, {k - 1}], got {np.unique(y)[:10]}")
    return y.astype(np.int64), p


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities (n, K), float64, from logits (n, K) divided by ``temperature``; stable for large logits."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature_multiclass(logits, y_true) -> float:
    """One temperature for all classes minimising the negative log-likelihood of softmax(logits / T) (Guo et al. 2017),
    within the range a checkpoint may carry."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.int64)
    if len(np.unique(y)) < 2:
        raise ValueError("fitting a temperature needs at least two classes present")

    def nll(log_t: float) -> float:
        s = z / np.exp(log_t)
        s = s - s.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(s).sum(axis=1)) - s[np.arange(len(y)), y]))

    res = minimize_scalar(nll, bounds=tuple(np.log(TEMPERATURE_RANGE)), method="bounded")
    return float(np.exp(res.x))


def confusion_matrix(y_true, y_pred, n_classes: int) -> np.ndarray:
    """Counts (K, K): row = true class, column = predicted class."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def _one_vs_rest(cm: np.ndarray, c: int) -> dict:
    """Sensitivity, specificity, PPV, NPV of class ``c`` against the rest, each with its Wilson interval."""
    tp = int(cm[c, c])
    fn = int(cm[c].sum() - tp)
    fp = int(cm[:, c].sum() - tp)
    tn = int(cm.sum() - tp - fn - fp)
    out, ci = {"n": tp + fn}, {}
    for name, k, n in (("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp), ("ppv", tp, tp + fp), ("npv", tn, tn + fn)):
        out[name] = k / n if n else None
        ci[name] = compute_wilson_interval(k, n)
    out["ci95"] = ci
    return out


def _aucs(y: np.ndarray, p: np.ndarray) -> tuple[list[float | None], float | None, float | None]:
    """(one-vs-rest AUC per class, macro AUC, micro AUC); None where a class is absent or present alone."""
    from sklearn.metrics import roc_auc_score

    k = p.shape[1]
    onehot = np.eye(k, dtype=np.int64)[y]
    per = [float(roc_auc_score(onehot[:, c], p[:, c])) if 0 < onehot[:, c].sum() < len(y) else None for c in range(k)]
    present = [a for a in per if a is not None]
    macro = float(np.mean(present)) if len(present) == k else None
    micro = float(roc_auc_score(onehot.ravel(), p.ravel())) if len(present) == k else None
    return per, macro, micro


def patient_resamples_multiclass(y: np.ndarray, groups, *, n_boot: int, seed: int):
    """Image indices of patient-bootstrap resamples that hold every class: patients drawn with replacement within
    their class (a patient's class is the most frequent label of their images), all their images brought along."""
    groups = np.asarray(groups)
    if groups.shape != y.shape:
        raise ValueError(f"groups must give one patient id per image, got {groups.shape} for {y.shape} images")
    k = int(y.max()) + 1 if y.size else 0
    uniq, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    patient_label = np.array([np.bincount(y[m]).argmax() for m in members])
    strata = [np.flatnonzero(patient_label == c) for c in range(k)]
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        chosen = np.concatenate([rng.choice(s, size=len(s), replace=True) for s in strata if len(s)])
        idx = np.concatenate([members[g] for g in chosen])
        if len(np.unique(y[idx])) == k:
            yield idx


class ClassRow(TypedDict):
    """One class against the rest: its images, rates with Wilson intervals, AUC with its bootstrap interval, ECE."""

    n: int
    sensitivity: float | None
    specificity: float | None
    ppv: float | None
    npv: float | None
    ci95: dict[str, list[float] | None]
    roc_auc: float | None
    ece: float | None


class MulticlassMetrics(TypedDict):
    """The N-class table of ``metrics.json`` (its ``multiclass`` entry)."""

    n: int
    classes: list[str]
    accuracy: float | None  # top-1
    macro_auc: float | None
    micro_auc: float | None
    ci95: dict[str, list[float] | None]  # accuracy (Wilson), macro_auc and micro_auc (patient bootstrap)
    per_class: dict[str, ClassRow]
    confusion_matrix: list[list[int]]  # rows true, columns predicted
    confusion_row_percent: list[list[float]]
    n_boot: int


def compute_multiclass_metrics(
    y_true, probs, class_names, *, groups=None, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95, ece_bins: int = 15
) -> MulticlassMetrics:
    """The N-class table: top-1 accuracy, macro and micro ROC-AUC (patient-bootstrap intervals when ``groups`` is
    given), per class one-vs-rest sensitivity/specificity/PPV/NPV (Wilson intervals), AUC and ECE, and the confusion
    matrix with counts and row percentages."""
    names = list(class_names)
    y, p = check_multiclass(y_true, probs, len(names))
    k = len(names)
    pred = p.argmax(axis=1)
    cm = confusion_matrix(y, pred, k)
    correct = int((pred == y).sum())
    per_auc, macro, micro = _aucs(y, p)
    ci = {"accuracy": compute_wilson_interval(correct, len(y)), "macro_auc": None, "micro_auc": None, "per_class_auc": [None] * k}
    if groups is not None and macro is not None and n_boot > 0:
        draws = [_aucs(y[idx], p[idx]) for idx in patient_resamples_multiclass(y, groups, n_boot=n_boot, seed=seed)]
        lo, hi = 50 * (1 - confidence), 50 * (1 + confidence)

        def band(values):
            values = [v for v in values if v is not None]
            return [float(np.percentile(values, lo)), float(np.percentile(values, hi))] if values else None

        ci["macro_auc"] = band([d[1] for d in draws])
        ci["micro_auc"] = band([d[2] for d in draws])
        ci["per_class_auc"] = [band([d[0][c] for d in draws]) for c in range(k)]
    per_class = {}
    for c, name in enumerate(names):
        row = _one_vs_rest(cm, c)
        row["roc_auc"] = per_auc[c]
        row["ci95"]["roc_auc"] = ci["per_class_auc"][c]
        row["ece"] = compute_ece((y == c).astype(int), p[:, c], n_bins=ece_bins) if len(y) else None
        per_class[name] = row
    rows = cm.sum(axis=1, keepdims=True)
    return {
        "n": int(len(y)),
        "classes": names,
        "accuracy": correct / len(y) if len(y) else None,
        "macro_auc": macro,
        "micro_auc": micro,
        "ci95": {"accuracy": ci["accuracy"], "macro_auc": ci["macro_auc"], "micro_auc": ci["micro_auc"]},
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "confusion_row_percent": np.where(rows > 0, 100.0 * cm / np.maximum(rows, 1), 0.0).round(1).tolist(),
        "n_boot": n_boot if groups is not None else 0,
    }


def compare_macro_auc(y_true, probs_a, probs_b, groups, *, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Paired patient bootstrap of the difference in macro AUC (B - A) on the same images: the difference, its interval
    and a two-sided bootstrap p-value (the share of resamples on the other side of zero, doubled)."""
    y, pa = check_multiclass(y_true, probs_a)
    _, pb = check_multiclass(y_true, probs_b, pa.shape[1])
    _, auc_a, _ = _aucs(y, pa)
    _, auc_b, _ = _aucs(y, pb)
    if auc_a is None or auc_b is None:
        return {"macro_auc_a": auc_a, "macro_auc_b": auc_b, "difference": None, "ci95": None, "p_value": None}
    deltas = np.array(
        [_aucs(y[i], pb[i])[1] - _aucs(y[i], pa[i])[1] for i in patient_resamples_multiclass(y, groups, n_boot=n_boot, seed=seed)]
    )
    lo, hi = 50 * (1 - confidence), 50 * (1 + confidence)
    p = min(1.0, 2 * min(float((deltas <= 0).mean()), float((deltas >= 0).mean()))) if len(deltas) else None
    return {
        "macro_auc_a": auc_a,
        "macro_auc_b": auc_b,
        "difference": auc_b - auc_a,
        "ci95": [float(np.percentile(deltas, lo)), float(np.percentile(deltas, hi))] if len(deltas) else None,
        "p_value": p,
        "n_resamples": int(len(deltas)),
    }
