"""Find a dataset's images and classes in a folder, a .zip or an .npz, and label them (by folder or by pneumonia type).

Layouts accepted (class names case-insensitive):

* a Kaggle ``chest_xray`` root: ``train/ val/ test/`` each with ``NORMAL/ PNEUMONIA/``;
* one folder with ``NORMAL/ PNEUMONIA/`` subfolders;
* a ``.zip`` holding either of those;
* a PneumoniaMNIST ``.npz`` (MedMNIST keys ``train_images``, ``train_labels``, ...).
"""

from __future__ import annotations

import collections
import logging
import os
import zipfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import DataError, UsageError
from .decode import IMAGE_SUFFIXES, is_image_path
from .folders import require_class_folders, walk_files
from .readers import DirReader, NpzReader, Reader, ZipReader
from .records import CLASS_NAMES, SPLIT_NAMES, Dataset, Record, parse_patient_id

logger = logging.getLogger(__name__)

# Where labels come from: the class folders, or (Kermany's second task) the pneumonia type its file names carry
LABEL_SOURCES = ("folders", "pneumonia-type")
PNEUMONIA_TYPE_CLASSES = ("NORMAL", "BACTERIA", "VIRUS")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def load_dataset(path: str | os.PathLike, *, classes: Sequence[str] | str | None = None, labels: str = "folders") -> Dataset:
    """Discover the images under ``path`` (folder, .zip or .npz) and label them.

    Args:
        path: a Kaggle-style root (train/ val/ test/ of class folders), a folder of class folders, a .zip of
            either, or a PneumoniaMNIST .npz.
        classes: None for NORMAL vs PNEUMONIA (other image folders are ignored, with a warning); ``"auto"`` for
            every folder that holds images, sorted by name as Keras' ``image_dataset_from_directory`` does; or the
            class names in the order wanted (folders matched in any case).
        labels: ``"folders"``, or ``"pneumonia-type"``: NORMAL / BACTERIA / VIRUS from the Kermany file names
            (``person12_bacteria_45.jpeg``); a PNEUMONIA image whose name carries no type is skipped and listed.

    Returns:
        The dataset; ``class_names[i]`` is label ``i``.
    """
    path = Path(path)
    if labels not in LABEL_SOURCES:
        raise UsageError(f"labels must be one of {list(LABEL_SOURCES)}, got {labels!r}")
    if not path.exists():
        raise DataError(f"{path}: no such file or folder. Give a chest_xray folder, a .zip of one, or a .npz.")
    wanted = _wanted_classes(classes, labels)
    if path.is_file() and path.suffix.lower() == ".npz":
        if wanted not in (None, CLASS_NAMES) or labels != "folders":
            raise DataError(f"{path}: a PneumoniaMNIST .npz holds NORMAL vs PNEUMONIA only. Fix: give folders for other classes.")
        return _load_npz(path)
    if path.is_dir() and wanted != "auto":
        require_class_folders(path, wanted or CLASS_NAMES)
    dataset = _from_names(path, *_open_images(path, "Give a folder, a .zip or a PneumoniaMNIST .npz."), class_names=wanted)
    return _by_pneumonia_type(dataset) if labels == "pneumonia-type" else dataset


def _wanted_classes(classes, labels: str) -> tuple[str, ...] | str | None:
    """None (the default task), "auto", or the class names asked for, checked."""
    if labels == "pneumonia-type":
        if classes not in (None, "auto") and tuple(c.upper() for c in classes) != PNEUMONIA_TYPE_CLASSES:
            raise UsageError(f"--labels pneumonia-type makes the classes {list(PNEUMONIA_TYPE_CLASSES)}; drop --classes")
        return None
    if classes is None or classes == "auto":
        return classes
    if isinstance(classes, str):
        classes = [c for c in classes.split(",") if c.strip()]
    if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
        raise UsageError(f"classes must be auto or folder names (a list of text, or A,B,C), got {classes!r}")
    names = tuple(c.strip() for c in classes)
    if len(names) < 2 or len({c.lower() for c in names}) != len(names) or not all(names):
        raise UsageError(f"classes must name two or more different folders, got {list(names)}")
    return names


