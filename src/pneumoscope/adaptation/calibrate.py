"""Site calibration.

``calibrate_run`` refits the temperature and the threshold of a trained run on a
small labelled sample from a new site (thresholds do not carry over between
hospitals; see torchxrayvision issue #175) and writes a new run that records the
sample, so that evaluation can leave those images out.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..data.splits import scan, select_split, unique_images
from ..errors import DataError
from ..inference.predictor import Predictor
from ..metrics.operating_point import fit_point_with_metrics
from ..models.checkpoint import save_derived_run
from ..models.description import RunDescription
from ..outputs import check_output_dir

logger = logging.getLogger(__name__)

MIN_PER_CLASS = 10


SITE_WEIGHT = 10.0  # one labelled site image counts as this many training images when the head is refitted
REFIT_FOLDS = 5


def refit_head(
    model,
    site_features: np.ndarray,
    site_y: np.ndarray,
    *,
    site_weight: float = SITE_WEIGHT,
    steps: int = 150,
    lr: float = 1e-3,
    seed: int = 0,
):
    """A copy of the head trained on the run's labelled training sample plus a few labelled site images.

    Starts from the trained head; ``steps`` full-batch steps of the one head fit (:func:`fit_head`: Adam on
    class-balanced BCE, or cross-entropy over K classes) in which each site image weighs ``site_weight`` training
    images. Site features go through the run's feature adapter first, so the head sees them as at inference.
    """
    import copy

    import torch

    from ..runtime import seeded_rng
    from ..training.head import class_weights, fit_head

    k = max(2, model.n_outputs)
    site_y = np.asarray(site_y).astype(int)
    with seeded_rng(seed):  # dropout's masks come from `seed`; the caller's RNG is left as it was
        head = copy.deepcopy(model.head)
        ref_x, ref_y = model.adapter.ref_sample, model.adapter.ref_labels.long()
        x = torch.cat([ref_x, model.adapted(torch.as_tensor(site_features, dtype=torch.float32))])
        w_ref = torch.as_tensor(class_weights(ref_y.numpy(), k), dtype=torch.float32)[ref_y]
        w_site = site_weight * torch.as_tensor(class_weights(site_y, k), dtype=torch.float32)[torch.as_tensor(site_y)]
        y = np.concatenate([ref_y.numpy(), site_y])
        fit_head(
            head, x.detach(), y, sample_weight=torch.cat([w_ref, w_site]), epochs=steps, batch_size=len(y), lr=lr, seed=seed, progress=False
        )
    return head.eval()


def cross_fitted_logits(model, features: np.ndarray, y: np.ndarray, groups: list[str], *, seed: int = 0) -> np.ndarray:
    """Out-of-fold logits ((n,) or (n, K)) of refitted heads: each site image is scored by a head that never saw its
    patient, so the temperature and threshold fitted on them are not fitted on the head's own training data."""
    import torch
    from sklearn.model_selection import StratifiedGroupKFold

    from ..training.head import head_logits

    folds = StratifiedGroupKFold(n_splits=min(REFIT_FOLDS, int(np.bincount(y).min())), shuffle=True, random_state=seed)
    out = np.zeros((len(y), model.n_outputs) if model.n_outputs > 1 else len(y))
    for fit, held in folds.split(features, y, groups):
        head = refit_head(model, features[fit], y[fit], seed=seed)
        with torch.no_grad():  # the site's features as the head sees them: through the run's adapter
            out[held] = head_logits(head, model.adapted(torch.as_tensor(features[held], dtype=torch.float32)))
    return out


