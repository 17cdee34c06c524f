"""Decoded, resized images cached on disk as one uint8 memory-mapped array per image set.

Fine-tuning reads every image every epoch; decoding a 2 MB Kaggle JPEG each time
would dominate. The array is (N, S, S) uint8, built once (decoding in worker
processes), written to a temporary file and renamed into place, then opened with
``mmap_mode="r"`` so that 100,000 images never need to sit in RAM.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from ..outputs import atomic_file, write_json
from ..runtime import die_with_parent, progress_bar
from .loading import RecordImages
from .preprocessing import Preprocessing
from .records import Dataset, Record

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass
class ImageArray:
    """Stage 2's decoded images: a memory-mapped uint8 array, the records that decoded, and why the others did not."""

    images: np.ndarray  # (N, S, S) uint8, memory-mapped
    records: list[Record]  # the rows that decoded, in input order
    problems: list[tuple[str, str]]  # (path, reason and fix) of the rows that did not


class _Resized:
    """A decoded image -> uint8 (S, S), resized as the preprocessing resizes (a class, so that spawned workers can unpickle it)."""

    def __init__(self, preprocessing: Preprocessing):
        self.preprocessing = preprocessing

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return np.clip(self.preprocessing.resize_image(image) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def cache_key(records: list[Record], preprocessing: Preprocessing) -> str:
    """What the array depends on: the images and how they were resized (not mean/std: normalisation comes later)."""
    h = hashlib.sha256(json.dumps({"v": CACHE_VERSION, "size": preprocessing.input_size, "resize": preprocessing.resize}).encode())
    for r in records:
        if not r.content_hash:
            raise ValueError(f"{r.ref}: no content hash; scan the dataset first (pneumoscope.data.scan)")
        h.update(r.content_hash.encode())
    return h.hexdigest()[:24]


def build_image_array(
    dataset: Dataset,
    records: list[Record],
    preprocessing: Preprocessing,
    cache_dir: str | os.PathLike,
    *,
    num_workers: int = 2,
    progress: bool = True,
) -> ImageArray:
    """The (N, S, S) uint8 array for ``records`` resized by ``preprocessing.resize_image``, from the cache or built now."""
    size = preprocessing.input_size
    folder = Path(cache_dir) / "images"
    key = cache_key(records, preprocessing)
    array_path, index_path = folder / f"{key}.npy", folder / f"{key}.json"
    if array_path.is_file() and index_path.is_file():
        index = json.loads(index_path.read_text())
        kept = set(index["kept"])
        return ImageArray(
            np.load(array_path, mmap_mode="r"), [r for i, r in enumerate(records) if i in kept], [tuple(p) for p in index["problems"]]
        )
    with atomic_file(array_path, suffix=".npy") as tmp:  # an .npy file under its temporary name too
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(records), size, size))
        ok = np.zeros(len(records), bool)
        problems = []
        loader = DataLoader(
            RecordImages(dataset, records, _Resized(preprocessing), preprocessing.input_size),
            batch_size=64,
            num_workers=num_workers,
            collate_fn=list,
            worker_init_fn=die_with_parent,
        )
        with progress_bar(total=len(records), desc="decode", unit="img", enabled=progress) as bar:
            for batch in loader:
                for i, img, why in batch:
                    if img is None:
                        problems.append((dataset.display(records[i]), why))
                    else:
                        out[i], ok[i] = img, True
                bar.update(len(batch))
        kept = np.flatnonzero(ok)
        if len(kept) < len(records):  # compact: the array holds only images that decoded
            with atomic_file(tmp, suffix=".npy") as compact_path:
                compact = np.lib.format.open_memmap(compact_path, mode="w+", dtype=np.uint8, shape=(len(kept), size, size))
                for start in range(0, len(kept), 1024):
                    compact[start : start + 1024] = out[kept[start : start + 1024]]
                compact.flush()
                del compact, out
        else:
            out.flush()
            del out
    write_json(index_path, {"kept": kept.tolist(), "problems": problems, "size": size})
    for path, why in problems:
        logger.warning("skipping %s: %s", path, why)
    return ImageArray(np.load(array_path, mmap_mode="r"), [records[i] for i in kept], problems)
