"""Train the notebook's frozen-backbone model, fast: cache features once, fit the head.

``fit_head`` is the training loop (read it top to bottom); ``train_run`` is the
whole command, one private function per phase, in order: claim the output folder ->
prepare data (split, scan, leakage) -> extract features -> fit the head -> [fine-tune]
-> fit the operating point -> fit the adapter reference and OOD guard -> write the run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..data.layouts import load_dataset
from ..data.records import Dataset, Record
from ..data.splits import check_leakage, limit_per_split, scan, split_by_patient, summarize
from ..errors import DataError, OutputExistsError, StateError, UsageError
from ..metrics.clinical import compute_clinical_metrics
from ..metrics.intervals import mean_sd
from ..metrics.multiclass import compute_multiclass_metrics, softmax
from ..metrics.operating_point import OperatingPoint, fit_operating_point, fit_screening_point
from ..models.checkpoint import RunFolder, describe, save_checkpoint
from ..models.classifier import FeatureAdapter, MahalanobisGuard, create_model
from ..models.features import FeatureResult, extract_features
from ..outputs import atomic_output_dir, check_output_dir, write_csv, write_json
from ..plots import plot_history, plot_image_grid
from ..runtime import is_launched_rank
from .config import TrainConfig
from .head import FitSplit, fit_crossfitted_heads, fit_model_head, head_logits, usable_folds
from .tracking import check_logger, describe_logs, log_training_run, training_loggers

logger = logging.getLogger(__name__)


def prepare_records(dataset: Dataset, config: TrainConfig) -> list[Record]:
    """Train/val/test assignment: patient-level re-split, unless the source has its own (npz)."""
    if dataset.layout == "npz":
        records = dataset.records  # MedMNIST's own split; it carries no patient ids
    else:
        records = split_by_patient(dataset.records, val_fraction=config.val_fraction, seed=config.seed)
    if config.limit:
        records = limit_per_split(records, config.limit, seed=config.seed)
    for label, name in enumerate(dataset.class_names):
        if not any(r.label == label and r.split == "train" for r in records):
            raise DataError(
                f"{dataset.source}: no {name} images to train on. Fix: put {name} images in a {name}/ folder "
                "(under train/ for a Kaggle layout); training needs every class."
            )
    return records


def normal_class(class_names: tuple[str, ...], config: TrainConfig) -> str:
    """The class (as the data spells it) the screening decision of an N-class run is taken against."""
    match = [c for c in class_names if c.lower() == config.normal_class.lower()]
    if not match:
        raise UsageError(
            f"normal_class {config.normal_class!r} is not one of the classes {list(class_names)}: an N-class run ships a screening "
            "decision (normal vs not) against it. Fix: --normal-class NAME, naming the normal class"
        )
    return match[0]


def work_dir_for(out: str | os.PathLike) -> Path:
    """Where fine-tuning keeps its resumable state until the run is complete."""
    out = Path(out).absolute()
    return out.with_name(f".{out.name}.work")


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
    _claim_output(out, work, config, overwrite=overwrite, resume=resume)
    t0 = time.perf_counter()
    dataset, leakage = _prepare_data(data, config, progress=progress)
    model, feats, fit_split, problems = _extract_features(data, dataset, config, progress=progress)
    t_feat = time.perf_counter() - t0

    resolved = {**asdict(config), "data": str(Path(data).absolute())}
    trained = _train(model, dataset, feats, fit_split, config, work, out=out, resolved=resolved, resume=resume, progress=progress)
    if trained is None:
        return None  # a launched rank: rank 0 writes the run
    ood = _fit_reference_and_guard(model, trained.feats, fit_split, config)
    _write_run(
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


@dataclasses.dataclass
class _Trained:
    """What the training stages produced, for the run folder."""

    feats: FeatureResult  # the train and val features of the final backbone
    head_fit: tuple[list[dict], int]  # (history, best epoch) of the head
    finetuned: tuple[list[dict], dict]  # (history, facts) of stage 2; ([], {}) without it
    point: OperatingPoint
    val_metrics: dict
    tracked: dict | None  # the MLflow run, with --logger mlflow


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
) -> _Trained | None:
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
    return _Trained(feats, (history, best_epoch), finetuned, point, val_metrics, tracked)


OWNER_FILE = "owner.pid"  # in the work folder: the process fine-tuning into it


def _claim_output(out: str | os.PathLike, work: Path, config: TrainConfig, *, overwrite: bool, resume: bool) -> None:
    """Refuse an existing run or unfinished fine-tuning state unless told what to do with it; launched ranks touch nothing."""
    if is_launched_rank():
        return
    check_output_dir(out, overwrite)
    from ..outputs import process_alive
    from .resume import EARLIER_LOG, resume_checkpoint

    owner = work / OWNER_FILE
    recorded = owner.read_text().strip() if owner.is_file() else ""
    pid = int(recorded) if recorded.isdigit() else None
    if pid is not None and pid != os.getpid() and process_alive(pid):
        raise OutputExistsError(
            f"{work} is in use by a train that is still running (process {pid}): wait for it, or choose another --out. "
            f"If no such train runs, delete {owner}."
        )
    if config.finetune.epochs and work.exists() and not resume:
        if not resume_checkpoint(work).is_file():  # killed before stage 2's first checkpoint: only logs, which every attempt rewrites
            logger.info("%s: an earlier attempt stopped before its first fine-tuning checkpoint; nothing to resume, starting afresh", work)
            overwrite = True
        if not overwrite:
            raise OutputExistsError(
                f"{work} holds a fine-tuning run that did not finish: pass --resume to continue it, or --overwrite to start over."
            )
        shutil.rmtree(work)
    # each attempt logs afresh: a resumed one fits stage 1 again, then stage 2 from its checkpoint; stage 2's CSV log
    # (and the rows of attempts before it) is kept for a resume, which carries the epochs before the kill into its own
    if (work / "logs").is_dir():
        for entry in (work / "logs").iterdir():
            if not (resume and entry.name in ("finetune", EARLIER_LOG)):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    work.mkdir(parents=True, exist_ok=True)
    owner.write_text(str(os.getpid()))


def _prepare_data(data: str | os.PathLike, config: TrainConfig, *, progress: bool) -> tuple[Dataset, dict]:
    """Load, split by patient, scan (content hashes) and check for leakage: (dataset, leakage report)."""
    dataset = load_dataset(data, classes=config.classes, labels=config.labels)
    if len(dataset.class_names) > 2:
        normal_class(dataset.class_names, config)  # refused before any work when it is not one of the classes
    records = prepare_records(dataset, config)
    dataset = scan(dataset.subset(records), check_decode=False, progress=progress)
    leakage = check_leakage(dataset.records, display=dataset.display)
    if leakage["patients_in_several_splits"] and dataset.has_patient_ids:
        raise RuntimeError(f"patient leakage between splits: {leakage['patients_in_several_splits'][:5]} (a bug; please report it)")
    if leakage["duplicates_across_splits"]:
        logger.warning(
            "%d images are identical (same bytes) across splits, e.g. %s; validation and test figures may be optimistic. "
            "Fix: remove the copies (`pneumoscope data inspect --json` lists them all)",
            len(leakage["duplicates_across_splits"]),
            leakage["duplicates_across_splits"][0],
        )
    return dataset, leakage


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
    if model.n_outputs == 1:
        point = fit_operating_point(val_logits, y[va], config.threshold_policy, config.threshold_target, fitted_on=fitted_on)
        return point, _log_point(
            point, compute_clinical_metrics(y[va], point.probabilities(val_logits), point.threshold, groups=val_groups, seed=config.seed)
        )
    normal = model.class_names.index(normal_class(model.class_names, config))
    point = fit_screening_point(val_logits, y[va], normal, config.threshold_policy, config.threshold_target, fitted_on=fitted_on)
    screen = point.probabilities(val_logits)
    val_metrics = compute_clinical_metrics((y[va] != normal).astype(int), screen, point.threshold, groups=val_groups, seed=config.seed)
    probs = softmax(val_logits, point.temperature)
    val_metrics["multiclass"] = compute_multiclass_metrics(
        y[va], probs, model.class_names, groups=val_groups, n_boot=1000, seed=config.seed
    )
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


def _write_run(
    out: str | os.PathLike,
    work: Path,
    model,
    dataset: Dataset,
    config: TrainConfig,
    *,
    resolved: dict,
    leakage: dict,
    fit_split: FitSplit,
    problems: list,
    trained: _Trained,
    ood: dict,
    overwrite: bool,
) -> None:
    """Checkpoint, description, histories, splits and figures into a staging folder renamed to ``out``; then drop the work folder."""
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        run = RunFolder(tmp)
        write_json(run.config, resolved)
        description = _describe_run(
            model, dataset, config, resolved=resolved, leakage=leakage, fit_split=fit_split, trained=trained, ood=ood
        )
        save_checkpoint(run.path, model, description)
        write_json(run.checkpoint_json, description.to_dict())
        write_json(run.metrics, trained.val_metrics)
        _write_histories(run, config, trained)
        if (work / "logs").is_dir():
            shutil.move(work / "logs", run.logs)  # closed by now: the loggers were finalized when training ended
        _write_splits(run, dataset, trained.feats)
        write_csv(run.skipped, ["path", "reason"], problems)
        summary = summarize(dataset)
        summary["leakage"] = leakage
        write_json(run.data_summary, summary)
        _sample_grid(dataset, trained.feats.records, run.samples, seed=config.seed)
    if work.exists():
        shutil.rmtree(work, ignore_errors=True)  # the run is complete: nothing left to resume


def _describe_run(
    model,
    dataset: Dataset,
    config: TrainConfig,
    *,
    resolved: dict,
    leakage: dict,
    fit_split: FitSplit,
    trained: _Trained,
    ood: dict,
):
    """The run's checked description: operating point, validation metrics, how it was trained, OOD guard, leakage."""
    history, best_epoch = trained.head_fit
    finetune_history, finetune_facts = trained.finetuned
    stage = "frozen backbone, head only"
    if config.finetune.epochs:
        stage = f"head on frozen features, then fine-tuned ({config.finetune.unfreeze} of the backbone, {len(finetune_history)} epochs)"
    point = trained.point
    return describe(
        model,
        normal_class=normal_class(model.class_names, config) if model.n_outputs > 1 else None,
        threshold=point.threshold,
        threshold_policy=point.description,
        temperature=point.temperature,
        metrics={"val": trained.val_metrics},
        training={
            "data": resolved["data"],
            "layout": dataset.layout,
            "best_epoch": best_epoch,
            "epochs_run": len(history),
            "n_train": int(fit_split.train.sum()),
            "n_val": int(fit_split.val.sum()),
            "seed": config.seed,
            **({"labels": config.labels} if config.labels != "folders" else {}),
            "stage": stage,
            **({"finetune": finetune_facts} if finetune_facts else {}),
            **({"mlflow": trained.tracked} if trained.tracked else {}),
        },
        ood=ood,
        leakage={
            "ok": leakage["ok"],
            "patients_in_several_splits": len(leakage["patients_in_several_splits"]),
            "duplicates_across_splits": len(leakage["duplicates_across_splits"]),
            "duplicate_examples": leakage["duplicates_across_splits"][:20],
        },
    )


