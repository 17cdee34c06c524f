"""Clinical: part of the metrics (pure numpy/scikit-learn; positive class 1)."""

from typing import NotRequired, TypedDict

import numpy as np

from .calibration import compute_brier, compute_ece
from .classification import BinaryMetrics, check_binary, compute_binary_metrics, decide, ratio
from .intervals import compute_bootstrap_ci, compute_pr_auc, compute_wilson_interval

Interval = list[float] | None  # [lower, upper] of a 95% interval; None where it cannot be computed


class Subgroup(TypedDict):
    """Sensitivity within one pneumonia type."""

    n: int
    sensitivity: float
    ci95: Interval


class ClinicalMetrics(BinaryMetrics):
    """The full table of ``metrics.json`` (:func:`compute_clinical_metrics`); callers add the entries marked NotRequired."""

    balanced_accuracy: float | None
    ppv: float | None
    npv: float | None
    pr_auc: float | None
    brier: float
    ece: float
    prevalence: float | None
    ci95: dict[str, Interval]  # by metric name: Wilson for rates, patient bootstrap for roc_auc and pr_auc
    ci95_method: str
    subgroups: NotRequired[dict[str, Subgroup]]  # with pneumonia types: sensitivity per type
    note: NotRequired[str]  # why some figures are None
    multiclass: NotRequired[dict]  # N classes: the classes' table (:func:`~.multiclass.compute_multiclass_metrics`)


def compute_clinical_metrics(
    y_true, y_prob, threshold: float, *, groups=None, pneumonia_type=None, n_boot: int = 2000, seed: int = 0
) -> ClinicalMetrics:
    """:func:`compute_binary_metrics` plus PPV/NPV, balanced accuracy, PR-AUC, Brier, ECE,
    prevalence, 95% intervals (Wilson for rates, patient bootstrap for AUCs) and
    sensitivity per pneumonia type."""
    y_true, y_prob = check_binary(y_true, y_prob)
    m = compute_binary_metrics(y_true, y_prob, threshold)
    cm = m["confusion_matrix"]
    tp, tn, fp, fn = cm["tp"], cm["tn"], cm["fp"], cm["fn"]
    sens, spec = m["sensitivity"], m["specificity"]
    m["balanced_accuracy"] = (sens + spec) / 2 if sens is not None and spec is not None else None
    m["ppv"] = m["precision"]
    m["npv"] = ratio(tn, tn + fn)
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
        ci["balanced_accuracy"] = [(a + b) / 2 for a, b in zip(ci["sensitivity"], ci["specificity"], strict=True)]
    else:
        ci["balanced_accuracy"] = None
    groups = np.arange(len(y_true)) if groups is None else np.asarray(groups)
    ci.update(compute_bootstrap_ci(y_true, y_prob, groups, n_boot=n_boot, seed=seed))
    m["ci95"] = ci
    m["ci95_method"] = (
        f"Wilson score for rates; percentile bootstrap over patients (stratified, {n_boot} resamples, seed {seed}) for roc_auc and pr_auc"
    )
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
        rows.append(
            {
                "metric": key,
                "validation": v,
                "validation_ci": val_ci.get(key),
                "test": t,
                "test_ci": test_ci.get(key),
                "drop_flagged": is_drop_beyond_intervals(v, val_ci.get(key), t, test_ci.get(key)),
            }
        )
    return rows
