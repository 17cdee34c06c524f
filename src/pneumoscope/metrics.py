"""Pure numpy/scikit-learn metrics. Positive class is pneumonia (1)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from .description import TEMPERATURE_RANGE
from .errors import UsageError


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


def calibrated_probability(logits, temperature: float = 1.0) -> np.ndarray:
    """P(PNEUMONIA) = sigmoid(logit / temperature), in float64: the one definition that
    training, site calibration and inference share."""
    z = np.asarray(logits, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-z / temperature))


def decide(y_prob, threshold: float) -> np.ndarray:
    """The decision rule: 1 (PNEUMONIA) where the calibrated probability reaches the threshold
    (``prob >= threshold``), else 0. The one rule: Predictor, the metrics, shift and the CLI call it."""
    return (np.asarray(y_prob, dtype=np.float64) >= threshold).astype(int)


def compute_binary_metrics(y_true, y_prob, threshold: float) -> dict:
    """The flat metrics of ``metrics.json``: predicted positive when ``prob >= threshold`` (:func:`decide`).

    A rate whose denominator is zero is ``None``, and so is ROC-AUC when only
    one class is present.
    """
    y_true, y_prob = _check(y_true, y_prob)
    cm = compute_confusion(y_true, decide(y_prob, threshold))
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


def compute_smoothed_youden_threshold(y_true, y_prob) -> float:
    """Youden's J maximised on kernel-smoothed class distributions of the logit.

    On a near-separable validation split the empirical J is flat over the whole gap
    between the classes, and where in the gap the threshold lands depends on the few
    images at its edges. Smoothing each class's logits with a Gaussian kernel (Scott's
    bandwidth) lets every validation image weigh in: the threshold is where
    ``F_normal(t) - F_pneumonia(t)`` peaks, i.e. where the smoothed densities cross.
    """
    from scipy.special import ndtr

    y_true, y_prob = _check(y_true, y_prob)
    if len(np.unique(y_true)) < 2:
        raise ValueError("choosing a threshold needs both classes in the validation data")
    z = np.log(np.clip(y_prob, 1e-12, 1 - 1e-12)) - np.log1p(-np.clip(y_prob, 1e-12, 1 - 1e-12))

    def smoothed_cdf(x: np.ndarray, grid: np.ndarray) -> np.ndarray:
        h = max(1.06 * x.std() * len(x) ** -0.2, 1e-3)  # Scott's rule
        return ndtr((grid[:, None] - x[None, :]) / h).mean(axis=1)  # (G,)

    neg, pos = z[y_true == 0], z[y_true == 1]
    grid = np.linspace(min(np.median(neg), np.median(pos)), max(np.median(neg), np.median(pos)), 2001)
    j = smoothed_cdf(neg, grid) - smoothed_cdf(pos, grid)
    return float(1.0 / (1.0 + np.exp(-grid[int(np.argmax(j))])))


def compute_roc_curve(y_true, y_prob) -> dict[str, np.ndarray]:
    y_true, y_prob = _check(y_true, y_prob)
    fpr, tpr, thr = roc_curve(y_true, y_prob)
    return {"fpr": fpr, "tpr": tpr, "thresholds": thr}


# --------------------------------------------------------------------------- operating point


THRESHOLD_POLICIES = ("youden", "youden-smooth", "sensitivity", "specificity")


def compute_threshold(y_true, y_prob, policy: str = "youden", target: float | None = None) -> float:
    """Decision threshold by a stated policy, for validation data only.

    ``youden``: max sensitivity + specificity - 1. ``sensitivity``: the highest
    threshold whose sensitivity is at least ``target`` (so specificity is as high
    as that allows). ``specificity``: the lowest threshold whose specificity is at
    least ``target``.
    """
    if policy == "youden":
        return compute_youden_threshold(y_true, y_prob)
    if policy == "youden-smooth":
        return compute_smoothed_youden_threshold(y_true, y_prob)
    if policy not in THRESHOLD_POLICIES:
        raise UsageError(f"threshold policy must be one of {list(THRESHOLD_POLICIES)}, got {policy!r}")
    if target is None or not 0.0 < target < 1.0:
        raise UsageError(f"a {policy} policy needs a target in (0, 1), got {target!r}")
    y_true, y_prob = _check(y_true, y_prob)
    if len(np.unique(y_true)) < 2:
        raise ValueError("choosing a threshold needs both classes in the validation data")
    cands = np.unique(y_prob)  # ascending; predicting positive at prob >= c
    pos, neg = y_prob[y_true == 1], y_prob[y_true == 0]
    sens = (pos[None, :] >= cands[:, None]).mean(1)  # (n_cands,)
    spec = (neg[None, :] < cands[:, None]).mean(1)
    if policy == "sensitivity":
        ok = np.flatnonzero(sens >= target)
        return float(cands[ok[-1]])
    ok = np.flatnonzero(spec >= target)
    return float(cands[ok[0]]) if ok.size else float(np.nextafter(cands[-1], np.inf))


def describe_policy(policy: str, target: float | None, fitted_on: str = "validation data") -> str:
    """The policy in words, ending with the data the threshold was chosen on."""
    if policy == "youden":
        return f"youden: maximise sensitivity + specificity - 1 on {fitted_on}"
    if policy == "youden-smooth":
        return f"youden-smooth: maximise sensitivity + specificity - 1 on kernel-smoothed {fitted_on}"
    return f"target {policy} >= {target:g} on {fitted_on}"


@dataclass(frozen=True)
class OperatingPoint:
    """A fitted temperature and threshold, the policy that chose the threshold, and the data both were fitted on."""

    temperature: float
    threshold: float
    policy: str  # a name in THRESHOLD_POLICIES
    target: float | None
    fitted_on: str  # e.g. "validation data (the patient-level validation split)"

    @property
    def description(self) -> str:
        """The checkpoint's ``threshold_policy`` text."""
        return describe_policy(self.policy, self.target, self.fitted_on)

    def probabilities(self, logits) -> np.ndarray:
        return calibrated_probability(logits, self.temperature)

    def decide(self, y_prob) -> np.ndarray:
        return decide(y_prob, self.threshold)


