"""A run meets a new site: measure the shift, adapt to the site's unlabelled images.

``assess_site`` compares a site's images with the training split (set-level tests,
prevalence estimate, verdict); ``adapt_run`` fits what can be fitted without labels and
writes a new run that records the images it used (by content hash) and the method.
No label is ever read from the site's folder names.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..choices import ADAPT_METHODS, MULTICLASS_ADAPT_METHOD
from ..data.layouts import load_unlabelled
from ..data.records import Dataset, Record
from ..data.splits import scan, unique_images
from ..errors import DataError, UsageError
from ..inference.predictor import Predictor
from ..metrics.classification import logit, sigmoid
from ..models.checkpoint import save_derived_run
from ..models.description import RunDescription
from ..models.features import extract_features
from .assess import ShiftReport, assess_site
from .shift import MIN_SITE_IMAGES, class_prior_offsets, prior_shift_offset, screening_offset

logger = logging.getLogger(__name__)


@dataclass
class SiteFeatures:
    """A site's unlabelled images: the dataset, the records that decoded, their pooled features and the skipped files."""

    dataset: Dataset
    records: list[Record]
    features: np.ndarray  # (N, C) raw pooled backbone features
    problems: list[tuple[str, str]]


def read_site(predictor: Predictor, site: str | os.PathLike, *, cache_dir=None, progress: bool = True) -> SiteFeatures:
    """Pooled backbone features of every image under ``site`` (labels, if any, ignored)."""
    dataset = scan(load_unlabelled(site), check_decode=False, progress=progress)
    dataset = unique_images(dataset, labelled=False)  # copies would weigh as many images
    feats = extract_features(predictor.model, dataset, cache_dir=cache_dir, progress=progress)
    if len(feats.records) < MIN_SITE_IMAGES:
        raise DataError(
            f"{site}: {len(feats.records)} distinct readable images; judging or adapting to a site needs at least {MIN_SITE_IMAGES} "
            "(a few hundred are better). Fix: add more of the site's images."
        )
    return SiteFeatures(dataset, feats.records, feats.features, dataset.problems + feats.problems)


def _require_adapter(predictor: Predictor, run) -> None:
    if predictor.model.adapter is None:
        raise DataError(
            f"{run}: this run was trained before site adaptation existed and holds no training feature statistics. "
            "Fix: train it again with this version of pneumoscope."
        )


def shift_report(run: str | os.PathLike, site: str | os.PathLike, *, cache_dir=None, progress: bool = True, seed: int = 0) -> ShiftReport:
    """The ``pneumoscope shift`` command: how a site's images differ from the run's training split."""
    predictor = Predictor.from_checkpoint(run)
    _require_adapter(predictor, run)
    site_feats = read_site(predictor, site, cache_dir=cache_dir, progress=progress)
    report = assess_site(predictor, site_feats.features, seed=seed)
    report.update(run=str(run), site=str(site), skipped=len(site_feats.problems))
    return report


def adapt_run(
    run: str | os.PathLike,
    site: str | os.PathLike,
    out: str | os.PathLike,
    *,
    method: str | None = None,
    overwrite: bool = False,
    cache_dir=None,
    progress: bool = True,
    seed: int = 0,
) -> tuple[Path, RunDescription]:
    """The ``pneumoscope adapt`` command: a new run adapted to a site's unlabelled images;
    returns its folder and description.

    ``center``: the site's pooled features are shifted so that their mean is the training
    split's, per feature (the head, the OOD guard and the threshold then see site images
    as they saw training ones); ``standardize`` also maps each feature's sd (sds estimated
    from a small site sample cost some AUC, means alone do not; BENCHMARKS.md). ``+prior`` then moves
    the probabilities to the site's estimated prevalence (a Gaussian mixture on the
    adapted logits), folded into the head's bias; the threshold moves with them, so the
    decisions stay those of the validation threshold. N classes: see :func:`_fold_class_prior_shift`; ``method``
    None is ``center+prior`` for two classes, ``center`` for N (BENCHMARKS.md).
    """
    from ..outputs import check_output_dir

    if method is not None and method not in ADAPT_METHODS:
        raise UsageError(f"adaptation method must be one of {list(ADAPT_METHODS)}, got {method!r}")
    check_output_dir(out, overwrite)
    predictor, method = _adaptable(run, method)
    model = predictor.model
    site_feats = read_site(predictor, site, cache_dir=cache_dir, progress=progress)
    before = assess_site(predictor, site_feats.features, seed=seed, n_perm=200)

    model.adapter.fit_site(site_feats.features, shrink=1.0 if method.startswith("standardize") else 0.0)
    ood = _widen_guard(predictor, model.adapter.apply_np(site_feats.features))
    after = assess_site(predictor, site_feats.features, seed=seed, n_perm=200)
    threshold, offset = predictor.threshold, 0.0
    if method.endswith("+prior"):
        threshold, offset = _fold_prior_shift(predictor, after)
    description = replace(
        predictor.description,
        source=f"{out} (derived from {run})",  # a value fitted here that breaks a rule is named as the new run's
        threshold=threshold,
        threshold_policy=f"{predictor.description.threshold_policy}; carried to the site by unlabelled adaptation ({method})",
        ood=ood,
        adaptation=_adaptation_entry(method, site, site_feats, before, after, offset=offset, previous_threshold=predictor.threshold),
    )
    save_derived_run(run, out, model, description, overwrite=overwrite)
    logger.debug(
        "adapted to %d site images (%s): domain AUC %.3f -> %.3f, estimated prevalence %.3f, threshold %.4f (was %.4f)",
        len(site_feats.records),
        method,
        before["domain_auc"],
        after["domain_auc"],
        _estimated_prevalence(after),
        threshold,
        predictor.threshold,
    )
    return Path(out), description


