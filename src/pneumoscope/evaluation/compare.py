"""Paired comparison of two evaluations of the same images (``pneumoscope compare``): DeLong for AUC, McNemar for
decisions; for N-class evaluations also a paired patient bootstrap of the macro AUC and McNemar on the most probable
class. Reads the ``predictions.csv`` that ``evaluate`` writes; no model is loaded."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MissingFileError, UsageError
from ..metrics.comparison import compute_delong, compute_mcnemar
from ..metrics.multiclass import compare_macro_auc


@dataclass
class _Evaluation:
    """One evaluation's predictions.csv, by image path."""

    rows: dict[str, dict]
    classes: list[str]  # N classes: the prob_<CLASS> columns' classes in order; two classes: []


def _read_predictions(folder: Path) -> _Evaluation:
    path = Path(folder) / "predictions.csv"
    if not path.is_file():
        raise MissingFileError(f"{path}: not found. Give folders written by `pneumoscope evaluate`.")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        classes = [c.removeprefix("prob_") for c in reader.fieldnames or [] if c.startswith("prob_")]
        # true_label and pred_label; evaluations written before them call the columns label and pred
        rows = {
            r["path"]: {**r, "true_label": r.get("true_label", r.get("label")), "pred_label": r.get("pred_label", r.get("pred"))}
            for r in reader
        }
        return _Evaluation(rows, classes)


def _positive(rows: list[dict], folder: Path) -> str:
    """The class a two-class evaluation's ``prob`` is the probability of: PNEUMONIA in the default task; else the class
    decided for the most probable image when the least probable one got the other (the decision rises with ``prob``);
    else the side of the evaluation's threshold (its metrics.json) the images fell on. Refused when none tells."""
    names = {r["true_label"] for r in rows} | {r["pred_label"] for r in rows}
    if "PNEUMONIA" in names:
        return "PNEUMONIA"
    low, high = min(rows, key=lambda r: float(r["prob"])), max(rows, key=lambda r: float(r["prob"]))
    if low["pred_label"] != high["pred_label"]:
        return high["pred_label"]
    try:
        threshold = float(json.loads((folder / "metrics.json").read_text())["threshold"])
    except (OSError, ValueError, KeyError, TypeError):
        threshold = None
    others = names - {high["pred_label"]}
    if threshold is not None and float(high["prob"]) >= threshold:
        return high["pred_label"]
    if threshold is not None and len(others) == 1:
        return others.pop()
    raise UsageError(
        f"{folder}: every image was decided {high['pred_label']}, and without its metrics.json the class its probabilities are "
        "of cannot be told. Fix: compare the folders `pneumoscope evaluate` wrote, whole"
    )


def compare_evaluations(eval_a: str | os.PathLike, eval_b: str | os.PathLike, *, n_boot: int = 2000) -> dict:
    """Paired comparison of two evaluations of the same images: DeLong for the AUC of ``prob`` (the screening
    probability of an N-class run) and McNemar for the decisions; N classes add the macro AUC (paired patient
    bootstrap) and McNemar on the most probable class."""
    a, b = _read_predictions(Path(eval_a)), _read_predictions(Path(eval_b))
    if set(a.rows) != set(b.rows):
        only_a, only_b = sorted(set(a.rows) - set(b.rows)), sorted(set(b.rows) - set(a.rows))
        raise UsageError(
            f"the evaluations cover different images ({len(only_a)} only in {eval_a}, {len(only_b)} only in {eval_b}, e.g. "
            f"{(only_a or only_b)[:1]}); a paired comparison needs the same images. Evaluate both runs on the same data."
        )
    if a.classes != b.classes:
        raise UsageError(
            f"the evaluations are of different tasks (classes {a.classes or 'two'} and {b.classes or 'two'}); compare runs of one task"
        )
    paths = sorted(a.rows)
    if any(a.rows[p]["true_label"] != b.rows[p]["true_label"] for p in paths):
        raise UsageError("the two evaluations disagree on image labels; they were not made on the same data")
    out = {"n": len(paths), "a": str(eval_a), "b": str(eval_b)}
    if a.classes:
        out |= _compare_classes(a, b, paths, n_boot=n_boot)
    rows_a, rows_b = [a.rows[p] for p in paths], [b.rows[p] for p in paths]
    if a.classes:  # the screening view: not normal vs normal
        normal = rows_a[0]["screen"].removeprefix("NOT ")
        y = np.array([r["true_label"] != normal for r in rows_a], dtype=int)
        pred_a, pred_b = (np.array([r["screen"] != normal for r in rows], dtype=int) for rows in (rows_a, rows_b))
    else:
        positive = _positive(rows_a, Path(eval_a))
        y = np.array([r["true_label"] == positive for r in rows_a], dtype=int)
        pred_a, pred_b = (np.array([r["pred_label"] == positive for r in rows], dtype=int) for rows in (rows_a, rows_b))
    if len(np.unique(y)) < 2:
        raise UsageError(
            f"a paired comparison of AUCs needs images of both sides of the decision; the evaluations hold {np.bincount(y, minlength=2).tolist()} "
            "(negative, positive). Fix: evaluate both runs on data with images of both."
        )
    prob_a, prob_b = (np.array([float(r["prob"]) for r in rows]) for rows in (rows_a, rows_b))
    out |= {"auc_delong": compute_delong(y, prob_a, prob_b), "mcnemar": compute_mcnemar(y, pred_a, pred_b)}
    return out


def _compare_classes(a: _Evaluation, b: _Evaluation, paths: list[str], *, n_boot: int) -> dict:
    """N classes: the paired patient bootstrap of the macro AUC and McNemar on the most probable class."""
    index = {c: i for i, c in enumerate(a.classes)}
    y = np.array([index[a.rows[p]["true_label"]] for p in paths])
    groups = [a.rows[p]["patient_id"] for p in paths]
    probs = [np.array([[float(e.rows[p][f"prob_{c}"]) for c in a.classes] for p in paths]) for e in (a, b)]
    probs = [p / p.sum(axis=1, keepdims=True) for p in probs]  # written with 6 decimals: renormalised
    return {
        "classes": a.classes,
        "macro_auc": compare_macro_auc(y, probs[0], probs[1], groups, n_boot=n_boot),
        "mcnemar_top1": compute_mcnemar(y, probs[0].argmax(1), probs[1].argmax(1)),
    }