def fit_operating_point(logits, y_true, policy: str = "youden", target: float | None = None, *, fitted_on: str) -> OperatingPoint:
    """Temperature (:func:`fit_temperature`) on the logits, then the policy's threshold
    (:func:`compute_threshold`) on the probabilities it gives: training and site calibration
    both fit their operating point here."""
    temperature = fit_temperature(logits, y_true)
    threshold = compute_threshold(y_true, calibrated_probability(logits, temperature), policy, target)
    return OperatingPoint(temperature, threshold, policy, target, fitted_on)


# --------------------------------------------------------------------------- intervals


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
    from sklearn.metrics import average_precision_score

    y_true, y_prob = _check(y_true, y_prob)
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
    y_true, y_prob = _check(y_true, y_prob)
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
    y_true, y_prob = _check(y_true, y_prob)
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


# --------------------------------------------------------------------------- calibration


def compute_brier(y_true, y_prob) -> float:
    y_true, y_prob = _check(y_true, y_prob)
    return float(np.mean((y_prob - y_true) ** 2))


def compute_reliability(y_true, y_prob, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Equal-width bins of predicted probability: mean prediction, observed frequency, count."""
    y_true, y_prob = _check(y_true, y_prob)
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
    y_true, y_prob = _check(y_true, y_prob)
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
    intervals = np.array([compute_wilson_interval(k, n, confidence) for k, n in zip(positives, count)])  # (n_bins, 2)
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


# --------------------------------------------------------------------------- the full table


def compute_clinical_metrics(
    y_true, y_prob, threshold: float, *, groups=None, pneumonia_type=None, n_boot: int = 2000, seed: int = 0
) -> dict:
    """:func:`compute_binary_metrics` plus PPV/NPV, balanced accuracy, PR-AUC, Brier, ECE,
    prevalence, 95% intervals (Wilson for rates, patient bootstrap for AUCs) and
    sensitivity per pneumonia type."""
    y_true, y_prob = _check(y_true, y_prob)
    m = compute_binary_metrics(y_true, y_prob, threshold)
    cm = m["confusion_matrix"]
    tp, tn, fp, fn = cm["tp"], cm["tn"], cm["fp"], cm["fn"]
    sens, spec = m["sensitivity"], m["specificity"]
    m["balanced_accuracy"] = (sens + spec) / 2 if sens is not None and spec is not None else None
    m["ppv"] = m["precision"]
    m["npv"] = _ratio(tn, tn + fn)
    m["pr_auc"] = compute_pr_auc(y_true, y_prob)
    m["brier"] = compute_brier(y_true, y_prob)
    m["ece"] = compute_ece(y_true, y_prob)
    m["prevalence"] = m["n_positive"] / m["n"] if m["n"] else None
    ci = {
        "sensitivity": compute_wilson_interval(tp, tp + fn),
        "specificity": compute_wilson_interval(tn, tn + fp),
        "ppv": compute_wilson_interval(tp, tp + fp),
        "npv": compute_wilson_interval(tn, tn + fn),
        "accuracy": compute_wilson_interval(tp + tn, m["n"]),
        "precision": compute_wilson_interval(tp, tp + fp),
        # balanced accuracy and F1 are not single proportions: Wilson on their
        # effective counts (mean of the two rates' intervals; 2TP of 2TP+FP+FN)
        "f1": compute_wilson_interval(2 * tp, 2 * tp + fp + fn),
    }
    if ci["sensitivity"] and ci["specificity"]:
        ci["balanced_accuracy"] = [(a + b) / 2 for a, b in zip(ci["sensitivity"], ci["specificity"])]
    else:
        ci["balanced_accuracy"] = None
    groups = np.arange(len(y_true)) if groups is None else np.asarray(groups)
    ci.update(compute_bootstrap_ci(y_true, y_prob, groups, n_boot=n_boot, seed=seed))
    m["ci95"] = ci
    m["ci95_method"] = f"Wilson score for rates; percentile bootstrap over patients (stratified, {n_boot} resamples, seed {seed}) for roc_auc and pr_auc"
    if pneumonia_type is not None:
        pneumonia_type = np.asarray(pneumonia_type)
        sub = {}
        for t in sorted(set(pneumonia_type[y_true == 1].tolist())):
            sel = (y_true == 1) & (pneumonia_type == t)
            k, n = int(decide(y_prob[sel], threshold).sum()), int(sel.sum())
            sub[t] = {"n": n, "sensitivity": k / n, "ci95": compute_wilson_interval(k, n)}
        m["subgroups"] = sub
    if m["roc_auc"] is None:
        m["note"] = "only one class in the evaluated images: ROC-AUC, PR-AUC and one of sensitivity/specificity cannot be computed"
    return m


# --------------------------------------------------------------------------- validation beside test

SUMMARY_METRICS = ("sensitivity", "specificity", "ppv", "npv", "balanced_accuracy", "roc_auc", "pr_auc")
DROP_RULE = (
    "A fall from validation to test is flagged when it is larger than the 95% intervals explain: the two intervals do "
    "not overlap (the test interval lies wholly below the validation interval), or, where validation has no interval, "
    "the test interval lies wholly below the validation value."
)


def is_drop_beyond_intervals(val: float | None, val_ci, test: float | None, test_ci) -> bool:
    """:data:`DROP_RULE`: True when ``test`` is below ``val`` by more than the 95% intervals explain.

    Non-overlap of two 95% intervals is a conservative test (a difference can be significant while
    the intervals still overlap), so a flagged drop is a real one; an unflagged one may still be."""
    if val is None or test is None or not test_ci or test >= val:
        return False
    return test_ci[1] < (val_ci[0] if val_ci else val)


def compare_with_validation(val_metrics: dict, test_metrics: dict, keys=SUMMARY_METRICS) -> list[dict]:
    """Validation and test side by side: for each of ``keys`` present in both, the two values, their 95% intervals
    and whether the test figure falls by more than the intervals explain (:func:`is_drop_beyond_intervals`)."""
    val_ci, test_ci = val_metrics.get("ci95") or {}, test_metrics.get("ci95") or {}
    rows = []
    for key in keys:
        if val_metrics.get(key) is None and test_metrics.get(key) is None:
            continue
        v, t = val_metrics.get(key), test_metrics.get(key)
        rows.append({"metric": key, "validation": v, "validation_ci": val_ci.get(key), "test": t, "test_ci": test_ci.get(key),
                     "drop_flagged": is_drop_beyond_intervals(v, val_ci.get(key), t, test_ci.get(key))})  # fmt: skip
    return rows


# --------------------------------------------------------------------------- comparing two models


def _delong_components(y_true: np.ndarray, scores: np.ndarray):
    pos, neg = scores[y_true == 1], scores[y_true == 0]
    # psi(x, y) = 1 if x > y, 0.5 if equal: structural components of the Mann-Whitney AUC
    cmp = (pos[:, None] > neg[None, :]).astype(float) + 0.5 * (pos[:, None] == neg[None, :])  # (m, n)
    return cmp.mean(), cmp.mean(1), cmp.mean(0)  # auc, V10 (per positive), V01 (per negative)


def compute_delong(y_true, prob_a, prob_b) -> dict:
    """Paired DeLong test for the difference of two correlated ROC-AUCs (DeLong et al. 1988)."""
    from scipy.stats import norm

    y_true, prob_a = _check(y_true, prob_a)
    _, prob_b = _check(y_true, prob_b)
    if len(np.unique(y_true)) < 2:
        raise ValueError("comparing AUCs needs both classes")
    auc_a, v10a, v01a = _delong_components(y_true, prob_a)
    auc_b, v10b, v01b = _delong_components(y_true, prob_b)
    s10 = np.cov(np.vstack([v10a, v10b]))  # (2, 2)
    s01 = np.cov(np.vstack([v01a, v01b]))
    m, n = len(v10a), len(v01a)
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    diff = auc_a - auc_b
    se = float(np.sqrt(max(var, 0.0)))
    z = diff / se if se > 0 else 0.0
    p = float(2 * norm.sf(abs(z))) if se > 0 else 1.0
    half = norm.ppf(0.975) * se
    return {"auc_a": float(auc_a), "auc_b": float(auc_b), "difference": float(diff), "se": se, "z": float(z), "p_value": p,
            "ci95": [float(diff - half), float(diff + half)]}  # fmt: skip


def compute_mcnemar(y_true, pred_a, pred_b) -> dict:
    """Exact McNemar test on the discordant decisions of two classifiers."""
    from scipy.stats import binomtest

    y_true = np.asarray(y_true).astype(int)
    right_a = np.asarray(pred_a).astype(int) == y_true
    right_b = np.asarray(pred_b).astype(int) == y_true
    b = int((right_a & ~right_b).sum())  # only A right
    c = int((~right_a & right_b).sum())  # only B right
    p = float(binomtest(b, b + c, 0.5).pvalue) if b + c else 1.0
    return {"only_a_correct": b, "only_b_correct": c, "p_value": p, "method": "exact binomial McNemar"}