def _by_pneumonia_type(dataset: Dataset) -> Dataset:
    """NORMAL / BACTERIA / VIRUS from the file names of a NORMAL vs PNEUMONIA dataset."""
    index = {"none": 0, "bacteria": 1, "virus": 2}
    kept, problems = [], list(dataset.problems)
    for r in dataset.records:
        if r.label == 0:
            kept.append(r)
        elif r.pneumonia_type in index:
            kept.append(replace(r, label=index[r.pneumonia_type]))
        else:
            problems.append(
                (
                    dataset.display(r),
                    "a PNEUMONIA image whose file name names no type (person<N>_bacteria_* or "
                    "person<N>_virus_*); left out of the pneumonia-type task",
                )
            )
    if len(problems) > len(dataset.problems):
        logger.warning("%s: %d PNEUMONIA images name no pneumonia type; left out", dataset.source, len(problems) - len(dataset.problems))
    out = replace(dataset, records=kept, problems=problems, class_names=PNEUMONIA_TYPE_CLASSES)
    _check_classes(out)
    return out


def _open_images(path: Path, fix: str) -> tuple[Reader, list[str]]:
    """The reader of a folder or a .zip, and the names of every file in it."""
    if path.is_file() and path.suffix.lower() == ".zip":
        if not zipfile.is_zipfile(path):
            raise DataError(f"{path}: not a readable zip archive. Re-download it or unpack it and pass the folder.")
        reader: Reader = ZipReader(path)
        return reader, reader.names()
    if path.is_dir():
        return DirReader(path), _walk(path)
    raise DataError(f"{path}: not a folder or a .zip. {fix}")


UNLABELLED = -1  # Record.label of a site image whose class nobody told us


def load_unlabelled(path: str | os.PathLike) -> Dataset:
    """Every image under a folder or in a .zip, searched recursively, without labels.

    For a site's unlabelled images: folder names (``NORMAL/``, ``PNEUMONIA/``) are never
    read as labels; each record's label is :data:`UNLABELLED`. Patient ids come from
    file names as elsewhere, namespaced ``site/``.
    """
    path = Path(path)
    reader, names = _open_images(path, "Give the folder that holds the site's images (searched recursively).")
    records = []
    for name in sorted(names):
        parts = name.split("/")
        if "__MACOSX" in parts or any(p.startswith(".") for p in parts) or not is_image_path(name):
            continue
        pid = parse_patient_id(parts[-1], UNLABELLED)
        records.append(Record(name, UNLABELLED, "site", f"site/{pid.patient_id}", "unknown", pid.from_name, origin_split="site"))
    if not records:
        raise DataError(f"{path}: no image files found (searched recursively for {', '.join(sorted(IMAGE_SUFFIXES))}).")
    return Dataset(path, "unlabelled", reader, records)


def _walk(root: Path) -> list[str]:
    return [str(f.relative_to(root)).replace(os.sep, "/") for f in walk_files(root)]


def _auto_classes(names: list[str]) -> tuple[str, ...]:
    """Every folder that directly holds images (not a split folder), sorted by name; first spelling kept."""
    found: dict[str, str] = {}
    for name in names:
        parts = name.split("/")
        if len(parts) >= 2 and is_image_path(name) and "__MACOSX" not in parts and not any(p.startswith(".") for p in parts):
            folder = parts[-2]
            if folder.lower() not in _SPLIT_ALIASES:
                found.setdefault(folder.lower(), folder)
    return tuple(found[k] for k in sorted(found))


