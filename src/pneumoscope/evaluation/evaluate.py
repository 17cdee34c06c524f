"""Evaluate a trained run on labelled data: predictions, metrics with intervals, figures, report."""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import classification_report, precision_recall_curve

from ..data.decode import read_many, screen_image
from ..data.records import Dataset, Record
from ..data.splits import limit_per_split, scan, select_split
from ..errors import DataError
from ..inference.predictor import Predictor
from ..metrics.calibration import compute_adaptive_reliability, compute_reliability
from ..metrics.classification import compute_roc_curve, decide
from ..metrics.clinical import DROP_RULE, compare_with_validation, compute_clinical_metrics
from ..metrics.intervals import compute_pr_band, compute_roc_band
from ..metrics.multiclass import compute_multiclass_metrics
from ..models.checkpoint import RunFolder
from ..outputs import atomic_output_dir, check_output_dir, write_bytes_atomic, write_csv, write_json
from ..plots import overlay_cam, plot_cam, plot_confusion_matrix, plot_confusion_matrix_n, plot_pr, plot_reliability, plot_roc
from .report import model_card, render_report

logger = logging.getLogger(__name__)


@dataclass
class EvaluationResult:
    """An evaluation: the images scored, their labels and probabilities, the metrics, and what was skipped or left out."""

    records: list[Record]
    paths: list[str]
    y_true: np.ndarray
    y_prob: np.ndarray
    metrics: dict
    problems: list[tuple[str, str]]
    excluded_calibration: int = 0
    features: np.ndarray | None = None  # pooled backbone features of ``records`` (None with test-time augmentation)
    ood_distance: np.ndarray | None = None  # the OOD guard's distance of each of ``records`` (None without a guard)
    screened: list[str] | None = None  # io.screen_image of each of ``records`` where they were decoded, else None
    # N classes: ``y_true`` and ``y_prob`` are the screening view (not normal = 1, P(not normal)); these are the classes
    y_class: np.ndarray | None = None  # the true class of each of ``records``
    class_probs: np.ndarray | None = None  # (n, K) calibrated class probabilities


def evaluate_dataset(
    predictor: Predictor,
    dataset: Dataset,
    *,
    split: str = "test",
    limit: int | None = None,
    cache_dir=None,
    n_boot: int = 2000,
    seed: int = 0,
    tta: bool = False,
    progress: bool = True,
) -> EvaluationResult:
    """Predictions and clinical metrics (with patient-level intervals) of ``predictor`` on ``split`` of ``dataset``."""
    predictor.check_dataset(dataset)
    records = select_split(dataset, split)
    if limit:
        records = limit_per_split(records, limit, seed=0)
    scanned = scan(dataset.subset(records), check_decode=False, progress=progress)
    scanned, excluded, transductive = _leave_out_fitted(predictor, scanned)
    scored = _score(predictor, scanned, tta=tta, cache_dir=cache_dir, progress=progress)
    kept = scored.records
    if not kept:
        raise DataError(f"{dataset.source}: none of the {len(records)} images could be evaluated; see the warnings above.")
    y_class = np.array([r.label for r in kept])
    groups = [r.patient_id for r in kept]
    y_true = (y_class != predictor.class_names.index(predictor.description.normal_class)).astype(int) if predictor.multiclass else y_class
    types = None if predictor.multiclass else [r.pneumonia_type for r in kept]
    metrics = compute_clinical_metrics(
        y_true, scored.prob, predictor.threshold, groups=groups, pneumonia_type=types, n_boot=n_boot, seed=seed
    )
    if predictor.multiclass:
        metrics["multiclass"] = compute_multiclass_metrics(
            y_class, scored.class_probs, predictor.class_names, groups=groups, n_boot=n_boot, seed=seed
        )
    metrics["adapted_on_evaluated_images"] = transductive
    if metrics["roc_auc"] is None:
        logger.warning("only one class in the evaluated images: ROC-AUC cannot be computed")
    return EvaluationResult(
        kept,
        [dataset.display(r) for r in kept],
        y_true,
        scored.prob,
        metrics,
        scanned.problems + scored.problems,
        excluded,
        scored.features,
        scored.distance,
        scored.screened,
        y_class if predictor.multiclass else None,
        scored.class_probs,
    )


