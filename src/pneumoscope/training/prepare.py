"""train's data: records split by patient (or by the source), scanned and checked for leakage; an N-class run's normal class."""

from __future__ import annotations

import logging
import os

from ..data.layouts import load_dataset
from ..data.records import Dataset, Record
from ..data.splits import check_leakage, limit_per_split, refuse_label_conflicts, scan, split_by_patient
from ..errors import DataError, UsageError
from .config import TrainConfig

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


def prepare_data(data: str | os.PathLike, config: TrainConfig, *, progress: bool) -> tuple[Dataset, dict]:
    """Load, split by patient, scan (content hashes) and check for leakage: (dataset, leakage report)."""
    dataset = load_dataset(data, classes=config.classes, labels=config.labels)
    if len(dataset.class_names) > 2:
        normal_class(dataset.class_names, config)  # refused before any work when it is not one of the classes
    records = prepare_records(dataset, config)
    dataset = scan(dataset.subset(records), check_decode=False, progress=progress)
    refuse_label_conflicts(dataset)
    leakage = check_leakage(dataset.records, display=dataset.display, class_names=dataset.class_names)
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
