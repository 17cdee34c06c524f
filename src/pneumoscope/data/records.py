"""The dataset table: a Record per labelled image, the Dataset that holds them and their reader, patient ids from file names."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from .readers import Reader

CLASS_NAMES = ("NORMAL", "PNEUMONIA")  # the default task; index 1 is the positive class
NORMAL = "NORMAL"  # the class the screening view (normal vs not) is taken against, when a task has it
SPLIT_NAMES = ("train", "val", "test")

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
