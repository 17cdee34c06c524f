"""Find a dataset, label its images, give each a patient id, split by patient.

A dataset is a table of :class:`Record` rows plus a reader that turns a row's
``ref`` into bytes or pixels. Layouts accepted (class names case-insensitive):

* a Kaggle ``chest_xray`` root: ``train/ val/ test/`` each with ``NORMAL/ PNEUMONIA/``;
* one folder with ``NORMAL/ PNEUMONIA/`` subfolders;
* a ``.zip`` holding either of those;
* a PneumoniaMNIST ``.npz`` (MedMNIST keys ``train_images``, ``train_labels``, ...).
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import logging
import os
import re
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import DataError, ImageReadError, UsageError
from ..runtime import progress_bar
from .decode import IMAGE_SUFFIXES, is_image_path, read_file, read_image, read_zip_member, skip_detail, to_image

logger = logging.getLogger(__name__)

CLASS_NAMES = ("NORMAL", "PNEUMONIA")  # the default task; index 1 is the positive class
NORMAL = "NORMAL"  # the class the screening view (normal vs not) is taken against, when a task has it
# Where labels come from: the class folders, or (Kermany's second task) the pneumonia type its file names carry
LABEL_SOURCES = ("folders", "pneumonia-type")
PNEUMONIA_TYPE_CLASSES = ("NORMAL", "BACTERIA", "VIRUS")
SPLIT_NAMES = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}

_PERSON = re.compile(r"^(person\d+)_(bacteria|virus)(?:_|$)", re.IGNORECASE)
_IM = re.compile(r"^((?:NORMAL2-)?IM-\d+)(?:-|$)", re.IGNORECASE)


@dataclass(frozen=True)
class Record:
    """One labelled image of a dataset: where its reader finds it, its label, split, patient and content hash."""

    ref: str  # where the reader finds it: relative path, zip member, or "split/index" in an npz
    label: int  # index into the dataset's class_names (0 NORMAL, 1 PNEUMONIA for the default task)
    split: str  # train / val / test, or "all" for a folder of class subfolders
    patient_id: str  # namespaced by pool: "train/person12", "test/person12"
    pneumonia_type: str  # bacteria / virus / none / unknown
    patient_from_name: bool  # False: no pattern matched, the file stem stands in
    origin_split: str = ""  # the split the files came in, before any re-split
    content_hash: str = ""  # sha256 of the file's bytes, filled by scan()


@dataclass(frozen=True)
class PatientId:
    """What a file name says of its patient: the id, the pneumonia type, and whether a pattern matched."""

    patient_id: str
    pneumonia_type: str
    from_name: bool


def parse_patient_id(filename: str, label: int) -> PatientId:
    """Patient id and pneumonia type from a Kermany-style file name.

    ``person12_bacteria_45.jpeg`` -> person12 / bacteria; ``IM-0115-0001.jpeg`` and
    ``NORMAL2-IM-0374-0001-0002.jpeg`` -> their ``IM-NNNN`` prefix; anything else
    -> the file stem, so each such image is its own patient.
    """
    stem = Path(filename).stem
    m = _PERSON.match(stem)
    if m:
        return PatientId(m.group(1).lower(), m.group(2).lower(), True)
    ptype = "none" if label == 0 else "unknown"
    m = _IM.match(stem)
    if m:
        return PatientId(m.group(1).upper(), ptype, True)
    return PatientId(stem, ptype, False)


# --------------------------------------------------------------------------- readers


class DirReader:
    """Reads the images of a folder by relative path."""

    kind = "folder"

    def __init__(self, root: Path):
        self.root = Path(root)

    def display(self, ref: str) -> str:
        """The image's path, for messages and outputs."""
        return str(self.root / ref)

    def read_bytes(self, ref: str) -> bytes:
        """The file's bytes."""
        return read_file(self.root / ref)  # regular files only, with a bound: a FIFO or /dev/zero named like an image is refused

    def read_image(self, ref: str, data: bytes | None = None, draft_size: int | None = None) -> np.ndarray:
        """The decoded image (H, W) in [0, 1]."""
        return read_image(self.display(ref), data, draft_size=draft_size)


