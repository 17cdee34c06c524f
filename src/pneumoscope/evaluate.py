"""Evaluate a trained run on labelled data: predictions, metrics, report, figures."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import classification_report

from . import data as data_mod
from .metrics import compute_binary_metrics, compute_roc_curve
from .outputs import atomic_output_dir, check_output_dir, write_bytes_atomic, write_csv, write_json
from .plots import plot_confusion_matrix, plot_roc
from .predict import Predictor

logger = logging.getLogger(__name__)


@dataclass
class EvaluationResult:
    records: list[data_mod.Record]
    paths: list[str]
    y_true: np.ndarray
    y_prob: np.ndarray
    metrics: dict
    problems: list[tuple[str, str]]


def select_split(dataset: data_mod.Dataset, split: str) -> list[data_mod.Record]:
    """A Kaggle root or npz: the named split; a folder of class subfolders: all of it."""
    if dataset.layout == "class-folders":
        return dataset.records
    rows = [r for r in dataset.records if r.split == split]
    if not rows:
        have = sorted({r.split for r in dataset.records})
        raise data_mod.DataError(f"{dataset.source}: no images in split {split!r}; it has {have}. Choose one with --split.")
    return rows


def evaluate_dataset(
    predictor: Predictor, dataset: data_mod.Dataset, *, split: str = "test", limit: int | None = None, cache_dir=None, progress: bool = True
) -> EvaluationResult:
    records = select_split(dataset, split)
    if limit:
        records = data_mod.limit_per_split(records, limit, seed=0)
    scanned = data_mod.scan(dataset.subset(records), check_decode=False, progress=progress)
    kept, prob, problems = predictor.predict_dataset(scanned, cache_dir=cache_dir, progress=progress)
    if not kept:
        raise data_mod.DataError(f"{dataset.source}: none of the {len(records)} images could be read; see the warnings above.")
    y_true = np.array([r.label for r in kept])
    metrics = compute_binary_metrics(y_true, prob, predictor.threshold)
    if metrics["roc_auc"] is None:
        logger.warning("only one class in the evaluated images: ROC-AUC cannot be computed")
    return EvaluationResult(kept, [dataset.display(r) for r in kept], y_true, prob, metrics, scanned.problems + problems)


def evaluate_run(
    run: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *, split: str = "test",
    limit: int | None = None, overwrite: bool = False, cache_dir=None, progress: bool = True,
) -> tuple[Path, EvaluationResult]:  # fmt: skip
    """The ``pneumoscope evaluate`` command."""
    check_output_dir(out, overwrite)
    predictor = Predictor.from_checkpoint(run)
    if tuple(predictor.class_names) != data_mod.CLASS_NAMES:
        raise ValueError(f"{run}: checkpoint classes {predictor.class_names} differ from {data_mod.CLASS_NAMES}; it cannot be evaluated here.")
    result = evaluate_dataset(predictor, data_mod.load_dataset(data), split=split, limit=limit, cache_dir=cache_dir, progress=progress)
    m = result.metrics
    names = list(data_mod.CLASS_NAMES)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        write_json(tmp / "metrics.json", m)
        write_csv(
            tmp / "predictions.csv",
            ["path", "patient_id", "label", "prob", "pred"],
            [[path, r.patient_id, names[r.label], f"{p:.6f}", names[int(p >= predictor.threshold)]]
             for r, path, p in zip(result.records, result.paths, result.y_prob)],
        )  # fmt: skip
        y_pred = (result.y_prob >= predictor.threshold).astype(int)
        report = classification_report(result.y_true, y_pred, labels=[0, 1], target_names=names, digits=4, zero_division=0)
        header = f"threshold {predictor.threshold:.4f} ({predictor.description.get('threshold_policy', '')})\n\n"
        write_bytes_atomic(tmp / "classification_report.txt", (header + report).encode())
        plot_confusion_matrix(m["confusion_matrix"], names, tmp / "confusion_matrix.png", title=f"n = {m['n']}, threshold {m['threshold']:.3f}")
        if m["roc_auc"] is not None:
            op = (1 - m["specificity"], m["sensitivity"])
            plot_roc(compute_roc_curve(result.y_true, result.y_prob), tmp / "roc_curve.png", auc=m["roc_auc"], operating_point=op)
        if result.problems:
            write_csv(tmp / "skipped.csv", ["path", "reason"], result.problems)
    logger.info("evaluated %d images: AUC %s, accuracy %.4f; written to %s", m["n"], m["roc_auc"], m["accuracy"], out)
    return Path(out), result