def _write_histories(run: RunFolder, config: TrainConfig, trained: _Trained) -> None:
    """The head's history (CSV and figure) and stage 2's, where it ran."""
    history, best_epoch = trained.head_fit
    finetune_history = trained.finetuned[0]
    write_csv(run.history_csv, list(history[0]), [list(h.values()) for h in history])
    plot_history(
        history,
        run.history_png,
        best_epoch=best_epoch,
        title=f"Training history: {config.backbone} backbone, head on frozen features (seed {config.seed})",
    )
    if finetune_history:
        keys = ["epoch", "train_loss", "val_loss", "val_auc"]
        write_csv(run.finetune_history, keys, [[h.get(k) for k in keys] for h in finetune_history])


def _write_splits(run: RunFolder, dataset: Dataset, feats: FeatureResult) -> None:
    """splits.csv: every image's split, label, patient, hash, and whether training used it."""
    used = {id(r) for r in feats.records}
    write_csv(
        run.splits,
        ["path", "split", "label", "patient_id", "pneumonia_type", "sha256", "status"],
        [
            [
                dataset.display(r),
                r.split,
                dataset.class_names[r.label],
                r.patient_id,
                r.pneumonia_type,
                r.content_hash,
                "used" if (id(r) in used or r.split == "test") else "skipped",
            ]
            for r in dataset.records
        ],
    )


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


def _sample_grid(dataset: Dataset, records: list[Record], path: Path, *, seed: int, n: int = 8) -> None:
    rng = np.random.default_rng(seed)
    picks = []
    k = len(dataset.class_names)
    for label in range(k):  # n images a class for two classes (as always), 4 a class beyond
        rows = [r for r in records if r.label == label and r.split == "train"]
        picks += [rows[i] for i in rng.permutation(len(rows))[: n // 2 if k == 2 else 4]]
    images = [dataset.reader.read_image(r.ref, draft_size=256) for r in picks]
    plot_image_grid(images, [f"{dataset.class_names[r.label]}\n{r.patient_id}" for r in picks], path)


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
