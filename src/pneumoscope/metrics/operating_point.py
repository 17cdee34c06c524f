"""Operating point: part of the metrics (pure numpy/scikit-learn; positive class 1)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from .calibration import fit_temperature
from .classification import calibrated_probability, check_binary, compute_smoothed_youden_threshold, compute_youden_threshold
from .clinical import ClinicalMetrics, compute_clinical_metrics
from .multiclass import compute_multiclass_metrics, fit_temperature_multiclass, softmax

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
    y_true, y_prob = check_binary(y_true, y_prob)
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
    normal_index: int | None = None  # N classes: the screening probability is 1 - P(this class)

    @property
    def description(self) -> str:
        """The checkpoint's ``threshold_policy`` text."""
        return describe_policy(self.policy, self.target, self.fitted_on)

    def probabilities(self, logits) -> np.ndarray:
        """The calibrated probability the threshold applies to: P(class 1) of one logit, or 1 - P(normal) of K."""
        if self.normal_index is None:
            return calibrated_probability(logits, self.temperature)
        return 1.0 - softmax(logits, self.temperature)[:, self.normal_index]


def fit_operating_point(logits, y_true, policy: str = "youden", target: float | None = None, *, fitted_on: str) -> OperatingPoint:
    """Temperature (:func:`fit_temperature`) on the logits, then the policy's threshold
    (:func:`compute_threshold`) on the probabilities it gives: training and site calibration
    both fit their operating point here."""
    temperature = fit_temperature(logits, y_true)
    threshold = compute_threshold(y_true, calibrated_probability(logits, temperature), policy, target)
    return OperatingPoint(temperature, threshold, policy, target, fitted_on)


def fit_screening_point(
    logits, y_true, normal_index: int, policy: str = "youden", target: float | None = None, *, fitted_on: str
) -> OperatingPoint:
    """N classes: one temperature for the softmax (:func:`fit_temperature_multiclass`), then the policy's threshold
    on the screening probability P(not normal) against "not the normal class"."""
    logits, y_true = np.asarray(logits, dtype=np.float64), np.asarray(y_true)
    temperature = fit_temperature_multiclass(logits, y_true)
    screen = 1.0 - softmax(logits, temperature)[:, normal_index]
    threshold = compute_threshold((y_true != normal_index).astype(int), screen, policy, target)
    return OperatingPoint(temperature, threshold, policy, target, fitted_on, normal_index)


def fit_point_with_metrics(
    logits,
    y_true,
    policy: str,
    target: float | None,
    *,
    fitted_on: str,
    groups,
    seed: int,
    class_names=None,
    normal_index: int | None = None,
    multiclass_n_boot: int = 2000,
) -> tuple[OperatingPoint, ClinicalMetrics]:
    """The operating point fitted on labelled logits and the table it gives on them: training's validation split and
    calibrate's local sample both fit theirs here. Two classes (``normal_index`` None): :func:`fit_operating_point`
    and the clinical table. N classes: :func:`fit_screening_point`, the clinical table of the screening decision, and
    the classes' table (``multiclass``) on the softmax at the fitted temperature."""
    y_true = np.asarray(y_true)
    if normal_index is None:
        point = fit_operating_point(logits, y_true, policy, target, fitted_on=fitted_on)
        return point, compute_clinical_metrics(y_true, point.probabilities(logits), point.threshold, groups=groups, seed=seed)
    point = fit_screening_point(logits, y_true, normal_index, policy, target, fitted_on=fitted_on)
    screen = point.probabilities(logits)
    metrics = compute_clinical_metrics((y_true != normal_index).astype(int), screen, point.threshold, groups=groups, seed=seed)
    metrics["multiclass"] = compute_multiclass_metrics(
        y_true, softmax(logits, point.temperature), class_names, groups=groups, n_boot=multiclass_n_boot, seed=seed
    )
    return point, metrics
