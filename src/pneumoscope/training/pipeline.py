"""Train the notebook's frozen-backbone model, fast: cache features once, fit the head.

``fit_head`` is the training loop (read it top to bottom); ``train_run`` is the
whole command, one function per phase, in order: claim the output folder (``workdir``) ->
prepare data (split, scan, leakage: ``prepare``) -> extract features -> fit the head -> [fine-tune]
-> fit the operating point -> fit the adapter reference and OOD guard -> write the run (``runwriter``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..data.records import Dataset, Record
from ..errors import DataError, StateError
from ..metrics.intervals import mean_sd
from ..metrics.operating_point import OperatingPoint, fit_point_with_metrics
from ..models.checkpoint import RunFolder
from ..models.classifier import FeatureAdapter, MahalanobisGuard, create_model
from ..models.features import FeatureResult, extract_features
from ..outputs import write_json
from ..runtime import is_launched_rank
from .config import TrainConfig
from .head import FitSplit, fit_crossfitted_heads, fit_model_head, head_logits, usable_folds
from .prepare import normal_class, prepare_data
from .runwriter import Trained, write_run
from .tracking import check_logger, describe_logs, log_training_run, training_loggers
from .workdir import claim_output, work_dir_for

logger = logging.getLogger(__name__)


def train_run(
    data: str | os.PathLike,
    out: str | os.PathLike,
    config: TrainConfig,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> Path | None:
    """The ``pneumoscope train`` command. Returns the run folder (None in non-zero distributed ranks)."""
    check_logger(config.logger)  # a missing package fails before any work
    work = work_dir_for(out)
    claim_output(out, work, config, overwrite=overwrite, resume=resume)
    t0 = time.perf_counter()
    dataset, leakage = prepare_data(data, config, progress=progress)
    model, feats, fit_split, problems = _extract_features(data, dataset, config, progress=progress)
    t_feat = time.perf_counter() - t0

    resolved = {**asdict(config), "data": str(Path(data).absolute())}
    trained = _train(model, dataset, feats, fit_split, config, work, out=out, resolved=resolved, resume=resume, progress=progress)
    if trained is None:
        return None  # a launched rank: rank 0 writes the run
    ood = _fit_reference_and_guard(model, trained.feats, fit_split, config)
    write_run(
        out,
        work,
        model,
        dataset,
        config,
        resolved=resolved,
        leakage=leakage,
        fit_split=fit_split,
        problems=problems,
        trained=trained,
        ood=ood,
        overwrite=overwrite,
    )
    if trained.tracked:  # the run folder is complete: its files and its model go to the MLflow run
        log_training_run(out, trained.tracked)
    logger.info(
        "features %.1f s, total %.1f s", t_feat, time.perf_counter() - t0
    )  # where the run went: the caller says (the CLI prints it)
    if config.logger != "csv":
        logger.info("training logs: %s", describe_logs(config.logger, RunFolder(out).logs))
    if problems:
        logger.warning("%d images were skipped; see %s", len(problems), RunFolder(out).skipped)
    return Path(out)


def _train(
    model,
    dataset: Dataset,
    feats: FeatureResult,
    fit_split: FitSplit,
    config: TrainConfig,
    work: Path,
    *,
    out: str | os.PathLike,
    resolved: dict,
    resume: bool,
    progress: bool,
) -> Trained | None:
    """The head (cross-fitted where the folds allow), then [fine-tuning and features again], then the operating point,
    logged to the training loggers; None in a launched rank."""
    settings = {**resolved, "out": str(Path(out).absolute())}
    with training_loggers(
        config.logger, work / "logs", run_name=Path(out).name, final_dir=RunFolder(out).logs, enabled=not is_launched_rank()
    ) as logs:
        logs.log_hyperparams(settings)
        x, (y, tr, va) = feats.features, fit_split
        folds = usable_folds(feats, fit_split, config)  # once: it warns when a class has too few patients
        if folds > 1:
            history, best_epoch = fit_crossfitted_heads(
                model, feats, fit_split, dataclasses.replace(config, head_folds=folds), progress=progress, loggers=logs.head
            )
        else:
            history, best_epoch = fit_model_head(model, x[tr], y[tr], x[va], y[va], config, progress=progress, loggers=logs.head)
        finetuned: tuple[list[dict], dict] | None = ([], {})  # (history, facts) of stage 2
        if config.finetune.epochs:
            finetuned = _finetune_stage(model, dataset, feats.records, config, work, resume=resume, progress=progress, loggers=logs.extra)
            if finetuned is None:
                return None  # a launched rank: rank 0 writes the run
        if config.finetune.epochs:  # the backbone changed: its features (and so temperature, threshold and OOD statistics) are recomputed
            feats = _features(model, dataset, feats.records, config, progress=progress)
        point, val_metrics = _fit_operating_point(model, feats, fit_split, config)
        logs.log_summary(settings, _final_metrics((history, best_epoch), finetuned[1], point, val_metrics))
        tracked = logs.mlflow_run()
    return Trained(feats, (history, best_epoch), finetuned, point, val_metrics, tracked)


def _extract_features(data: str | os.PathLike, dataset: Dataset, config: TrainConfig, *, progress: bool):
    """Create the model and extract (cached) features of the train and val images: (model, features, fit split, skipped images)."""
    torch.manual_seed(config.seed)  # the head's initial weights
    model = create_model(
        config.backbone,
        pretrained=config.pretrained,
        weights=config.weights,
        hidden=config.hidden,
        dropout=config.dropout,
        class_names=dataset.class_names,
    )
    feats = _features(model, dataset, [r for r in dataset.records if r.split in ("train", "val")], config, progress=progress)
    problems = list(dataset.problems) + feats.problems
    split = np.array([r.split for r in feats.records])
    y = np.array([r.label for r in feats.records])
    tr, va = split == "train", split == "val"
    if not va.any() or len(np.unique(y[va])) < 2:
        raise DataError(
            f"{data}: the validation split has {int(va.sum())} images and needs two classes or more; use more data or a larger "
            "--val-fraction."
        )
    return model, feats, FitSplit(y, tr, va), problems


def _features(model, dataset: Dataset, records: list[Record], config: TrainConfig, *, progress: bool) -> FeatureResult:
    """Pooled backbone features of ``records`` through the feature cache."""
    return extract_features(
        model,
        dataset,
        records,
        cache_dir=config.cache_dir,
        batch_size=config.feature_batch_size,
        num_workers=config.num_workers,
        progress=progress,
    )


def _fit_operating_point(model, feats: FeatureResult, fit_split: FitSplit, config: TrainConfig) -> tuple[OperatingPoint, dict]:
    """Temperature and threshold on the validation split: (operating point, validation metrics)."""
    y, va = fit_split.y, fit_split.val
    fitted_on = "validation data (the patient-level validation split)"
    oof = getattr(model, "oof_logits_", None)
    if oof is not None:  # cross-fitted heads: every train and validation image, each scored by the head that did not see it
        va = fit_split.train | fit_split.val
        fitted_on = f"out-of-fold logits of all {int(va.sum())} train and validation images ({model.oof_folds_} cross-fitted heads)"
        val_logits = oof[va]
    else:
        val_logits = head_logits(model.head, feats.features[va])
    val_groups = [r.patient_id for r, v in zip(feats.records, va, strict=True) if v]
    normal = None if model.n_outputs == 1 else model.class_names.index(normal_class(model.class_names, config))
    point, val_metrics = fit_point_with_metrics(
        val_logits,
        y[va],
        config.threshold_policy,
        config.threshold_target,
        fitted_on=fitted_on,
        groups=val_groups,
        seed=config.seed,
        class_names=model.class_names,
        normal_index=normal,
        multiclass_n_boot=1000,
    )
    if normal is not None:
        logger.info(
            "val: macro AUC %.4f, top-1 accuracy %.4f over %s",
            val_metrics["multiclass"]["macro_auc"] or float("nan"),
            val_metrics["multiclass"]["accuracy"],
            ", ".join(model.class_names),
        )
    return point, _log_point(point, val_metrics)


def _log_point(point: OperatingPoint, val_metrics: dict) -> dict:
    """Say the operating point (the screening one, for N classes); return the metrics."""
    logger.info(
        "val: AUC %.4f, temperature %.3f, threshold %.4f (%s)",
        val_metrics["roc_auc"],
        point.temperature,
        point.threshold,
        point.description,
    )
    return val_metrics


def _final_metrics(head_fit: tuple[list[dict], int], finetune_facts: dict, point: OperatingPoint, val_metrics: dict) -> dict[str, float]:
    """What the training loggers get at the end, beside the settings: validation at the chosen operating point and the best epochs."""
    history, best_epoch = head_fit
    out = {f"val/{k}": val_metrics.get(k) for k in ("roc_auc", "sensitivity", "specificity", "accuracy", "balanced_accuracy")}
    out |= {
        "val/threshold": point.threshold,
        "val/temperature": point.temperature,
        "head/best_epoch": best_epoch,
        "head/best_val_loss": history[best_epoch - 1]["val_loss"],
        "finetune/best_val_auc": finetune_facts.get("best_val_auc"),
    }
    return {k: float(v) for k, v in out.items() if v is not None}


def _fit_reference_and_guard(model, feats: FeatureResult, fit_split: FitSplit, config: TrainConfig) -> dict:
    """The feature adapter's training reference and the OOD guard, set on ``model``; returns the guard's description."""
    tr, va = fit_split.train, fit_split.val
    model.adapter = FeatureAdapter.reference(feats.features[tr], fit_split.y[tr], seed=config.seed)  # identity; `adapt` fits it to a site
    model.ood = MahalanobisGuard.fit(feats.features[tr], feats.features[va], quantile=config.ood_quantile)
    return {
        "method": "mahalanobis distance of pooled backbone features (Ledoit-Wolf covariance of the training split)",
        "cutoff": float(model.ood.cutoff),
        "cutoff_rule": f"{config.ood_quantile:g} quantile of the validation split's distances",
    }


def _finetune_stage(
    model, dataset, records, config: TrainConfig, work: Path, *, resume: bool, progress: bool, loggers: Sequence = ()
) -> tuple[list[dict], dict] | None:
    """Stage 2 on cached uint8 images; returns (history, facts about the fit), or None in a launched rank."""
    from ..data.augment import Augment, resolve_augment
    from ..data.imagecache import build_image_array
    from ..data.paths import default_cache_dir
    from .finetune import ArrayDataset, finetune

    arr = build_image_array(
        dataset,
        records,
        model.preprocessing,
        config.cache_dir or default_cache_dir(),
        num_workers=max(1, config.num_workers),
        progress=progress,
    )
    if len(arr.records) != len(records):
        raise StateError("an image that decoded for features did not decode for fine-tuning; clear the cache and retry")
    split = np.array([r.split for r in arr.records])
    y = np.array([r.label for r in arr.records])
    tr, va = np.flatnonzero(split == "train"), np.flatnonzero(split == "val")
    aug = resolve_augment(config.finetune.augment)
    augment = Augment(aug) if aug is not None else None
    train_set = ArrayDataset(_Rows(arr.images, tr), y[tr], model.preprocessing, augment, seed=config.seed)
    val_set = ArrayDataset(_Rows(arr.images, va), y[va], model.preprocessing, None)
    history, facts = finetune(
        model,
        train_set,
        val_set,
        config.finetune,
        work,
        seed=config.seed,
        num_workers=config.num_workers,
        resume=resume,
        progress=progress,
        loggers=loggers,
    )
    if facts is None:
        return None
    return history, {**facts, "augmentation": aug.to_dict() if aug is not None else None}


class _Rows:
    """A view of selected rows of a (memory-mapped) array, without copying them."""

    def __init__(self, array: np.ndarray, rows: np.ndarray):
        self.array, self.rows = array, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.array[self.rows[i]]


def train_seeds(
    data: str | os.PathLike,
    out: str | os.PathLike,
    config: TrainConfig,
    seeds: list[int],
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> dict | None:
    """One run per seed in ``out/seed-N``; ``out/seeds.json`` holds mean and sd of the validation metrics."""
    out = Path(out)
    metrics = []
    for seed in seeds:
        run = train_run(
            data, out / f"seed-{seed}", dataclasses.replace(config, seed=seed), overwrite=overwrite, resume=resume, progress=progress
        )
        if run is None:
            return None  # a launched distributed rank
        metrics.append(json.loads((run / "metrics.json").read_text()))
    keys = ["roc_auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy"]
    summary = {"seeds": list(seeds), "val": {k: mean_sd([m[k] for m in metrics]) for k in keys}}
    write_json(out / "seeds.json", summary)
    return summary