def _leave_out_fitted(predictor: Predictor, scanned: Dataset) -> tuple[Dataset, int, int]:
    """(the scanned images less those the checkpoint was calibrated on, how many were left out, how many of the rest
    it was adapted on without their labels); both counts are logged as warnings."""
    calibrated_on = set((predictor.description.calibration or {}).get("image_sha256", []))
    excluded = [r for r in scanned.records if r.content_hash in calibrated_on]
    if excluded:
        logger.warning("%d images were used to calibrate this checkpoint; they are left out of the evaluation", len(excluded))
        scanned = scanned.subset([r for r in scanned.records if r.content_hash not in calibrated_on])
    adapted_on = set((predictor.description.adaptation or {}).get("image_sha256", []))
    transductive = sum(r.content_hash in adapted_on for r in scanned.records)
    if transductive:
        logger.warning(
            "%d of the evaluated images were used, without their labels, to adapt this checkpoint: these figures are "
            "transductive. For an unbiased estimate evaluate on other images of the site.",
            transductive,
        )
    return scanned, len(excluded), transductive


@dataclass
class _Scored:
    records: list[Record]  # the images scored (the unreadable ones left out)
    prob: np.ndarray
    problems: list[tuple[str, str]]
    features: np.ndarray | None
    distance: np.ndarray | None
    screened: list[str] | None
    class_probs: np.ndarray | None = None  # N classes: (n, K)


def _score(predictor: Predictor, scanned: Dataset, *, tta: bool, cache_dir, progress: bool) -> _Scored:
    """Probabilities, features and OOD distances of the scanned images: through the feature cache, or (``tta``) by
    decoding each image and running every view."""
    if tta:  # the feature cache holds untransformed images only: decode and run every view
        size = predictor.preprocessing.input_size
        decoded = read_many(scanned.records, lambda r: scanned.reader.read_image(r.ref, draft_size=size), name=scanned.display, log=logger)
        logits, distance = predictor.tta_logits(decoded.images)
        screened = [screen_image(im) for im in decoded.images]
        kept = [scanned.records[i] for i in decoded.index]
        return _Scored(kept, predictor.probability(logits), decoded.skipped, None, distance, screened, _class_probs(predictor, logits))
    feats, logits = predictor.dataset_logits(scanned, cache_dir=cache_dir, progress=progress)
    with torch.inference_mode():  # the guard on the cached features: what inference computes, without a second pass
        distance = predictor.model.ood_distances(feats.features)
    distance = None if distance is None else distance.double().numpy()
    return _Scored(
        feats.records, predictor.probability(logits), feats.problems, feats.features, distance, None, _class_probs(predictor, logits)
    )


def _class_probs(predictor: Predictor, logits: np.ndarray) -> np.ndarray | None:
    return predictor.class_probabilities(logits) if predictor.multiclass else None


def count_not_assessable(ood_distance: np.ndarray | None, cutoff: float | None, screened: list[str] | None) -> dict:
    """How many of the evaluated images inference would give no label (``predict.Predictor``: the image screen or the
    OOD guard flags them). ``guard`` or ``screen`` is None where that check could not be counted (no guard; images
    not decoded); ``n`` counts the images either flags. The metrics still include these images."""
    guard = None if ood_distance is None or cutoff is None else np.asarray(ood_distance) > cutoff  # (N,) bool
    screen = None if screened is None else np.array([bool(reason) for reason in screened], dtype=bool)
    flagged = [f for f in (guard, screen) if f is not None]
    either = np.logical_or.reduce(flagged) if flagged else None
    unchecked = [
        f"{name} ({why})"
        for name, flags, why in (
            ("the OOD guard", guard, "the run has none"),
            ("the image screen", screen, "it needs the decoded images, which the shortcut audit decodes and --no-audit skips"),
        )
        if flags is None
    ]
    return {
        "n": None if either is None else int(either.sum()),
        "guard": None if guard is None else int(guard.sum()),
        "screen": None if screen is None else int(screen.sum()),
        "note": f"Not counted: {'; '.join(unchecked)}." if unchecked else "",
    }