def calibrate_run(
    run: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    split: str = "val",
    policy: str = "youden",
    target: float | None = None,
    refit: bool = False,
    overwrite: bool = False,
    cache_dir=None,
    progress: bool = True,
) -> tuple[Path, RunDescription]:
    """The ``pneumoscope calibrate`` command: a new run with a site-fitted temperature and threshold,
    and with ``refit`` a head refitted on the labelled site images beside the training sample.
    Returns the new run's folder and description."""
    check_output_dir(out, overwrite)
    predictor = _calibratable(run, refit=refit)
    scanned, feats, z = _labelled_sample(predictor, data, split, cache_dir=cache_dir, progress=progress)
    kept = feats.records
    y = np.array([r.label for r in kept])
    model = predictor.model
    groups = [r.patient_id for r in kept]
    if refit:
        z = cross_fitted_logits(model, feats.features, y, groups)
        model.head = refit_head(model, feats.features, y)
    fitted_on = f"a local calibration sample ({data})"
    kw = {"groups": groups, "seed": 0, "class_names": predictor.class_names, "normal_index": predictor.normal_index}
    point, metrics = fit_point_with_metrics(z, y, policy, target, fitted_on=fitted_on, **kw)
    description = replace(
        predictor.description,
        source=f"{out} (derived from {run})",  # a value fitted here that breaks a rule is named as the new run's
        temperature=point.temperature,
        threshold=point.threshold,
        threshold_policy=point.description,
        calibration={
            "method": _method(refit),
            "data": str(Path(data).absolute()),
            "split": split,
            "n": int(len(y)),
            "n_positive": int((y != predictor.normal_index).sum() if predictor.multiclass else y.sum()),
            **({"n_per_class": _per_class(predictor.class_names, y)} if predictor.multiclass else {}),
            "date": time.strftime("%Y-%m-%d"),
            "previous_threshold": predictor.threshold,
            "previous_temperature": predictor.temperature,
            "image_sha256": sorted(r.content_hash for r in kept),
            "metrics_on_sample": metrics,
            "skipped": len(scanned.problems) + len(feats.problems),
        },
    )
    save_derived_run(run, out, model, description, overwrite=overwrite)
    logger.debug(
        "calibrated on %d images: temperature %.3f, threshold %.4f (was %.4f)",
        len(y),
        point.temperature,
        point.threshold,
        predictor.threshold,
    )
    return Path(out), description


def _calibratable(run: str | os.PathLike, *, refit: bool) -> Predictor:
    """The run's predictor; with ``refit``, refused when the run keeps no training sample to refit the head beside."""
    predictor = Predictor.from_checkpoint(run)
    if refit and predictor.model.adapter is None:
        raise DataError(f"{run}: refitting the head needs the training sample that runs of this version keep. Fix: train the run again.")
    return predictor


def _labelled_sample(predictor: Predictor, data: str | os.PathLike, split: str, *, cache_dir, progress: bool):
    """(the scanned distinct images of ``split``, their features, their logits); refused with fewer than
    ``MIN_PER_CLASS`` images of any class."""
    dataset = predictor.load_labelled(data)
    scanned = scan(dataset.subset(select_split(dataset, split)), check_decode=False, progress=progress)
    scanned = unique_images(scanned, labelled=True)  # copies would weigh as many images; one image under both labels is refused
    feats, z = predictor.dataset_logits(scanned, cache_dir=cache_dir, progress=progress)
    names = predictor.class_names
    counts = np.bincount(np.array([r.label for r in feats.records], dtype=int), minlength=len(names))
    if counts.min() < MIN_PER_CLASS:
        raise DataError(
            f"{data}: calibration needs at least {MIN_PER_CLASS} distinct images of each class, got "
            f"{', '.join(f'{c} {n}' for c, n in zip(names, counts.tolist(), strict=True))}. Fix: label more local images."
        )
    return scanned, feats, z


def _per_class(names, y) -> dict[str, int]:
    """Images of each class, by name."""
    return dict(zip(names, np.bincount(y, minlength=len(names)).tolist(), strict=True))


def _method(refit: bool) -> str:
    """What the calibration fitted, in words."""
    if not refit:
        return "temperature and threshold"
    return (
        f"head refitted on the training sample plus these images (each weighing {SITE_WEIGHT:g}); temperature and threshold on "
        f"{REFIT_FOLDS}-fold patient-grouped out-of-fold logits"
    )
