"""How a dataset reads its images: by relative path in a folder, by member in a .zip, by ``split/index`` in an .npz."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from .bounded import read_file, read_zip_member
from .decode import read_image, to_image


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