def pick_cases(y_true: np.ndarray, y_prob: np.ndarray, threshold: float, *, per_kind: int = 2, at_least: int = 0) -> list[tuple[str, int]]:
    """(kind, index) of the most confident false positives, false negatives, true positives and true negatives,
    ``per_kind`` of each where there are that many; then, while fewer than ``at_least`` are picked, more of the
    kinds that have more, one kind at a time, so that both classes and both outcomes are shown where they exist."""
    pred = decide(y_prob, threshold).astype(bool)
    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob, dtype=np.float64)
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


def _gallery(predictor: Predictor, dataset: Dataset, result: EvaluationResult, folder: Path, per_kind: int = 2) -> list[tuple[Path, str]]:
    """Grad-CAM figures of the most confident true/false positives and negatives."""
    from ..explain.cams import views_and_cams

    out = []
    for kind, i in pick_cases(result.y_true, result.y_prob, predictor.threshold, per_kind=per_kind):
        record = result.records[i]
        image = dataset.reader.read_image(record.ref, draft_size=predictor.preprocessing.input_size)
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


def _site_shift(predictor: Predictor, result: EvaluationResult) -> tuple[dict | None, str]:
    """How the evaluated images differ from the training split, as `pneumoscope shift` reports it (runs that keep
    training feature statistics, features computed for the evaluation, and at least a few dozen images), or None
    and why not."""
    from ..adaptation.assess import assess_site
    from ..adaptation.shift import MIN_SITE_IMAGES

    if predictor.model.adapter is None:
        return None, "the run keeps no training feature statistics to compare with"
    if result.features is None:
        return None, "test-time augmentation computes no pooled features to compare"
    if len(result.records) < MIN_SITE_IMAGES:
        return None, f"{len(result.records)} images, fewer than the {MIN_SITE_IMAGES} the test needs"
    return assess_site(predictor, result.features, n_perm=200), ""


def seen_in_training(run_folder: RunFolder, records: list[Record]) -> list[Record]:
    """The records whose bytes match an image the run was trained or validated on (by the SHA-256 in its splits.csv)."""
    if not run_folder.splits.is_file():
        return []
    with open(run_folder.splits, newline="", encoding="utf-8", errors="replace") as fh:
        fitted = {row.get("sha256") for row in csv.DictReader(fh) if row.get("split") in ("train", "val") and row.get("status") == "used"}
    fitted.discard("")
    fitted.discard(None)
    return [r for r in records if r.content_hash and r.content_hash in fitted]


def evaluate_run(
    run: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    split: str = "test",
    limit: int | None = None,
    overwrite: bool = False,
    cache_dir=None,
    n_boot: int = 2000,
    audit_shortcuts: bool = True,
    tta: bool = False,
    progress: bool = True,
) -> tuple[Path, EvaluationResult]:
    """The ``pneumoscope evaluate`` command: (the folder written, the evaluation)."""
    check_output_dir(out, overwrite)
    predictor = Predictor.from_checkpoint(run)
    dataset = predictor.load_labelled(data)
    result = evaluate_dataset(predictor, dataset, split=split, limit=limit, cache_dir=cache_dir, n_boot=n_boot, tta=tta, progress=progress)
    m = result.metrics
    run_folder = RunFolder.of(run)
    shown_split = split if dataset.layout != "class-folders" else "all"
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        _write_tables(tmp, predictor, result)
        figures = _write_figures(tmp, result, _screening_names(predictor), n_boot=n_boot)
        if result.problems:
            write_csv(tmp / "skipped.csv", ["path", "reason"], result.problems)
        gallery = _gallery(predictor, dataset, result, tmp)
        audit, screened = None, result.screened
        if audit_shortcuts:
            audit, screens = _write_audit(tmp, predictor, dataset, result, tta=tta, progress=progress)
            screened = screened or [screens[i] for i in range(len(result.records))]
        m["not_assessable"] = count_not_assessable(result.ood_distance, predictor.ood_cutoff, screened)
        m["seen_in_training"] = _count_seen_in_training(run_folder, dataset, result)
        write_json(tmp / "metrics.json", m)
        shift, shift_skipped = _site_shift(predictor, result)
        if shift:
            write_json(tmp / "site_shift.json", shift)
        context = {
            **_report_context(predictor, dataset, result, run_folder, data=data, split=split, shown_split=shown_split),
            "summary": _report_summary(predictor, m, shift_skipped),
            "figures": figures,
            "gallery": gallery,
            "shortcut_audit": audit,
            "site_shift": shift,
        }
        write_bytes_atomic(tmp / "report.html", render_report(context).encode())
    # the CLI prints these metrics: at INFO they would be said twice
    logger.debug(
        "evaluated %d images: AUC %s, accuracy %.4f; written to %s",
        m["n"],
        "n/a" if m["roc_auc"] is None else f"{m['roc_auc']:.4f}",
        m["accuracy"],
        out,
    )
    _log_to_mlflow(
        predictor, run_folder, m, run=run, data=data, out=out, split=split, shown_split=shown_split, limit=limit, tta=tta, n_boot=n_boot
    )
    return Path(out), result


