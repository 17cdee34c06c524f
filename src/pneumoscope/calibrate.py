"""Site calibration and model comparison.

``calibrate_run`` refits the temperature and the threshold of a trained run on a
small labelled sample from a new site (thresholds do not carry over between
hospitals; see torchxrayvision issue #175) and writes a new run that records the
sample, so that evaluation can leave those images out.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from . import data as data_mod
from .checkpoint import save_checkpoint
from .evaluate import check_contract, select_split
from .metrics import compute_clinical_metrics, compute_delong, compute_mcnemar, compute_threshold, describe_policy, fit_temperature
from .outputs import atomic_output_dir, check_output_dir, write_json
from .predict import Predictor, calibrated_probability

logger = logging.getLogger(__name__)

MIN_PER_CLASS = 10


def calibrate_run(
    run: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *, split: str = "val", policy: str = "youden",
    target: float | None = None, overwrite: bool = False, cache_dir=None, progress: bool = True,
) -> tuple[Path, dict]:  # fmt: skip
    """The ``pneumoscope calibrate`` command: a new run with a site-fitted temperature and threshold."""
    check_output_dir(out, overwrite)
    predictor = Predictor.from_checkpoint(run)
    dataset = data_mod.load_dataset(data)
    check_contract(predictor, dataset)
    scanned = data_mod.scan(dataset.subset(select_split(dataset, split)), check_decode=False, progress=progress)
    kept, logits, problems = predictor.dataset_logits(scanned, cache_dir=cache_dir, progress=progress)
    y = np.array([r.label for r in kept])
    counts = np.bincount(y, minlength=2)
    if counts.min() < MIN_PER_CLASS:
        raise data_mod.DataError(
            f"{data}: calibration needs at least {MIN_PER_CLASS} images of each class, got {counts.tolist()} (NORMAL, PNEUMONIA). Fix: label more local images."
        )
    z = logits.double().numpy()
    temperature = fit_temperature(z, y)
    prob = calibrated_probability(z, temperature)
    threshold = compute_threshold(y, prob, policy, target)
    metrics = compute_clinical_metrics(y, prob, threshold, groups=[r.patient_id for r in kept], seed=0)
    description = dict(predictor.description)
    description.update(
        temperature=temperature,
        threshold=threshold,
        threshold_policy=f"{describe_policy(policy, target).replace('validation data', 'a local calibration sample')} ({data})",
        calibration={
            "data": str(Path(data).absolute()), "split": split, "n": int(len(y)), "n_positive": int(y.sum()),
            "date": time.strftime("%Y-%m-%d"), "previous_threshold": predictor.threshold, "previous_temperature": predictor.temperature,
            "image_sha256": sorted(r.content_hash for r in kept), "metrics_on_sample": metrics, "skipped": len(scanned.problems) + len(problems),
        },
    )  # fmt: skip
    run_dir = Path(run) if Path(run).is_dir() else Path(run).parent
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        save_checkpoint(tmp, predictor.model, description)
        write_json(tmp / "checkpoint.json", description)
        for name in ("history.png", "history.csv", "data_summary.json", "config.json", "splits.csv", "samples.png"):
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, tmp / name)
    logger.info("calibrated on %d images: temperature %.3f, threshold %.4f (was %.4f)", len(y), temperature, threshold, predictor.threshold)
    return Path(out), description


def _read_predictions(folder: Path) -> dict[str, tuple[int, float, int]]:
    path = Path(folder) / "predictions.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found. Give folders written by `pneumoscope evaluate`.")
    with open(path, newline="") as fh:
        return {r["path"]: (int(r["label"] == "PNEUMONIA"), float(r["prob"]), int(r["pred"] == "PNEUMONIA")) for r in csv.DictReader(fh)}


def compare_evaluations(eval_a: str | os.PathLike, eval_b: str | os.PathLike) -> dict:
    """Paired comparison of two evaluations of the same images: DeLong for AUC, McNemar for decisions."""
    a, b = _read_predictions(Path(eval_a)), _read_predictions(Path(eval_b))
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise ValueError(
            f"the evaluations cover different images ({len(only_a)} only in {eval_a}, {len(only_b)} only in {eval_b}, e.g. "
            f"{(only_a or only_b)[:1]}); a paired comparison needs the same images. Evaluate both runs on the same data."
        )
    paths = sorted(a)
    y = np.array([a[p][0] for p in paths])
    if any(a[p][0] != b[p][0] for p in paths):
        raise ValueError("the two evaluations disagree on image labels; they were not made on the same data")
    prob_a, prob_b = np.array([a[p][1] for p in paths]), np.array([b[p][1] for p in paths])
    pred_a, pred_b = np.array([a[p][2] for p in paths]), np.array([b[p][2] for p in paths])
    return {"n": len(paths), "a": str(eval_a), "b": str(eval_b), "auc_delong": compute_delong(y, prob_a, prob_b), "mcnemar": compute_mcnemar(y, pred_a, pred_b)}
