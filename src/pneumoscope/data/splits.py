"""Check and split a dataset: hash and decode-check each image (scan), one record per image, split by patient, leakage, summary."""

from __future__ import annotations

import collections
import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TypedDict

import numpy as np

from ..errors import DataError, ImageReadError, UsageError
from ..runtime import progress_bar
from .decode import skip_detail
from .records import CLASS_NAMES, SPLIT_NAMES, Dataset, Record

logger = logging.getLogger(__name__)


def scan(dataset: Dataset, *, check_decode: bool = True, workers: int = 4, progress: bool = False) -> Dataset:
    """Hash every image (sha256 of its bytes) and, optionally, check that it decodes.

    Unreadable files are dropped from the returned dataset and listed in its
    ``problems`` with the reason; nothing raises for a single bad file.
    """

    def one(record: Record):
        try:
            data = dataset.reader.read_bytes(record.ref)
            if check_decode:
                dataset.reader.read_image(record.ref, data, draft_size=64)
        except (OSError, KeyError) as err:
            return record, None, f"cannot be read ({err})"
        except ImageReadError as err:  # undecodable, or a zip member over the bounds
            return record, None, skip_detail(err)
        return record, hashlib.sha256(data).hexdigest(), None

    kept, problems = [], list(dataset.problems)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(one, dataset.records)
        for record, digest, problem in progress_bar(results, total=len(dataset.records), desc="scan", unit="img", enabled=progress):
            if problem:
                problems.append((dataset.display(record), problem))
                logger.warning("skipping %s: %s", dataset.display(record), problem)
            else:
                kept.append(replace(record, content_hash=digest))
    out = dataset.subset(kept)
    out.problems = problems
    return out


def label_conflicts(records: list[Record]) -> list[list[Record]]:
    """Groups of records with the same bytes (:func:`scan`'s content hash) under more than one label."""
    by_hash: dict[str, list[Record]] = collections.defaultdict(list)
    for r in records:
        if r.content_hash:
            by_hash[r.content_hash].append(r)
    return [g for g in by_hash.values() if len({r.label for r in g}) > 1]


def refuse_label_conflicts(dataset: Dataset) -> None:
    """Refuse a labelled dataset that holds one image (the same bytes) under two labels: it cannot be both, and a
    model fitted or scored on it is taught or marked wrong by construction. ``data inspect --json`` lists them all."""
    conflicts = label_conflicts(dataset.records)
    if conflicts:
        first = {}  # the first record under each label, so that two labels are named
        for r in conflicts[0]:
            first.setdefault(r.label, r)
        example = " and ".join(f"{dataset.display(r)} ({dataset.class_names[r.label]})" for r in list(first.values())[:2])
        raise DataError(
            f"{dataset.source}: {len(conflicts)} images carry two labels (the same bytes under two classes), e.g. {example}. "
            "Fix: keep each image under its one true label (`pneumoscope data inspect --json` lists them all)"
        )


def unique_images(dataset: Dataset, *, labelled: bool) -> Dataset:
    """The dataset with one record per distinct image (the same bytes: :func:`scan`'s content hash), the first kept.

    Copies of one image weigh as many images where a site's prevalence, its feature statistics or a temperature are
    fitted (60 copies of one image were taken as a site of prevalence 1.0). With ``labelled``, one image under two
    labels is refused (:func:`refuse_label_conflicts`). The copies dropped are logged.
    """
    if labelled:
        refuse_label_conflicts(dataset)
    first: dict[str, Record] = {}
    for r in dataset.records:
        if r.content_hash:
            first.setdefault(r.content_hash, r)
    kept = [r for r in dataset.records if not r.content_hash or first[r.content_hash] is r]
    if len(kept) < len(dataset.records):
        logger.warning(
            "%s: %d of %d images are copies of others (the same bytes); each image is counted once",
            dataset.source,
            len(dataset.records) - len(kept),
            len(dataset.records),
        )
    return dataset.subset(kept)


def split_by_patient(records: list[Record], *, val_fraction: float = 0.1, seed: int = 0) -> list[Record]:
    """Assign train/val by patient, stratified by class; test rows stay test.

    The official 16-image ``val`` folder joins train first. Each patient's class
    is the highest label among their images (any pneumonia image -> pneumonia).
    """
    if not 0.0 < val_fraction < 1.0:
        raise UsageError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    pool = [r for r in records if r.split != "test"]
    patient_label: dict[str, int] = {}
    for r in pool:
        patient_label[r.patient_id] = max(patient_label.get(r.patient_id, 0), r.label)
    rng = np.random.default_rng(seed)
    val_patients: set[str] = set()
    for label in sorted(set(patient_label.values())):
        patients = sorted(p for p, y in patient_label.items() if y == label)
        n_val = int(round(val_fraction * len(patients)))
        n_val = min(max(n_val, 1), len(patients) - 1) if len(patients) >= 2 else 0
        val_patients.update(rng.permutation(patients)[:n_val].tolist())
    return [r if r.split == "test" else replace(r, split="val" if r.patient_id in val_patients else "train") for r in records]


def select_split(dataset: Dataset, split: str) -> list[Record]:
    """A Kaggle root or npz: the named split; a folder of class subfolders: all of it."""
    if dataset.layout == "class-folders":
        return dataset.records
    rows = [r for r in dataset.records if r.split == split]
    if not rows:
        have = sorted({r.split for r in dataset.records})
        raise DataError(f"{dataset.source}: no images in split {split!r}; it has {have}. Choose one with --split.")
    return rows


