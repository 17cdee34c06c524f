"""Download PneumoniaMNIST (MedMNIST's published file) into the user cache, checked by MD5."""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from ..errors import DownloadError
from ..outputs import atomic_file
from .paths import default_cache_dir

logger = logging.getLogger(__name__)

# MedMNIST v2 (Zenodo record 10519652); the MD5 is the one medmnist's INFO lists.
PNEUMONIAMNIST_URL = "https://zenodo.org/records/10519652/files/pneumoniamnist.npz?download=1"
PNEUMONIAMNIST_MD5 = "28209eda62fecd6e6a2d98b1501bb15f"


def md5sum(path: str | os.PathLike) -> str:
    """The MD5 hex digest of the file at ``path``, read in 1 MiB chunks."""
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_pneumoniamnist(
    cache_dir: str | os.PathLike | None = None, *, url: str = PNEUMONIAMNIST_URL, md5: str = PNEUMONIAMNIST_MD5, timeout: float = 60.0
) -> Path:
    """Path to a verified ``pneumoniamnist.npz``, downloading it once.

    The file is written to a temporary name and renamed only after its MD5
    matches, so a failed or interrupted download never leaves a bad file.
    """
    target = Path(cache_dir or default_cache_dir()) / "pneumoniamnist.npz"
    if target.is_file():
        if md5sum(target) == md5:
            return target
        logger.warning("%s has the wrong checksum; downloading it again", target)
    logger.info("downloading %s", url)
    with atomic_file(target, suffix=".part") as tmp, open(tmp, "wb") as out:
        h = hashlib.md5()
        for chunk in _chunks(url, timeout):
            out.write(chunk)
            h.update(chunk)
        if h.hexdigest() != md5:
            from ..errors import DataError

            raise DataError(f"download from {url} has MD5 {h.hexdigest()}, expected {md5}; the file is not kept. Try again later.")
    return target


def _chunks(url: str, timeout: float) -> Iterator[bytes]:
    """The response body in pieces; a network failure is a :class:`DownloadError` (a full disk stays an OSError naming the file)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            yield from iter(lambda: resp.read(1 << 20), b"")
    except OSError as err:
        raise DownloadError(
            f"could not download PneumoniaMNIST from {url} ({err}). Fix: run with a network, or pass DATA=path to a local dataset."
        ) from err
