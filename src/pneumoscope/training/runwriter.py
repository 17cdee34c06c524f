"""A training run's folder written: checkpoint and description, metrics, histories and figures, splits.csv, data summary."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np

from ..data.records import Dataset, Record
from ..data.splits import summarize
from ..metrics.operating_point import OperatingPoint
from ..models.checkpoint import RunFolder, describe, save_checkpoint
from ..models.features import FeatureResult
from ..outputs import atomic_output_dir, write_csv, write_json
from ..plots import plot_history, plot_image_grid
from .config import TrainConfig
from .head import FitSplit
from .prepare import normal_class


@dataclasses.dataclass
class Trained:
    """What the training stages produced, for the run folder."""

    feats: FeatureResult  # the train and val features of the final backbone
    head_fit: tuple[list[dict], int]  # (history, best epoch) of the head
    finetuned: tuple[list[dict], dict]  # (history, facts) of stage 2; ([], {}) without it
    point: OperatingPoint
    val_metrics: dict
    tracked: dict | None  # the MLflow run, with --logger mlflow


def write_run(
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
    trained: Trained,
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
    trained: Trained,
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


def _write_histories(run: RunFolder, config: TrainConfig, trained: Trained) -> None:
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


def _sample_grid(dataset: Dataset, records: list[Record], path: Path, *, seed: int, n: int = 8) -> None:
    rng = np.random.default_rng(seed)
    picks = []
    k = len(dataset.class_names)
    for label in range(k):  # n images a class for two classes (as always), 4 a class beyond
        rows = [r for r in records if r.label == label and r.split == "train"]
        picks += [rows[i] for i in rng.permutation(len(rows))[: n // 2 if k == 2 else 4]]
    images = [dataset.reader.read_image(r.ref, draft_size=256) for r in picks]
    plot_image_grid(images, [f"{dataset.class_names[r.label]}\n{r.patient_id}" for r in picks], path)