class ZipReader:
    """Reads the images of a .zip archive by member name (the archive opened once per process)."""

    kind = "zip"

    def __init__(self, path: Path):
        self.path = Path(path)
        self._zip = None  # opened lazily, once per process (DataLoader workers)
        self._pid = None

    def __getstate__(self):
        return {"path": self.path, "_zip": None, "_pid": None}

    def _archive(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._pid = os.getpid()
        return self._zip

    def names(self) -> list[str]:
        """The archive's file members."""
        return [i.filename for i in self._archive().infolist() if not i.is_dir()]

    def display(self, ref: str) -> str:
        """``ARCHIVE.zip::MEMBER``, for messages and outputs."""
        return f"{self.path}::{ref}"

    def read_bytes(self, ref: str) -> bytes:
        """The member's bytes, within io's bounds on size and compression ratio (a zip bomb is an ImageReadError)."""
        return read_zip_member(self._archive(), ref, self.display(ref))

    def read_image(self, ref: str, data: bytes | None = None, draft_size: int | None = None) -> np.ndarray:
        """The decoded member (H, W) in [0, 1]; ``data``: its bytes, when already read."""
        if data is None:
            data = self.read_bytes(ref)
        return read_image(self.display(ref), data, draft_size=draft_size)


class NpzReader:
    """Reads the images of a MedMNIST .npz by ``split/index``."""

    kind = "npz"

    def __init__(self, path: Path):
        self.path = Path(path)
        self._arrays: dict[str, np.ndarray] = {}

    def __getstate__(self):
        return {"path": self.path, "_arrays": {}}

    def images(self, split: str) -> np.ndarray:
        """The image array of ``split``, loaded once."""
        if split not in self._arrays:
            with np.load(self.path, allow_pickle=False) as npz:
                self._arrays[split] = npz[f"{split}_images"]
        return self._arrays[split]

    def _locate(self, ref: str) -> np.ndarray:
        split, index = ref.split("/")
        return self.images(split)[int(index)]

    def display(self, ref: str) -> str:
        """``FILE.npz::split/index``, for messages and outputs."""
        return f"{self.path}::{ref}"

    def read_bytes(self, ref: str) -> bytes:
        """The image's raw array bytes (what its content hash is taken of)."""
        return np.ascontiguousarray(self._locate(ref)).tobytes()

    def read_image(self, ref: str, data: bytes | None = None, draft_size: int | None = None) -> np.ndarray:
        """The array converted and checked as any image given in memory (:func:`~.decode.to_image`): uint8 by 255,
        uint16 by 65535, (H, W, 3) colour MedMNIST variants to luminance as a decoded colour file."""
        return to_image(self._locate(ref), self.display(ref))


Reader = DirReader | ZipReader | NpzReader


# --------------------------------------------------------------------------- discovery


@dataclass
class Dataset:
    """A labelled dataset: its source, layout, reader, records, and the files skipped or ignored."""

    source: Path
    layout: str  # "kaggle", "class-folders" or "npz"
    reader: Reader
    records: list[Record]
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, reason and fix)
    ignored_files: int = 0
    unknown_classes: list[str] = field(default_factory=list)  # image folders beside the class folders
    class_names: tuple[str, ...] = CLASS_NAMES  # label i is class_names[i]

    def display(self, record: Record) -> str:
        """How messages name a record: its path, zip member or array index."""
        return self.reader.display(record.ref)

    def subset(self, records: list[Record]) -> Dataset:
        """The same dataset holding only ``records``."""
        return replace(self, records=records, problems=list(self.problems), unknown_classes=list(self.unknown_classes))

    @property
    def has_patient_ids(self) -> bool:
        """Whether the records carry patient ids (an npz does not)."""
        return self.layout != "npz"


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


CLASS_FOLDER_DEPTH = 3  # NORMAL/ (class folders), train/NORMAL/ (a Kaggle root), chest_xray/train/NORMAL/ (a folder holding one)
LOOK_ENTRIES = 5000  # folder entries read, at most, while looking for class folders


def require_class_folders(root: Path, class_names: Sequence[str] = CLASS_NAMES) -> None:
    """Refuse a folder with no class folder within :data:`CLASS_FOLDER_DEPTH` levels, after a bounded look.

    Only folder names are read, breadth first, at most :data:`LOOK_ENTRIES` entries: a wrong
    parent folder (a home folder, a disk) is refused in a moment, instead of being walked
    to its last file before the error.
    """
    classes = {c.lower() for c in class_names}
    level, budget = [root], LOOK_ENTRIES
    for _ in range(CLASS_FOLDER_DEPTH):
        below = []
        for folder in level:
            names, read = _subfolders(folder, budget)
            if any(n.lower() in classes for n in names):
                return
            below.extend(folder / n for n in names)
            budget -= read
            if budget <= 0:
                break
        level = below
    top = sorted(_subfolders(root, 1000)[0])
    found = ", ".join(f"{n}/" for n in top[:5]) + (f" and {len(top) - 5} more" if len(top) > 5 else "") if top else "no subfolders"
    looked = f"; the look stopped after {LOOK_ENTRIES:,} entries" if budget <= 0 else ""
    wanted = " and ".join(f"{c}/" for c in class_names)
    raise DataError(
        f"{root}: no {wanted} class folders (any case) within {CLASS_FOLDER_DEPTH} levels (found: {found}{looked}). "
        f"Fix: point at the chest_xray folder that holds train/ val/ test/, or at a folder holding {wanted}"
    )