def _adaptable(run: str | os.PathLike, method: str | None) -> tuple[Predictor, str]:
    """(the run's predictor, the method: ``method`` or the task's default); refused when the run keeps no training
    feature statistics or is already adapted."""
    predictor = Predictor.from_checkpoint(run)
    _require_adapter(predictor, run)
    if method is None:  # the prior shift too for two classes, the features only for N (BENCHMARKS.md)
        method = MULTICLASS_ADAPT_METHOD if predictor.multiclass else ADAPT_METHODS[0]
    done = predictor.description.adaptation
    if done:
        # its head's bias already carries a prior offset and its threshold moved with it: a second
        # adaptation would add another on top (probabilities shifted twice), not replace it
        raise DataError(
            f"{run}: this run is already adapted ({done.get('method')}, to {done.get('data')}). "
            "Fix: adapt the run it was adapted from, which the new run then replaces."
        )
    return predictor, method


def _widen_guard(predictor: Predictor, adapted: np.ndarray):
    """The OOD guard's cut-off widened, where needed, to admit the site's adapted features; returns the description's
    ``ood`` entry (unchanged without a guard)."""
    model, ood = predictor.model, predictor.description.ood
    if model.ood is None:
        return ood
    # the guard now sees adapted features; its cut-off admits the site's own 99% (never tighter than validation's)
    site_cut = float(np.quantile(model.ood.distance_np(adapted), 0.99))
    model.ood.cutoff.fill_(max(float(model.ood.cutoff), site_cut))
    return replace(
        ood,
        cutoff=float(model.ood.cutoff),
        cutoff_rule=f"{ood.cutoff_rule or ''}; after adaptation, at least the 0.99 quantile of the site's adapted distances",
    )


def _fold_prior_shift(predictor: Predictor, after: dict) -> tuple[float, float | list[float]]:
    """Move the probabilities to the site's estimated prevalence through the head's bias: (the moved threshold, the logit
    offset; for N classes one offset a class)."""
    if predictor.multiclass:
        return _fold_class_prior_shift(predictor, after)
    offset = prior_shift_offset(after["prevalence"]["mixture"], after["validation_prevalence"])
    # fold the offset into the head's bias, so every backend (ONNX included) computes it:
    # sigmoid((z + offset * T) / T) = sigmoid(z / T + offset); the threshold moves with it
    with torch.no_grad():
        predictor.model.head.fc2.bias += offset * predictor.temperature
    return float(sigmoid(logit(predictor.threshold) + offset)), offset


def _fold_class_prior_shift(predictor: Predictor, after: dict) -> tuple[float, list[float]]:
    """N classes: each class's logit moved by log(site prior / validation prior) (the EM estimate), folded into the
    head's biases; the screening threshold moved by the odds of "not normal" to "normal" that the same priors give,
    so a screening decision at the site's priors stays the validation operating point's."""
    priors = after["class_priors"]
    if priors["em"] is None:
        raise DataError(
            "the run's validation split has no image of some class, so the site's class priors cannot be estimated. "
            "Fix: --method center (the features only), or train the run again with images of every class in validation."
        )
    offsets = class_prior_offsets(priors["em"], priors["validation"])
    with torch.no_grad():
        predictor.model.head.fc2.bias += torch.as_tensor(offsets * predictor.temperature, dtype=predictor.model.head.fc2.bias.dtype)
    normal = priors["classes"].index(priors["normal"])
    moved = logit(predictor.threshold) + screening_offset(priors["em"], priors["validation"], normal)
    return float(sigmoid(moved)), offsets.tolist()


def _adaptation_entry(
    method: str, site, site_feats: SiteFeatures, before: dict, after: dict, *, offset: float, previous_threshold: float
) -> dict:
    """The description's ``adaptation`` entry: the method, the images (by content hash), the shift before and after."""
    return {
        "method": method,
        "data": str(Path(site).absolute()),
        "n": len(site_feats.records),
        "date": time.strftime("%Y-%m-%d"),
        "labels_used": False,
        "estimated_prevalence": _estimated_prevalence(after),
        **(
            {"estimated_class_priors": dict(zip(after["class_priors"]["classes"], after["class_priors"]["em"], strict=True))}
            if after.get("class_priors", {}).get("em") is not None
            else {}
        ),
        "prior_logit_offset": offset,
        "previous_threshold": previous_threshold,
        "shift_before": _brief(before),
        "shift_after": _brief(after),
        "image_sha256": sorted(r.content_hash for r in site_feats.records),
        "skipped": len(site_feats.problems),
    }


def _estimated_prevalence(report: dict) -> float:
    """The share of the site's images that are not normal: the mixture estimate (two classes) or 1 - the EM prior of
    the normal class (N classes)."""
    priors = report.get("class_priors")
    if priors is None or priors["em"] is None:
        return report["prevalence"]["mixture"]
    return 1.0 - priors["em"][priors["classes"].index(priors["normal"])]


def _brief(report: dict) -> dict:
    return {
        "mmd_p_value": report["mmd"]["p_value"],
        "domain_auc": report["domain_auc"],
        "prevalence": report["prevalence"],
        "ood_fraction": report["ood_fraction"],
    }
