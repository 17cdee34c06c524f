"""Decode image files into float32 grayscale arrays. No torch here.

``read_image`` is the one decoder every other module uses, so training,
evaluation and inference see the same pixels.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ImageReadError
from .bounded import MAX_PIXELS, read_file
from .dicom import HEADER_ERRORS, dicom_to_image, read_dicom

logger = logging.getLogger(__name__)

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"}) | DICOM_SUFFIXES

T = TypeVar("T")


class Decoded(NamedTuple):
    """What :func:`read_many` returns, each list in input order."""

    index: list[int]  # positions of the items that decoded
    images: list[np.ndarray]  # their decoded images
    skipped: list[tuple[str, str]]  # (name, reason and fix) of the others


def read_many(
    items: Sequence[T],
    read: Callable[[T], np.ndarray],
    *,
    name: Callable[[T], str] = str,
    skippable: Callable[[T], bool] | None = None,
    log: logging.Logger | None = None,
) -> Decoded:
    """Decode each item once with ``read(item)``; an item that raises :class:`ImageReadError` is skipped, not fatal.

    A skipped item is recorded as (``name(item)``, :attr:`ImageReadError.detail`) and its error
    logged as a warning on ``log`` (the caller's logger; None: not logged). Where
    ``skippable(item)`` is False the error is raised instead: an in-memory array that breaks
    the contract is a bug in the calling code, not a bad file among good ones. Any other
    exception propagates.
    """
    index, images, skipped = [], [], []
    for i, item in enumerate(items):
        try:
            image = read(item)
        except ImageReadError as err:
            if skippable is not None and not skippable(item):
                raise
            if log is not None:
                log.warning("%s", err)
            skipped.append((name(item), skip_detail(err)))
            continue
        index.append(i)
        images.append(image)
    return Decoded(index, images, skipped)


def skip_detail(err: Exception) -> str:
    """How a skipped image is recorded beside its name (skipped.csv, a pack's list, a prediction's ``error``).

    An :class:`ImageReadError` gives its :attr:`~ImageReadError.detail`, the reason with
    the fix; any other error (an OSError or KeyError a reader let through) its message.
    """
    return err.detail if isinstance(err, ImageReadError) else str(err)


def is_image_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` is named like an image this package reads (an image suffix, not a hidden file)."""
    name = os.path.basename(str(path))
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def read_image(
    path: str | os.PathLike,
    data: bytes | None = None,
    *,
    draft_size: int | None = None,
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """Decode an image into a float32 (H, W) array in [0, 1].

    ``path`` names the file (and is used in messages); ``data`` are its bytes
    when they do not come from the file system (a zip member). ``draft_size``
    lets the JPEG decoder scale down by a power of two while keeping both sides
    at least that large: full-size Kaggle JPEGs decode several times faster.

    Colour images become luminance, alpha is dropped, 16-bit images are scaled by
    their bit depth. Raises :class:`ImageReadError` for anything unusable.
    """
    if data is None:
        data = read_file(path)
    if len(data) == 0:
        raise ImageReadError(path, "file is empty (0 bytes)", "Re-copy or remove the file.")
    if Path(str(path)).suffix.lower() in DICOM_SUFFIXES or data[128:132] == b"DICM":
        return check_decoded(read_dicom(path, data, max_pixels=max_pixels), path)
    return check_decoded(_read_pillow(path, data, draft_size=draft_size, max_pixels=max_pixels), path)


def check_decoded(image: np.ndarray, path: str | os.PathLike, *, given: bool = False) -> np.ndarray:
    """The one check every decoder's output passes: a finite 2-D float32 array in [0, 1].

    A NaN that reached the network would come out as a NaN probability, and a NaN
    compares false with every threshold: it would be read as NORMAL. ``given``: the
    array came from the caller (:func:`to_image`), so values outside [0, 1] are
    the caller's to fix rather than a decoder bug.
    """
    if image.ndim != 2 or min(image.shape) < 1:
        raise ImageReadError(path, f"decoded to an unusable shape {image.shape}", "Re-export as a 2-D grayscale image.")
    if not np.isfinite(image).all():
        bad = int((~np.isfinite(image)).sum())
        fix = "Replace them (e.g. np.nan_to_num) or mask them first." if given else "Re-export the image (check its window/LUT settings)."
        raise ImageReadError(path, f"holds {bad:,} NaN or infinite pixel values", fix)
    lo, hi = float(image.min()), float(image.max())
    if lo < 0.0 or hi > 1.0:
        if given:
            raise ImageReadError(
                path,
                f"a float image must lie in [0, 1], its values lie in [{lo:.6g}, {hi:.6g}]",
                "Divide 8-bit values by 255 and 16-bit values by 65535, or pass the uint8/uint16 array itself.",
            )
        raise RuntimeError(f"{path}: decoder returned values in [{lo}, {hi}], outside [0, 1] (a bug; please report it)")
    return np.ascontiguousarray(image, dtype=np.float32)


ACCEPTED = (
    "a path, a PIL image, a pydicom Dataset, or a NumPy array: uint8 (0-255), uint16 (0-65535) or float in [0, 1], "
    "shaped (H, W) grayscale or (H, W, 3|4) RGB(A)"
)


def to_image(x, name: str = "input", *, draft_size: int | None = None) -> np.ndarray:
    """Any accepted input -> the decoder's float32 (H, W) in [0, 1], converted exactly once.

    A path goes through :func:`read_image`, a pydicom ``Dataset`` through the DICOM
    decoder, a PIL image through the same conversion as a decoded file. A NumPy array
    is scaled by its type: uint8 by 255, uint16 by 65535 (as the decoder scales 8- and
    16-bit files); a float array must already lie in [0, 1]. RGB(A) becomes luminance
    as Pillow's ``convert("L")`` computes it (alpha dropped). Anything else raises
    :class:`ImageReadError` (a ``ValueError``) naming what was given and what is expected.
    A palette image's array holds palette indices, not grey levels: pass the PIL image.
    """
    if isinstance(x, (str, os.PathLike)):
        return read_image(x, draft_size=draft_size)
    if isinstance(x, Image.Image):
        _check_pixels(x.width * x.height, f"{x.width} x {x.height}", name)
        return check_decoded(_to_gray_float(x, name), name)
    if _is_dicom_dataset(x):
        return check_decoded(dicom_to_image(x, name), name)
    if isinstance(x, np.ma.MaskedArray):  # np.asarray would drop the mask and read the hidden values as pixels
        raise ImageReadError(
            name,
            f"a masked array {x.shape} is not an image input: its masked pixels have no value",
            "Fill them first: x.filled(0) (or the value the masked pixels should have).",
        )
    if isinstance(x, np.ndarray):
        if x.ndim >= 2:
            _check_pixels(x.shape[0] * x.shape[1], f"{x.shape[1]} x {x.shape[0]}", name)
        return check_decoded(_array_to_gray(x, name), name, given=True)
    raise ImageReadError(name, f"an object of type {type(x).__qualname__} is not an image input", f"Pass {ACCEPTED}.")


def _check_pixels(pixels: int, size: str, name: str) -> None:
    """The bound a file read or an upload has, for an image given in memory."""
    if pixels > MAX_PIXELS:
        raise ImageReadError(
            name,
            f"an image of {size} pixels is over the {MAX_PIXELS:,}-pixel limit (as for files and uploads)",
            "Downscale it first; the model sees it at a few hundred pixels a side.",
        )


def describe_input(x) -> str:
    """A short description of an input for messages and result rows: its path, or what it is."""
    if isinstance(x, (str, os.PathLike)):
        return str(x)
    if isinstance(x, np.ndarray):
        return f"{x.dtype} array {x.shape}"
    if isinstance(x, Image.Image):
        return getattr(x, "filename", "") or f"PIL image ({x.mode}, {x.width}x{x.height})"
    if _is_dicom_dataset(x):
        filename = getattr(x, "filename", None)
        return filename if isinstance(filename, str) and filename else "DICOM dataset"
    return type(x).__name__


def _is_dicom_dataset(x) -> bool:
    pydicom = sys.modules.get("pydicom")  # not imported: x cannot be a Dataset, and no import is paid for
    return pydicom is not None and isinstance(x, pydicom.Dataset)


def _array_to_gray(a: np.ndarray, name: str) -> np.ndarray:
    """uint8/uint16/float array, (H, W), (H, W, 1) or (H, W, 3|4) -> (H, W) float; range and NaNs are checked by the caller."""
    if a.dtype not in (np.uint8, np.uint16) and a.dtype.kind != "f":
        raise ImageReadError(
            name,
            f"an array of dtype {a.dtype} is not an image input: expected uint8 (0-255), uint16 (0-65535) or float in [0, 1]",
            "Convert it (x.astype(np.uint16) for 16-bit data in a wider integer type; for a 1-bit or palette "
            "image pass the PIL image itself).",
        )
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[2] in (3, 4):
        rgb = np.ascontiguousarray(a[..., :3])  # drop alpha: X-rays carry none
        if a.dtype == np.uint8:  # exactly as a decoded 8-bit colour file
            return np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float32) / 255.0
        gray = rgb.astype(np.float64) @ LUMA_WEIGHTS  # (H, W)
    elif a.ndim == 2:
        gray = a
    else:
        raise ImageReadError(
            name,
            f"an array of shape {a.shape} is not one image: expected (H, W) grayscale or (H, W, 3|4) RGB(A)",
            "Pass one image at a time (a list for several), channels last.",
        )
    if a.dtype == np.uint8:
        return gray.astype(np.float32) / 255.0
    if a.dtype == np.uint16:
        return gray.astype(np.float32) / 65535.0
    return gray


LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, as Pillow's convert("L")


def _read_pillow(path, data: bytes, *, draft_size: int | None, max_pixels: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            # Turn Pillow's bomb warning into an error for this call only.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageReadError(
                        path,
                        f"image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}"
                        " (possible decompression bomb)",
                        "Downscale the image or remove it.",
                    )
                if draft_size and img.format == "JPEG":
                    img.draft("L", (draft_size, draft_size))
                img.load()
                return _to_gray_float(img, path)
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageReadError(path, f"image is too large ({err})", "Downscale the image or remove it.") from err
    except UnidentifiedImageError as err:
        raise ImageReadError(
            path, "not a readable image (unknown format or not an image)", "Remove it or convert it to PNG or JPEG.", kind="unsupported"
        ) from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageReadError(path, f"image is corrupt or truncated ({err})", "Re-export or re-download the file, or remove it.") from err


def image_pixels(path: str | os.PathLike, data: bytes) -> int | None:
    """Width x height read from the header alone (nothing decoded), or None where the header cannot be read.

    Lets a server reserve memory for a decode before starting it; :func:`read_image`
    still gives the reason for a file that turns out unreadable.
    """
    if Path(str(path)).suffix.lower() in DICOM_SUFFIXES or data[128:132] == b"DICM":
        import pydicom
        from pydicom.errors import InvalidDicomError

        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
            return int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) or None
        except (InvalidDicomError, EOFError, OSError, *HEADER_ERRORS):
            return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size[0] * img.size[1]
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError):
        return None