def _subfolders(folder: Path, budget: int) -> tuple[list[str], int]:
    """(names of the visible subfolders of ``folder``, links followed, among its first ``budget`` entries; entries read)."""
    names, read = [], 0
    try:
        with os.scandir(folder) as entries:
            for entry in itertools.islice(entries, max(0, budget)):
                read += 1
                if not entry.name.startswith(".") and entry.name != "__MACOSX" and _is_dir(entry):
                    names.append(entry.name)
    except OSError:  # unreadable: no class folders seen there
        pass
    return names, read


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


UNLABELLED = -1  # Record.label of a site image whose class nobody told us


def unique_images(dataset: Dataset, *, labelled: bool) -> Dataset:
    """The dataset with one record per distinct image (the same bytes: :func:`scan`'s content hash), the first kept.

    Copies of one image weigh as many images where a site's prevalence, its feature statistics or a temperature are
    fitted (60 copies of one image were taken as a site of prevalence 1.0). With ``labelled``, one image under two
    labels is refused: it cannot be both. The copies dropped are logged.
    """
    first: dict[str, Record] = {}
    conflicts: list[tuple[str, str]] = []
    for r in dataset.records:
        seen = first.setdefault(r.content_hash, r) if r.content_hash else r
        if labelled and seen is not r and seen.label != r.label:
            conflicts.append((dataset.display(seen), dataset.display(r)))
    if conflicts:
        a, b = conflicts[0]
        raise DataError(
            f"{dataset.source}: {len(conflicts)} images carry both labels (the same bytes as NORMAL and as PNEUMONIA), "
            f"e.g. {a} and {b}. Fix: keep each image under its one true label"
        )
    kept = [r for r in dataset.records if not r.content_hash or first[r.content_hash] is r]
    if len(kept) < len(dataset.records):
        logger.warning(
            "%s: %d of %d images are copies of others (the same bytes); each image is counted once",
            dataset.source,
            len(dataset.records) - len(kept),
            len(dataset.records),
        )
    return dataset.subset(kept)


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


def walk_files(root: str | os.PathLike) -> list[Path]:
    """Every file under ``root``, following symbolic links to folders, but not round a cycle.

    A link to a folder that is already on the way down (``a/b/up -> ../..``) would be
    walked for ever; it is reported (a warning naming the link) and not followed. Each
    real folder is walked once, by the first path that reaches it (in sorted order): links
    that branch to the same folders (``d0/x`` and ``d0/y`` both to ``d1``, and so on) would
    otherwise take exponential time. Hidden folders and ``__MACOSX`` are skipped. Sorted,
    so listings are reproducible.
    """
    root = Path(root)
    above: dict[str, frozenset[str]] = {str(root): frozenset({os.path.realpath(root)})}  # folder -> real paths on its way down
    walked = {os.path.realpath(root)}  # every real folder reached so far
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        chain = above.pop(dirpath)
        keep = []
        for d in sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX"):
            link = os.path.join(dirpath, d)
            real = os.path.realpath(link)
            if real in chain:
                logger.warning("%s: symbolic link to %s, a folder that holds it (a cycle); not followed. Fix: remove the link", link, real)
                continue
            if real in walked:
                logger.debug("%s: %s is already walked by another path; not walked again", link, real)
                continue
            walked.add(real)
            keep.append(d)
            above[link] = chain | {real}
        dirnames[:] = keep
        files.extend(Path(dirpath, fn) for fn in sorted(filenames))
    return files


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


# --------------------------------------------------------------------------- scan, split, leakage


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


def check_leakage(records: list[Record], *, display=str) -> dict:
    """Patients in more than one split, and images whose bytes are identical."""
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
        "ok": not crossing and not cross_dupes,
    }


def summarize(dataset: Dataset) -> dict:
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
    leakage = check_leakage(records, display=dataset.display)
    if not dataset.has_patient_ids:
        leakage["patients_in_several_splits"] = None
        leakage["note"] = "no patient ids in this source: the patient-level leakage check cannot be made"
    summary = {
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
