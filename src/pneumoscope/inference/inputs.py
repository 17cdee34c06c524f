"""What the user names, expanded to the images to read: files, folders and .zip archives; how messages name an input."""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path
from typing import NamedTuple

from ..data.bounded import MAX_LIST_BYTES, read_text
from ..data.decode import describe_input, is_image_path
from ..errors import UsageError

logger = logging.getLogger(__name__)


def expand_inputs(paths: list[str | os.PathLike]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Image files named directly, and image files found (recursively, links followed, cycles not) in folders.

    Returns (files, problems): a path that cannot be used (missing, a name too long,
    a file type that is not read, a folder without images) is a (path, reason and fix)
    problem, never an exception, so the other inputs are still predicted. A file named
    directly is accepted by the same rule as one found in a folder: an image suffix
    (``io.IMAGE_SUFFIXES``) or the DICOM preamble.
    """
    from ..data.bounded import not_regular_file
    from ..data.decode import IMAGE_SUFFIXES

    files, problems = [], []
    for p in map(Path, paths):
        try:
            is_dir, exists = p.is_dir(), p.exists()
        except OSError as err:  # ENAMETOOLONG, EACCES, ELOOP: this path only, not the whole call
            problems.append((str(p), f"cannot be read ({err.strerror}). Fix: check the path"))
            continue
        if is_dir:
            found, odd = _images_in_folder(p)
            problems.extend(odd)
            if found or odd:
                files.extend(found)
            else:
                problems.append(
                    (str(p), f"folder holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}). Fix: give a folder of images")
                )
        elif not exists:
            problems.append((str(p), "no such file or folder. Fix: check the path"))
        elif not_regular_file(p):
            problems.append((str(p), not_regular_file(p)))
        elif _is_input(p):
            files.append(p)
        else:
            problems.append(
                (
                    str(p),
                    f"not an image type pneumoscope reads (suffix {p.suffix or 'none'!r}; it reads "
                    f"{', '.join(sorted(IMAGE_SUFFIXES))} and DICOM). Fix: convert it to PNG",
                )
            )
    for path, why in problems:
        logger.warning("%s: %s", path, why)
    return files, problems


def _is_input(f: Path) -> bool:
    """An image suffix, or a regular file with the DICOM preamble."""
    if is_image_path(f):
        return True
    try:
        with open(f, "rb") as fh:  # a regular file (checked first): opening a FIFO would wait for a writer
            return fh.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _images_in_folder(folder: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """(the input files under ``folder``, sorted; (path, reason) of those named like images that cannot be read)."""
    from ..data.bounded import not_regular_file
    from ..data.folders import walk_files

    found, odd = [], []
    for f in walk_files(folder):
        why = not_regular_file(f) if is_image_path(f) else ""
        if why:  # named like an image but a FIFO or a device: a row with the reason, not silence (nor a hang)
            odd.append((str(f), why))
        elif is_image_path(f) and not f.exists():
            odd.append((str(f), "a symbolic link to a file that does not exist. Fix: point the link at the image, or remove it"))
        elif f.is_file() and _is_input(f):
            found.append(f)
    found.sort()
    return found, odd


def input_name(x, index: int) -> str:
    """How messages name input ``index``: a file by its path, anything else by its place and kind."""
    return describe_input(x) if isinstance(x, (str, os.PathLike)) else f"input {index} ({describe_input(x)})"


class Item(NamedTuple):
    """One input of ``predict``: the row's name, the file to open, the zip member, or why it cannot be predicted."""

    name: str  # the row's path: a file, or ARCHIVE.zip::MEMBER
    source: str  # the file to open (the archive, for a member)
    member: str | None = None  # the zip member, else None
    error: str = ""  # why it cannot be predicted, known before decoding (a missing path), else ""


def read_list(path: str | os.PathLike) -> list[str]:
    """The paths in a ``--from-list`` file: one a line; blank lines and lines starting with ``#`` are skipped."""
    try:
        text = read_text(path, MAX_LIST_BYTES, pipes=True)  # a pipe, as from `--from-list <(find ...)`, is a list too
    except (OSError, ValueError) as err:
        raise UsageError(
            f"--from-list {path}: cannot be read as a UTF-8 text file ({err}). Fix: give a text file with one image, "
            "folder or .zip path a line"
        ) from err
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def expand_items(inputs: list[str | os.PathLike]) -> list[Item]:
    """Files, folders (searched recursively) and ``.zip`` archives -> one :class:`Item` per image.

    The order is that of ``inputs`` (a folder's or archive's images sorted), then the
    inputs that cannot be used, each with its reason and fix, as :func:`expand_inputs` gives them.
    """
    files, problems = [], []
    for p in inputs:
        if str(p).lower().endswith(".zip") and Path(p).is_file():
            members, why = _zip_members(Path(p))
            files.extend(Item(f"{p}::{m}", str(p), m) for m in members)
            if why:
                logger.warning("%s: %s", p, why)
                problems.append(Item(str(p), str(p), None, why))
            continue
        found, bad = expand_inputs([p])
        files.extend(Item(str(f), str(f)) for f in found)
        problems.extend(Item(path, path, None, why) for path, why in bad)
    return files + problems


def _zip_members(path: Path) -> tuple[list[str], str]:
    """The image members of an archive, sorted, and why there are none ("" when there are some)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [i.filename for i in zf.infolist() if not i.is_dir()]
    except (OSError, zipfile.BadZipFile) as err:
        return [], f"not a readable zip archive ({err}). Fix: copy it again, or unpack it and give the folder"
    keep = sorted(n for n in names if "__MACOSX" not in n.split("/") and is_image_path(n))
    return keep, "" if keep else "archive holds no image files. Fix: give a .zip of images"
