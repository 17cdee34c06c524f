"""Paired comparison of two evaluations of the same images (``pneumoscope compare``): DeLong for
AUC, McNemar for decisions. Reads the ``predictions.csv`` that ``evaluate`` writes; no model is loaded."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from ..errors import MissingFileError, UsageError
from ..metrics.comparison import compute_delong, compute_mcnemar


def _read_predictions(folder: Path) -> dict[str, tuple[int, float, int]]:
    path = Path(folder) / "predictions.csv"
    if not path.is_file():
        raise MissingFileError(f"{path}: not found. Give folders written by `pneumoscope evaluate`.")
    with open(path, newline="") as fh:
        return {r["path"]: (int(r["label"] == "PNEUMONIA"), float(r["prob"]), int(r["pred"] == "PNEUMONIA")) for r in csv.DictReader(fh)}


def compare_evaluations(eval_a: str | os.PathLike, eval_b: str | os.PathLike) -> dict:
    """Paired comparison of two evaluations of the same images: DeLong for AUC, McNemar for decisions."""
    a, b = _read_predictions(Path(eval_a)), _read_predictions(Path(eval_b))
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise UsageError(
            f"the evaluations cover different images ({len(only_a)} only in {eval_a}, {len(only_b)} only in {eval_b}, e.g. "
            f"{(only_a or only_b)[:1]}); a paired comparison needs the same images. Evaluate both runs on the same data."
        )
    paths = sorted(a)
    y = np.array([a[p][0] for p in paths], dtype=int)
    if any(a[p][0] != b[p][0] for p in paths):
        raise UsageError("the two evaluations disagree on image labels; they were not made on the same data")
    if len(np.unique(y)) < 2:
        raise UsageError(
            f"a paired comparison of AUCs needs images of both classes; the evaluations hold {np.bincount(y, minlength=2).tolist()} "
            "(NORMAL, PNEUMONIA). Fix: evaluate both runs on data with images of both classes."
        )
    prob_a, prob_b = np.array([a[p][1] for p in paths]), np.array([b[p][1] for p in paths])
    pred_a, pred_b = np.array([a[p][2] for p in paths]), np.array([b[p][2] for p in paths])
    return {
        "n": len(paths),
        "a": str(eval_a),
        "b": str(eval_b),
        "auc_delong": compute_delong(y, prob_a, prob_b),
        "mcnemar": compute_mcnemar(y, pred_a, pred_b),
    }
