"""A run scored on a split of labelled data: its probabilities and clinical metrics (EvaluationResult)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..data.decode import read_many, screen_image
from ..data.records import Dataset, Record
from ..data.splits import limit_per_split, refuse_label_conflicts, scan, select_split
from ..errors import DataError
from ..inference.predictor import Predictor
from ..metrics.clinical import compute_clinical_metrics
from ..metrics.multiclass import compute_multiclass_metrics

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

    def assessable(self, ood_cutoff: float | None) -> np.ndarray:
        """Whether each image gets a diagnosis, as ``predict`` decides it: not over the OOD guard's ``ood_cutoff``, nor
        flagged by the image screen where the images were decoded (a NaN distance, like predict's, flags nothing)."""
        ok = np.ones(len(self.records), dtype=bool)
        for flags in not_assessable_flags(self.ood_distance, ood_cutoff, self.screened):
            if flags is not None:
                ok &= ~flags
        return ok


def not_assessable_flags(
    ood_distance: np.ndarray | None, cutoff: float | None, screened: list[str] | None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Predict's rule for an image it gives no label, per check: (the OOD guard's flags: distance over ``cutoff``, the
    image screen's flags: a reason given), each None where it cannot be told (no guard; images not decoded). A NaN
    distance flags nothing, as in ``Predictor``."""
    guard = None if ood_distance is None or cutoff is None else np.asarray(ood_distance, dtype=np.float64) > cutoff
    screen = None if screened is None else np.array([bool(reason) for reason in screened], dtype=bool)
    return guard, screen


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
    refuse_label_conflicts(scanned)  # one image under two labels is scored wrong by construction
    scanned, excluded, transductive = _leave_out_fitted(predictor, scanned)
    scored = _score(predictor, scanned, tta=tta, cache_dir=cache_dir, progress=progress)
    kept = scored.records
    if not kept:
        raise DataError(f"{dataset.source}: none of the {len(records)} images could be evaluated; see the warnings above.")
    y_class = np.array([r.label for r in kept])
    groups = [r.patient_id for r in kept]
    y_true = (y_class != predictor.normal_index).astype(int) if predictor.multiclass else y_class
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
