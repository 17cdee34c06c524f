"""evaluate's figures: confusion matrices, ROC and PR curves with their bands, reliability, and the Grad-CAM gallery."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import precision_recall_curve

from ..data.records import Dataset
from ..inference.predictor import Predictor
from ..metrics.calibration import compute_adaptive_reliability, compute_reliability
from ..metrics.classification import compute_roc_curve, decide
from ..metrics.intervals import compute_pr_band, compute_roc_band
from ..plots import overlay_cam, plot_cam, plot_confusion_matrix, plot_confusion_matrix_n, plot_pr, plot_reliability, plot_roc
from .scoring import EvaluationResult


def pick_cases(
    y_true: np.ndarray, y_prob: np.ndarray, threshold: float, *, per_kind: int = 2, at_least: int = 0, eligible: np.ndarray | None = None
) -> list[tuple[str, int]]:
    """(kind, index) of the most confident false positives, false negatives, true positives and true negatives,
    ``per_kind`` of each where there are that many; then, while fewer than ``at_least`` are picked, more of the
    kinds that have more, one kind at a time, so that both classes and both outcomes are shown where they exist.
    ``eligible``: the images that may be picked (those given a diagnosis: :meth:`EvaluationResult.assessable`)."""
    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob, dtype=np.float64)
    if eligible is not None:  # picked among the eligible, their indices mapped back
        index = np.flatnonzero(eligible)
        return [
            (kind, int(index[i])) for kind, i in pick_cases(y_true[index], y_prob[index], threshold, per_kind=per_kind, at_least=at_least)
        ]
    pred = decide(y_prob, threshold).astype(bool)
    ranked = []
    for kind, sel, most_confident_first in (
        ("false positive", pred & (y_true == 0), -y_prob),
        ("false negative", ~pred & (y_true == 1), y_prob),
        ("true positive", pred & (y_true == 1), -y_prob),
        ("true negative", ~pred & (y_true == 0), y_prob),
    ):
        idx = np.flatnonzero(sel)
        ranked.append((kind, [int(i) for i in idx[np.argsort(most_confident_first[idx], kind="stable")]]))
    picks = [(kind, i) for kind, order in ranked for i in order[:per_kind]]
    depth = per_kind
    while len(picks) < at_least and any(len(order) > depth for _, order in ranked):
        picks += [(kind, order[depth]) for kind, order in ranked if len(order) > depth][: at_least - len(picks)]
        depth += 1
    return picks


def pick_diagnosed_cases(
    predictor: Predictor, result: EvaluationResult, image_of, *, per_kind: int = 2, at_least: int = 0
) -> tuple[list[tuple[str, int]], dict[int, np.ndarray]]:
    """:func:`pick_cases` among the images ``predict`` gives a diagnosis, and the picked images decoded.

    The OOD guard's flags are known from the evaluation; the image screen needs the pixels, so each picked image is
    decoded (``image_of(i)``) and screened, and one the screen flags (blank, flat) is replaced by the next case."""
    from ..data.decode import screen_image
    from ..errors import ImageReadError

    eligible, images = result.assessable(predictor.ood_cutoff), {}
    while True:
        cases = pick_cases(result.y_true, result.y_prob, predictor.threshold, per_kind=per_kind, at_least=at_least, eligible=eligible)
        for _, i in cases:
            if i not in images:
                try:
                    images[i] = image_of(i)
                except ImageReadError:  # gone or changed since it was scored: not shown
                    images[i] = None
        flagged = [i for _, i in cases if images[i] is None or screen_image(images[i])]
        if not flagged:
            return cases, {i: images[i] for _, i in cases}
        eligible[flagged] = False


def write_gallery(
    predictor: Predictor, dataset: Dataset, result: EvaluationResult, folder: Path, per_kind: int = 2
) -> list[tuple[Path, str]]:
    """Grad-CAM figures of the most confident true/false positives and negatives."""
    from ..explain.cams import views_and_cams

    out = []
    size = predictor.preprocessing.input_size
    cases, images = pick_diagnosed_cases(
        predictor, result, lambda i: dataset.reader.read_image(result.records[i].ref, draft_size=size), per_kind=per_kind
    )
    for kind, i in cases:
        image = images[i]
        known = None if result.class_probs is None else result.class_probs[i : i + 1]
        (shown,), (cam,), (cls,) = views_and_cams(predictor, [image], probs=result.y_prob[i : i + 1], class_probs=known)  # pred[i]
        path = folder / f"gallery_{len(out):02d}.png"
        caption = f"{kind}: {Path(result.paths[i]).name}, P({predictor.prob_of.lower()}) = {result.y_prob[i]:.3f}, CAM for {predictor.class_names[cls]}"
        title = (
            f"{kind}: P({predictor.prob_of.lower()}) = {result.y_prob[i]:.3f}"  # the file name goes in the report's caption, not the figure
        )
        plot_cam(
            shown,
            overlay_cam(shown, cam),
            path,
            title=title,
            true_label=predictor.class_names[int(result.y_true[i])],
            method=f"Grad-CAM for {predictor.class_names[cls]}",
        )
        out.append((path, caption))
    return out


def write_figures(tmp: Path, result: EvaluationResult, class_names, *, n_boot: int) -> dict[str, Path]:
    """The confusion matrix, ROC and PR curves with their patient bootstrap bands (where both classes are present) and
    the reliability diagram, as PNGs in ``tmp``; their paths by name."""
    m = result.metrics
    figures = {"confusion_matrix": tmp / "confusion_matrix.png"}
    if result.class_probs is not None:  # N classes: the classes' matrix, then the screening decision's
        names = m["multiclass"]["classes"]
        figures["confusion_matrix_classes"] = tmp / "confusion_matrix_classes.png"
        plot_confusion_matrix_n(m["multiclass"]["confusion_matrix"], names, figures["confusion_matrix_classes"], title=f"n = {m['n']}")
    plot_confusion_matrix(
        m["confusion_matrix"],
        list(class_names),
        figures["confusion_matrix"],
        title=f"n = {m['n']}, threshold {m['threshold']:.3f}",
    )
    if m["roc_auc"] is not None:
        figures["roc_curve"] = tmp / "roc_curve.png"
        patients = [r.patient_id for r in result.records]
        band = compute_roc_band(result.y_true, result.y_prob, patients, n_boot=n_boot, seed=0)
        plot_roc(
            compute_roc_curve(result.y_true, result.y_prob),
            figures["roc_curve"],
            auc=m["roc_auc"],
            auc_ci=m["ci95"]["roc_auc"],
            operating_point=(1 - m["specificity"], m["sensitivity"]),
            threshold=m["threshold"],
            band=band,
        )
        precision, recall, _ = precision_recall_curve(result.y_true, result.y_prob)
        figures["pr_curve"] = tmp / "pr_curve.png"
        plot_pr(
            precision,
            recall,
            figures["pr_curve"],
            ap=m["pr_auc"],
            ap_ci=m["ci95"]["pr_auc"],
            prevalence=m["prevalence"],
            operating_point=(m["sensitivity"], m["ppv"] or 0.0),
            band=compute_pr_band(result.y_true, result.y_prob, patients, n_boot=n_boot, seed=0),
        )
    figures["reliability"] = tmp / "reliability.png"
    plot_reliability(
        compute_adaptive_reliability(result.y_true, result.y_prob),
        figures["reliability"],
        ece=m["ece"],
        brier=m["brier"],
        histogram=compute_reliability(result.y_true, result.y_prob),
    )
    return figures


def screening_names(predictor: Predictor) -> tuple[str, str]:
    """The two sides of the decision at the threshold: the run's two classes, or normal and not normal."""
    if not predictor.multiclass:
        return predictor.class_names
    return predictor.description.normal_class, "NOT " + predictor.description.normal_class