def _write_tables(tmp: Path, predictor: Predictor, result: EvaluationResult) -> None:
    """predictions.csv (one row an image) and classification_report.txt (scikit-learn's, at the run's threshold)."""
    names = list(predictor.class_names)
    header = f"threshold {predictor.threshold:.4f} ({predictor.description.threshold_policy})\n\n"
    if predictor.multiclass:
        _write_multiclass_tables(tmp, predictor, result, header)
        return
    write_csv(
        tmp / "predictions.csv",
        ["path", "patient_id", "true_label", "prob", "pred_label"],
        [
            [path, r.patient_id, names[r.label], f"{p:.6f}", predictor.label_of(p)]
            for r, path, p in zip(result.records, result.paths, result.y_prob, strict=True)
        ],
    )
    y_pred = predictor.decide(result.y_prob)
    report = classification_report(result.y_true, y_pred, labels=[0, 1], target_names=names, digits=4, zero_division=0)
    write_bytes_atomic(tmp / "classification_report.txt", (header + report).encode())


def _write_multiclass_tables(tmp: Path, predictor: Predictor, result: EvaluationResult, header: str) -> None:
    """N classes: predictions.csv with the true class, the screening probability and decision, the class decided and
    each class's probability; the classification report of the most probable class, and of the screening decision."""
    names = list(predictor.class_names)
    normal = predictor.description.normal_class
    rows = []
    for r, path, p, probs in zip(result.records, result.paths, result.y_prob, result.class_probs, strict=True):
        screen = "NOT " + normal if predictor.decide(p) else normal
        rows.append([path, r.patient_id, names[r.label], f"{p:.6f}", screen, predictor.class_label(p, probs), *(f"{q:.6f}" for q in probs)])
    columns = ["path", "patient_id", "true_label", "prob", "screen", "pred_label", *(f"prob_{c}" for c in names)]
    write_csv(tmp / "predictions.csv", columns, rows)
    top1 = classification_report(
        result.y_class, result.class_probs.argmax(1), labels=list(range(len(names))), target_names=names, digits=4, zero_division=0
    )
    screening = classification_report(
        result.y_true, predictor.decide(result.y_prob), labels=[0, 1], target_names=[normal, "NOT " + normal], digits=4, zero_division=0
    )
    text = f"most probable class (top-1)\n\n{top1}\nscreening decision, {header}{screening}"
    write_bytes_atomic(tmp / "classification_report.txt", text.encode())


def _write_figures(tmp: Path, result: EvaluationResult, class_names, *, n_boot: int) -> dict[str, Path]:
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


def _screening_names(predictor: Predictor) -> tuple[str, str]:
    """The two sides of the decision at the threshold: the run's two classes, or normal and not normal."""
    if not predictor.multiclass:
        return predictor.class_names
    return predictor.description.normal_class, "NOT " + predictor.description.normal_class


