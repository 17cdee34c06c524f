"""Walk folders: every file under a root (links followed, never round a cycle), and a bounded look for class folders."""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import DataError
from .records import CLASS_NAMES

logger = logging.getLogger(__name__)

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