def _to_gray_float(img: Image.Image, path) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.float32) / 65535.0
    elif mode == "I":
        arr = np.asarray(img, dtype=np.float32)
        top = 65535.0 if arr.max(initial=0) <= 65535 else float(arr.max())
        arr = np.clip(arr, 0, None) / top
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ImageReadError(path, "floating-point image holds NaN or infinite values", "Re-export the image.")
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    else:
        if mode == "CMYK":
            img = img.convert("RGB")
        elif mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA").convert("RGB")  # drop alpha: X-rays carry none
        arr = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise ImageReadError(path, f"decoded to an unusable shape {arr.shape}", "Re-export as a 2-D grayscale image.")
    return np.ascontiguousarray(arr, dtype=np.float32)


# Cheap image-level checks before the feature-level OOD guard: a blank or tiny picture
# can land close to the training features and would get a confident-looking answer.
MIN_SIDE = 28  # PneumoniaMNIST's side, the smallest images a model here is trained on
MAX_ASPECT = 3.0  # chest radiographs are between about 0.7 and 1.4 (width / height)
MIN_CONTRAST = 0.01  # standard deviation of [0, 1] pixel values; 8-bit noise alone is ~0.004


def screen_image(image: np.ndarray) -> str:
    """Why a decoded image cannot be a radiograph (near-constant, too small, too elongated), or ""."""
    h, w = image.shape
    if min(h, w) < MIN_SIDE:
        return f"image is {w}x{h} pixels; radiographs are at least {MIN_SIDE} px a side"
    if max(h, w) / min(h, w) > MAX_ASPECT:
        return f"aspect ratio {max(h, w) / min(h, w):.1f} is beyond {MAX_ASPECT:g}; not a chest radiograph"
    sd = float(image.std())
    if sd < MIN_CONTRAST:
        return f"image is near-constant (pixel sd {sd:.4f} < {MIN_CONTRAST}): blank or empty"
    return ""


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to ``size`` x ``size`` without keeping the aspect ratio (bilinear, antialiased).

    Squashing matches the Kaggle copies that were already squashed to 224 x 224
    and Keras' ``image_dataset_from_directory`` default.
    """
    if image.shape == (size, size):
        return image.astype(np.float32, copy=False)
    resized = Image.fromarray(np.asarray(image, dtype=np.float32)).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)
