"""Pack a dataset into one compact .zip that ``train`` (and every command that reads data) reads directly.

For moving data to a training box (a GPU machine, a cluster node): one file, the
same layout and file names (so labels, splits and patient ids are found as in the
source), each image squashed to at most ``size`` x ``size`` (the model squashes to its
square input anyway). Images already no larger are stored byte for byte, so they decode
to exactly the same pixels; larger ones are resized once and re-encoded as grayscale
JPEG. Unreadable files are left out and listed.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
import zipfile
from pathlib import Path

from PIL import Image

from ..errors import DataError, ImageReadError, OutputExistsError, UsageError
from ..outputs import atomic_file
from ..runtime import progress_bar
from .decode import resize_image, skip_detail
from .layouts import load_dataset

logger = logging.getLogger(__name__)

PACK_MANIFEST = "PNEUMOSCOPE_PACK.json"


def _free_name(name: str, taken: set[str]) -> str:
    """``name`` with ``.jpeg`` appended (not replacing its suffix: a.png and a.jpeg beside it stay two files), numbered
    when a file of that name exists too; the name returned is added to ``taken``."""
    candidate, k = f"{name}.jpeg", 0
    while candidate in taken:
        k += 1
        candidate = f"{name}.{k}.jpeg"
    taken.add(candidate)
    return candidate


def pack_dataset(
    data: str | os.PathLike, out: str | os.PathLike, *, size: int = 256, quality: int = 90, overwrite: bool = False, progress: bool = True
) -> dict:
    """The ``pneumoscope pack`` command. Returns a summary (counts, bytes, skipped files)."""
    out = Path(out)
    if out.suffix.lower() != ".zip":
        raise UsageError(f"--out must name a .zip file, got {str(out)!r}")
    if not 16 <= size <= 4096:
        raise UsageError(f"size must be between 16 and 4096 pixels, got {size!r}")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} exists; pass --overwrite to replace it.")
    dataset = load_dataset(data)
    if dataset.layout == "npz":
        raise DataError(f"{data}: already an array file; pack folders or zips of images.")
    kept, resized, skipped = 0, 0, []
    taken = {record.ref for record in dataset.records}  # names of the source's files: a re-encoded image's new name avoids them
    with atomic_file(out) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:  # JPEG/PNG bytes do not deflate
        for record in progress_bar(dataset.records, desc="pack", unit="img", enabled=progress):
            try:
                raw = dataset.reader.read_bytes(record.ref)
                image = dataset.reader.read_image(record.ref, raw)
            except (ImageReadError, OSError, KeyError) as err:
                skipped.append((dataset.display(record), skip_detail(err)))
                continue
            name = record.ref
            if max(image.shape) > size:
                small = resize_image(image, size)
                buf = io.BytesIO()
                Image.fromarray((small * 255.0 + 0.5).clip(0, 255).astype("uint8")).save(buf, format="JPEG", quality=quality)
                if Path(name).suffix.lower() not in (".jpeg", ".jpg"):
                    name = _free_name(name, taken)  # a.png -> a.png.jpeg, or a.png.1.jpeg when a.png.jpeg is a file of its own
                raw, resized = buf.getvalue(), resized + 1
            zf.writestr(name, raw)
            kept += 1
        summary = {
            "source": str(Path(data).absolute()),
            "layout": dataset.layout,
            "size": size,
            "quality": quality,
            "images": kept,
            "resized": resized,
            "stored_as_is": kept - resized,
            "skipped": [{"path": p, "reason": r} for p, r in skipped],
            "date": time.strftime("%Y-%m-%d"),
        }
        zf.writestr(PACK_MANIFEST, json.dumps(summary, indent=2))
    summary["bytes"] = out.stat().st_size
    for path, reason in skipped:
        logger.warning("left out %s: %s", path, reason)
    return summary
