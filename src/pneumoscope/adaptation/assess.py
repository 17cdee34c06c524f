"""How far a site's images are from the training split, as the model sees them: the report that `shift` prints,
`adapt` records before and after, and `evaluate` puts in its report."""

from __future__ import annotations

from typing import TypedDict

import numpy as np
import torch

from ..errors import DataError
from ..inference.predictor import Predictor
from .shift import (
    ClassPriorEstimate,
    MmdTest,
    Prevalence,
    compute_domain_auc,
    compute_mmd_test,
    estimate_class_priors,
    estimate_prevalence,
    shift_verdict,
)


class ClassPriors(ClassPriorEstimate):
    """N classes: the estimates, with the classes they are in the order of, the normal class and validation's shares."""

    classes: list[str]
    normal: str
    validation: list[float]


class _ShiftFigures(TypedDict):
    n: int
    shift_detected: bool
    verdict: str  # a plain sentence with the remedy
    mmd: MmdTest
    domain_auc: float  # 0.5: a classifier cannot tell the site's images from the training ones
    prevalence: Prevalence
    validation_prevalence: float
    ood_fraction: float | None  # None without a guard
    threshold: float
    adapted: bool  # the run's features are already adapted to a site


class ShiftReport(_ShiftFigures, total=False):
    """How a site differs from the training split (:func:`assess_site`; what ``shift --json`` prints)."""

    class_priors: ClassPriors  # N classes
    run: str  # `shift` adds the run, the site and how many of its files were skipped
    site: str
    skipped: int


def _validation_rates(predictor: Predictor) -> tuple[float, float, float]:
    """(sensitivity, 1 - specificity, prevalence) of the run's validation split at its threshold."""
    val = predictor.description.metrics.get("val") or {}
    if not {"sensitivity", "specificity", "prevalence"} <= set(val):
        raise DataError("the run records no validation metrics; train it again with this version of pneumoscope.")
    return float(val["sensitivity"]), 1.0 - float(val["specificity"]), float(val["prevalence"])


def validation_class_priors(predictor: Predictor) -> tuple[np.ndarray, np.ndarray]:
    """N classes: (the validation confusion matrix, rows true; the validation share of each class)."""
    table = (predictor.description.metrics.get("val") or {}).get("multiclass") or {}
    cm = np.asarray(table.get("confusion_matrix") or [], dtype=np.float64)
    if cm.shape != (len(predictor.class_names),) * 2 or cm.sum() == 0:
        raise DataError("the run records no validation confusion matrix; train it again with this version of pneumoscope.")
    return cm, cm.sum(axis=1) / cm.sum()


def assess_site(predictor: Predictor, site_features: np.ndarray, *, seed: int = 0, n_perm: int = 500) -> ShiftReport:
    """Set-level shift between the training split and a site (features as the model sees them now)."""
    model = predictor.model
    ref = model.adapter.ref_sample.numpy()
    adapted = model.adapter.apply_np(site_features)
    mmd = compute_mmd_test(ref, adapted, n_perm=n_perm, seed=seed)
    domain_auc = compute_domain_auc(ref, adapted, seed=seed)
    with torch.no_grad():
        logits = model.head_logits(site_features).double().numpy()
    prob = predictor.probability(logits)
    tpr, fpr, val_prev = _validation_rates(predictor)
    prevalence = estimate_prevalence(prob, predictor.threshold, tpr, fpr, val_prev)
    ood = None
    if model.ood is not None:
        ood = float((model.ood.distance_np(adapted) > predictor.ood_cutoff).mean())
    positive = predictor.prob_of.lower() if not predictor.multiclass else f"'{predictor.prob_of}'"
    detected, verdict = shift_verdict(mmd, domain_auc, prevalence, val_prevalence=val_prev, ood_fraction=ood, positive=positive)
    report: ShiftReport = {
        "n": int(len(site_features)),
        "shift_detected": detected,
        "verdict": verdict,
        "mmd": mmd,
        "domain_auc": domain_auc,
        "prevalence": prevalence,
        "validation_prevalence": val_prev,
        "ood_fraction": ood,
        "threshold": predictor.threshold,
        "adapted": not model.adapter.is_identity,
    }
    if predictor.multiclass:
        cm, priors = validation_class_priors(predictor)
        estimate = estimate_class_priors(predictor.class_probabilities(logits), cm, priors)
        report["class_priors"] = {
            "classes": list(predictor.class_names),
            "normal": predictor.description.normal_class,
            "validation": priors.tolist(),
            **estimate,
        }
    return report