def _from_names(source: Path, reader: Reader, names: list[str], *, class_names: tuple[str, ...] | str | None = None) -> Dataset:
    if class_names == "auto":
        class_names = _auto_classes(names)
        if len(class_names) < 2:
            raise DataError(f"{source}: found image folders {list(class_names)}; a task needs two or more class folders holding images.")
    class_names = tuple(class_names or CLASS_NAMES)
    class_index = {c.lower(): i for i, c in enumerate(class_names)}
    records, ignored, non_images, unclassed = [], 0, [], []
    for name in sorted(names):
        parts = name.split("/")
        if "__MACOSX" in parts or any(p.startswith(".") for p in parts):
            continue
        # the innermost folder named like a class gives the label
        cls_pos = max((i for i, p in enumerate(parts[:-1]) if p.lower() in class_index), default=None)
        if cls_pos is None:
            ignored += 1
            if is_image_path(name) and len(parts) >= 2:
                unclassed.append(parts)
            continue
        if not is_image_path(name):
            non_images.append(name)
            ignored += 1
            continue
        label = class_index[parts[cls_pos].lower()]
        split = _SPLIT_ALIASES.get(parts[cls_pos - 1].lower(), "") if cls_pos >= 1 else ""
        records.append((name, label, split))
    has_splits = any(split for _, _, split in records)
    layout = "kaggle" if has_splits else "class-folders"
    out = []
    for name, label, split in records:
        if has_splits and not split:
            ignored += 1  # a class folder outside train/val/test in a Kaggle root
            continue
        split = split or "all"
        pid = parse_patient_id(name.rsplit("/", 1)[-1], label)
        pool = "test" if split == "test" else ("all" if split == "all" else "train")  # val shares train's numbering
        out.append(Record(name, label, split, f"{pool}/{pid.patient_id}", pid.pneumonia_type, pid.from_name, origin_split=split))
    if non_images:
        logger.info("%d non-image files in class folders were ignored, e.g. %s", len(non_images), non_images[0])
    # image folders beside the class folders, e.g. COVID19/ next to NORMAL/: classes we do not know
    class_parents = {"/".join(name.split("/")[:-2]) for name, _, _ in records}
    unknown = sorted({p[-2] for p in unclassed if "/".join(p[:-2]) in class_parents})
    dataset = Dataset(source, layout, reader, out, ignored_files=ignored, unknown_classes=unknown, class_names=class_names)
    if unknown:
        logger.warning(
            "%s: image folders %s are not among the classes (%s); they are ignored. Fix: --classes auto (or name them) to use them",
            source,
            unknown,
            ", ".join(class_names),
        )
    _check_classes(dataset)
    return dataset


def _check_classes(dataset: Dataset) -> None:
    names = dataset.class_names
    counts = collections.Counter(r.label for r in dataset.records)
    missing = [names[i] for i in range(len(names)) if counts[i] == 0]
    if len(missing) == len(names):
        folders = " and ".join(f"{c}/" for c in names)
        raise DataError(
            f"{dataset.source}: no images found in class folders. Expected {folders} folders (any case)"
            " holding .jpeg/.png files, directly or under train/ val/ test/."
        )
    if missing:
        logger.warning("%s: no images for class %s", dataset.source, ", ".join(missing))


def _load_npz(path: Path) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            shapes = {s: npz[f"{s}_labels"].reshape(-1) for s in SPLIT_NAMES if f"{s}_labels" in keys}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: not a readable .npz ({err}). Re-download it.") from err
    if not shapes or any(f"{s}_images" not in keys for s in shapes):
        raise DataError(f"{path}: expected MedMNIST keys like train_images/train_labels, found {sorted(keys)}. Give a PneumoniaMNIST .npz.")
    records = []
    for split, labels in shapes.items():
        for i, y in enumerate(labels.tolist()):
            if y not in (0, 1):
                raise DataError(f"{path}: {split}_labels[{i}] is {y}, expected 0 (normal) or 1 (pneumonia).")
            ref = f"{split}/{i}"
            ptype = "none" if y == 0 else "unknown"
            records.append(Record(ref, int(y), split, f"{split}/{ref}", ptype, False, origin_split=split))
    dataset = Dataset(path, "npz", NpzReader(path), records)
    _check_classes(dataset)
    return dataset