def limit_per_split(records: list[Record], limit: int, *, seed: int = 0) -> list[Record]:
    """Keep at most ``limit`` images per split, class-stratified and seeded (for quick runs)."""
    if limit < 2:
        raise UsageError(f"limit must be at least 2 (one image per class), got {limit!r}")
    rng = np.random.default_rng(seed)
    out = []
    for split in sorted({r.split for r in records}):
        rows = [r for r in records if r.split == split]
        if len(rows) <= limit:
            out.extend(rows)
            continue
        by_class = [[r for r in rows if r.label == c] for c in range(max(r.label for r in records) + 1)]
        quota = [int(round(limit * len(c) / len(rows))) for c in by_class]
        quota = [max(q, 1) if c else 0 for q, c in zip(quota, by_class, strict=True)]
        for rows_c, q in zip(by_class, quota, strict=True):
            idx = sorted(rng.permutation(len(rows_c))[:q].tolist())
            out.extend(rows_c[i] for i in idx)
    order = {id(r): i for i, r in enumerate(records)}
    return sorted(out, key=lambda r: order[id(r)])


def check_leakage(records: list[Record], *, display=str, class_names=None) -> dict:
    """Patients in more than one split, images whose bytes are identical, and those of them under two labels."""
    splits_of: dict[str, set[str]] = collections.defaultdict(set)
    for r in records:
        splits_of[r.patient_id].add(r.split)
    crossing = sorted(p for p, s in splits_of.items() if len(s) > 1)
    by_hash: dict[str, list[Record]] = collections.defaultdict(list)
    for r in records:
        if r.content_hash:
            by_hash[r.content_hash].append(r)
    groups = [g for g in by_hash.values() if len(g) > 1]
    cross_dupes = [g for g in groups if len({r.split for r in g}) > 1]
    return {
        "patients_in_several_splits": crossing,
        "duplicate_groups": len(groups),
        "duplicate_images": sum(len(g) for g in groups),
        "duplicates_across_splits": [[f"{r.split}:{display(r)}" for r in g] for g in cross_dupes],
        "label_conflicts": [
            [f"{class_names[r.label] if class_names else r.label}:{display(r)}" for r in g] for g in label_conflicts(records)
        ],
        "ok": not crossing and not cross_dupes,
    }


class _SplitCounts(TypedDict):
    images: int
    classes: dict[str, int]  # images per class
    patients: int | None  # None where the source has no patient ids
    max_images_per_patient: int | None


class SplitCounts(_SplitCounts, total=False):
    """One split's counts: the default task adds its pneumonia types and positive share, other tasks patients per class."""

    pneumonia_types: dict[str, int]
    positive_fraction: float | None
    patients_per_class: dict[str, int]


class _SummaryFigures(TypedDict):
    source: str
    layout: str
    images: int
    splits: dict[str, SplitCounts]
    patient_id_from_file_stem: int | None  # images whose patient id is the whole file stem (no pattern matched)
    leakage: dict  # check_leakage's report
    unreadable: list[dict[str, str]]  # {"path", "reason"}
    ignored_files: list


class DatasetSummary(_SummaryFigures, total=False):
    """What ``data inspect`` prints (:func:`summarize`): counts per split and class, patients, leakage, problems."""

    classes: list[str]  # a task other than NORMAL / PNEUMONIA


def summarize(dataset: Dataset) -> DatasetSummary:
    """Counts per split and class, patients, class balance, leakage, problems."""
    records = dataset.records
    splits = {}
    for split in sorted({r.split for r in records}, key=lambda s: (SPLIT_NAMES + ("all",)).index(s)):
        rows = [r for r in records if r.split == split]
        per_patient = collections.Counter(r.patient_id for r in rows)
        counts = {c: sum(r.label == i for r in rows) for i, c in enumerate(dataset.class_names)}
        patients = len(per_patient) if dataset.has_patient_ids else None
        most = max(per_patient.values(), default=0) if dataset.has_patient_ids else None
        if dataset.class_names == CLASS_NAMES:  # the default task: its pneumonia types and positive share, as always
            types = dict(sorted(collections.Counter(r.pneumonia_type for r in rows if r.label == 1).items()))
            share = round(counts[CLASS_NAMES[1]] / len(rows), 4) if rows else None
            splits[split] = {
                "images": len(rows),
                "classes": counts,
                "pneumonia_types": types,
                "patients": patients,
                "max_images_per_patient": most,
                "positive_fraction": share,
            }
        else:
            by_class = {c: len({r.patient_id for r in rows if r.label == i}) for i, c in enumerate(dataset.class_names)}
            splits[split] = {
                "images": len(rows),
                "classes": counts,
                "patients": patients,
                "patients_per_class": by_class,
                "max_images_per_patient": most,
            }
    leakage = check_leakage(records, display=dataset.display, class_names=dataset.class_names)
    if not dataset.has_patient_ids:
        leakage["patients_in_several_splits"] = None
        leakage["note"] = "no patient ids in this source: the patient-level leakage check cannot be made"
    summary: DatasetSummary = {
        "source": str(dataset.source),
        "layout": dataset.layout,
        "images": len(records),
        "splits": splits,
        "patient_id_from_file_stem": sum(not r.patient_from_name for r in records) if dataset.has_patient_ids else None,
        "leakage": leakage,
        "unreadable": [{"path": p, "reason": why} for p, why in dataset.problems],
        "ignored_files": dataset.ignored_files,
    }
    if dataset.class_names != CLASS_NAMES:
        summary["classes"] = list(dataset.class_names)
    return summary