def _write_audit(
    tmp: Path, predictor: Predictor, dataset: Dataset, result: EvaluationResult, *, tta: bool, progress: bool
) -> tuple[dict, dict[int, str]]:
    """The shortcut audit, written to shortcut_audit.json: (the audit, {index: the image screen} of the images it decoded)."""
    from ..explain.checks import audit_dataset

    reader, size, screens = dataset.reader, predictor.preprocessing.input_size, {}

    def image_of(i: int) -> np.ndarray:  # the audit decodes every image: screen it on the way, as inference would
        image = reader.read_image(result.records[i].ref, draft_size=size)
        screens[i] = screen_image(image)
        return image

    audit = audit_dataset(predictor, image_of, len(result.records), probs=None if tta else result.y_prob, progress=progress)
    write_json(tmp / "shortcut_audit.json", audit)
    return audit, screens


def _count_seen_in_training(run_folder: RunFolder, dataset: Dataset, result: EvaluationResult) -> int:
    """How many evaluated images the run was trained or validated on (a warning when any)."""
    seen = seen_in_training(run_folder, result.records)
    if seen:
        logger.warning(
            "%d of the %d evaluated images are byte-identical to images this run was trained or validated on (e.g. %s): "
            "these figures are optimistic. Fix: evaluate on images the run never saw.",
            len(seen),
            len(result.records),
            dataset.display(seen[0]),
        )
    return len(seen)


def _report_summary(predictor: Predictor, m: dict, shift_skipped: str) -> dict:
    """The report's summary: these metrics beside the validation's, and the rule that flags a drop."""
    val = predictor.description.metrics.get("val")
    return {
        "rows": compare_with_validation(val or {}, m),
        "validation": val,
        "rule": DROP_RULE,
        "shift_skipped": shift_skipped,
    }


def _report_context(
    predictor: Predictor,
    dataset: Dataset,
    result: EvaluationResult,
    run_folder: RunFolder,
    *,
    data: str | os.PathLike,
    split: str,
    shown_split: str,
) -> dict:
    """The report's title, metrics, data, the run's training summary and history, model card and notes."""
    m = result.metrics
    return {
        "title": f"pneumoscope evaluation: {Path(str(data)).name} ({split})",
        "metrics": m,
        "description": predictor.description,
        "data": {
            "source": str(data),
            "split": shown_split,
            "skipped": len(result.problems),
            "excluded_calibration": result.excluded_calibration,
            "patients": len({r.patient_id for r in result.records}) if dataset.has_patient_ids else None,
        },
        "training_summary": json.loads(run_folder.data_summary.read_text()) if run_folder.data_summary.is_file() else None,
        "history": run_folder.history_png if run_folder.history_png.is_file() else None,
        "model_card": model_card(predictor.description, m, str(data)),
        "notes": _report_notes(m),
    }


def _report_notes(m: dict) -> list[str]:
    """The report's notes: the metrics' own, and what makes the figures optimistic or transductive."""
    notes = [m["note"]] if m.get("note") else []
    if m["seen_in_training"]:
        notes.append(
            f"{m['seen_in_training']} of these images are byte-identical to images the model was trained or validated on: "
            "the figures are optimistic."
        )
    if m.get("adapted_on_evaluated_images"):
        notes.append(
            f"{m['adapted_on_evaluated_images']} of these images were used, without their labels, to adapt the model to the site: "
            "the figures are transductive."
        )
    return notes


def _log_to_mlflow(
    predictor: Predictor,
    run_folder: RunFolder,
    m: dict,
    *,
    run: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    split: str,
    shown_split: str,
    limit: int | None,
    tta: bool,
    n_boot: int,
) -> None:
    """A run trained with ``--logger mlflow``: this evaluation joins it in its store. Others: nothing."""
    tracked = (predictor.description.training or {}).get("mlflow")
    if not tracked:
        return
    from ..training.tracking import log_evaluation

    log_evaluation(
        run_folder.path,
        tracked,
        out,
        m,
        split=shown_split,
        params={
            "run": Path(run).absolute(),
            "data": Path(data).absolute(),
            "split": split,
            "limit": limit,
            "tta": tta,
            "bootstraps": n_boot,
            "out": Path(out).absolute(),
        },
    )
