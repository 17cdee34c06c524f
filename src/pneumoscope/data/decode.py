"""Decode image files into float32 grayscale arrays. No torch here.

``read_image`` is the one decoder every other module uses, so training,
evaluation and inference see the same pixels.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import sys
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ImageReadError

logger = logging.getLogger(__name__)

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"}) | DICOM_SUFFIXES

# A radiograph from a large detector is about 4,300 x 3,500 (15 MP); Kaggle's
# largest chest_xray JPEG is about 2,900 x 2,900. Anything far beyond is more
# likely a decompression bomb than an X-ray.
MAX_PIXELS = 64_000_000

# A zip member is checked before it is read: a 2 MB archive can hold a 2 GiB member of
# zeros (a zip bomb). The largest image file read here is an uncompressed 16-bit DICOM at
# MAX_PIXELS, 2 bytes a pixel (128 MB); 4 bytes a pixel leaves room for headers and odd
# encodings. JPEG and PNG are compressed already (a zip gains a few per cent on them) and an
# uncompressed DICOM deflates some 2-10x; deflate's ceiling, where bombs sit, is about 1,030x.
# A member below MIN_RATIO_CHECKED costs nothing whatever its ratio (a flat test image).
MAX_MEMBER_BYTES = 4 * MAX_PIXELS
MAX_COMPRESSION_RATIO = 200
MIN_RATIO_CHECKED = 1 << 20

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


_ZIP_FIX = "Unpack the archive and check the file, or remove it from the archive."


def not_regular_file(path: str | os.PathLike) -> str:
    """Why ``path`` (its links followed) is not a regular file that may be read: a FIFO, a device, a socket; else "".

    Reading a FIFO waits for a writer for ever, and a device such as ``/dev/zero`` never ends: only regular
    files are read. A path that cannot be looked at is left to the reader, which reports why."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return ""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return ""
    kind = (
        "a FIFO (named pipe)"
        if stat.S_ISFIFO(mode)
        else "a character device"
        if stat.S_ISCHR(mode)
        else "a block device"
        if stat.S_ISBLK(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "not a regular file"
    )
    return f"{kind}, not an image file; only regular files are read. Fix: give the image file itself"


def read_file(path: str | os.PathLike) -> bytes:
    """A regular file's bytes, at most ``MAX_MEMBER_BYTES`` (the bound a zip member gets).

    Opened without blocking and checked on the open descriptor, so a FIFO (which would wait for a writer for ever)
    or a device (``/dev/zero`` never ends) named like an image is refused, not read; raises :class:`ImageReadError`.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise ImageReadError(path, f"cannot be read ({err.strerror})", "Check the path and permissions.") from err
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            why = (
                not_regular_file(path)
                or "not a regular file, not an image file; only regular files are read. Fix: give the image file itself"
            )
            reason, fix = why.split(". Fix: ", 1)
            raise ImageReadError(path, reason, fix[:1].upper() + fix[1:] + ".")
        limit = MAX_MEMBER_BYTES
        if info.st_size > limit:
            raise ImageReadError(
                path,
                f"file is {info.st_size:,} bytes, over the limit of {limit:,} for one image",
                "Give a smaller image (export it at a lower resolution).",
            )
        try:
            data = fh.read(limit + 1)  # a file that grows while read stops at the bound
        except OSError as err:
            raise ImageReadError(path, f"cannot be read ({err.strerror})", "Check the file and the disk.") from err
    if len(data) > limit:
        raise ImageReadError(
            path, f"file grew past the limit of {limit:,} bytes while read", "Copy the image somewhere it does not change."
        )
    return data


def read_zip_member(archive: zipfile.ZipFile, member: str, name: str) -> bytes:
    """The bytes of ``member``, or :class:`ImageReadError` (``name`` in its message) if it cannot be one image.

    Its declared size and compression ratio are checked before anything is decompressed
    (:data:`MAX_MEMBER_BYTES`, :data:`MAX_COMPRESSION_RATIO`), and it is read with that bound,
    so a member whose header lies about its size still stops there. A damaged member (bad
    CRC, broken deflate stream, encrypted, unknown compression) is refused with the reason.
    The bounds are read when called, not when defined.
    """
    try:
        info = archive.getinfo(member)
    except KeyError as err:
        raise ImageReadError(name, "no such member in the archive", "Check the name, or copy the archive again.") from err
    _check_member(info, name)
    try:
        with archive.open(info) as fh:
            data = fh.read(MAX_MEMBER_BYTES + 1)  # read(n) never returns more than n bytes, whatever the header says
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError) as err:
        raise ImageReadError(
            name, f"cannot be read from the archive ({err})", "Copy the archive again, or unpack it and give the folder."
        ) from err
    if len(data) > MAX_MEMBER_BYTES:
        raise ImageReadError(
            name,
            f"archive member holds more than {MAX_MEMBER_BYTES:,} bytes (the limit) although its header declares "
            f"{info.file_size:,}: a damaged or forged archive",
            _ZIP_FIX,
        )
    return data


def _check_member(info: zipfile.ZipInfo, name: str) -> None:
    """Refuse a member whose header declares too many bytes, or too many for its compressed size (a zip bomb)."""
    size, packed = info.file_size, info.compress_size
    if size > MAX_MEMBER_BYTES:
        raise ImageReadError(
            name,
            f"archive member declares {size:,} bytes uncompressed, over the limit of {MAX_MEMBER_BYTES:,} (possible zip bomb)",
            _ZIP_FIX,
        )
    if size >= MIN_RATIO_CHECKED and size > MAX_COMPRESSION_RATIO * packed:
        raise ImageReadError(
            name,
            f"archive member expands {size / max(packed, 1):,.0f}x ({packed:,} -> {size:,} bytes), over the limit"
            f" of {MAX_COMPRESSION_RATIO}x (possible zip bomb)",
            _ZIP_FIX,
        )


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


# What pydicom raises for a header value it cannot interpret: a malformed number (ValueError:
# NumberOfFrames "x", WindowCenter "abcd"), a LUT item without its descriptor or data
# (AttributeError, KeyError), a LUT shorter than its descriptor says (IndexError), a LUT depth
# it does not handle (NotImplementedError: 0 bits), a value of the wrong kind (TypeError), a
# number out of range (OverflowError). DICOM in the wild holds all of these.
_HEADER_ERRORS = (ValueError, TypeError, KeyError, AttributeError, IndexError, NotImplementedError, OverflowError)
_HEADER_FIX = "Correct the header (e.g. with dcmodify) or export the image as PNG."


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
        except (InvalidDicomError, EOFError, OSError, *_HEADER_ERRORS):
            return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size[0] * img.size[1]
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError):
        return None


_DICOM_FIX = "Export the frontal radiograph as a single-frame grayscale DICOM (or PNG)."


def read_dicom(path: str | os.PathLike, data: bytes, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode a grayscale radiograph DICOM into float32 (H, W) in [0, 1], as a viewer would show it.

    Modality LUT (rescale slope/intercept) first, then the VOI transform: a VOI LUT
    sequence or window centre/width (LINEAR, LINEAR_EXACT or SIGMOID, DICOM PS3.3
    C.11.2.1.2); without either, the full range of the image. MONOCHROME1 (white is
    zero) is inverted. Multi-frame, colour and pixel-less objects (reports, plans)
    are refused with the reason.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, EOFError, OSError, *_HEADER_ERRORS) as err:
        raise ImageReadError(path, f"not a readable DICOM file ({err})", _DICOM_FIX, kind="unsupported") from err
    return dicom_to_image(ds, path, max_pixels=max_pixels)


@contextmanager
def _interpreting(path, what: str) -> Iterator[None]:
    """An error raised while interpreting the header's ``what`` -> :class:`ImageReadError` naming it and pydicom's reason."""
    try:
        yield
    except ImageReadError:
        raise
    except _HEADER_ERRORS as err:
        raise ImageReadError(path, f"DICOM {what} cannot be interpreted ({type(err).__name__}: {err})", _HEADER_FIX) from err


def dicom_to_image(ds, path: str | os.PathLike = "DICOM dataset", *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A parsed pydicom ``Dataset`` -> float32 (H, W) in [0, 1]: the pixel half of :func:`read_dicom`.

    Every header value is interpreted under :func:`_interpreting`: one that cannot be (a
    malformed number, a LUT without its descriptor or data, or shorter than its descriptor
    says) is an :class:`ImageReadError` naming that part of the header, so the file is
    skipped like any unreadable image.
    """
    with _interpreting(path, "header (NumberOfFrames, PhotometricInterpretation, Rows, Columns)"):
        photometric = _check_dicom(ds, path, max_pixels)
    try:
        stored = ds.pixel_array
    except Exception as err:  # pydicom raises many kinds: truncated data, missing codec
        raise ImageReadError(path, f"DICOM pixel data cannot be decoded ({type(err).__name__}: {err})", _DICOM_FIX) from err
    with _interpreting(path, "Modality LUT or rescale (ModalityLUTSequence, RescaleSlope, RescaleIntercept)"):
        values = _modality(ds, stored)
    del stored
    with _interpreting(path, "VOI LUT or window (VOILUTSequence, WindowCenter, WindowWidth, VOILUTFunction)"):
        arr = _voi(ds, values, path)
    np.clip(arr, 0.0, 1.0, out=arr)
    if photometric == "MONOCHROME1":
        np.subtract(1.0, arr, out=arr)
    return np.ascontiguousarray(arr, dtype=np.float32)


def _check_dicom(ds, path, max_pixels: int) -> str:
    """Refuse what is not one grayscale radiograph within the pixel limit; its PhotometricInterpretation."""
    if "PixelData" not in ds:
        sop = getattr(ds.get("SOPClassUID"), "name", None) or ds.get("SOPClassUID", "unknown SOP class")
        raise ImageReadError(path, f"DICOM object has no pixel data ({sop}): not an image", _DICOM_FIX)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageReadError(path, f"DICOM holds {frames} frames; one radiograph per file is expected", _DICOM_FIX)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageReadError(
            path, f"DICOM is colour ({photometric or 'no PhotometricInterpretation'}); chest radiographs are grayscale", _DICOM_FIX
        )
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if rows * cols > max_pixels:
        raise ImageReadError(path, f"DICOM is {cols}x{rows}, over the limit of {max_pixels:,} pixels", "Downscale the image or remove it.")
    return photometric


def _modality(ds, stored: np.ndarray) -> np.ndarray:
    """Stored values -> modality values (Modality LUT, or rescale slope/intercept), float32.

    float32 and in place from here on: a 64-megapixel image is 256 MB per float32 copy,
    and float64 temporaries took one decode to 1.6 GB. Stored values are at most 16 bits,
    so float32 holds them exactly.
    """
    from pydicom.pixels import apply_modality_lut

    if "ModalityLUTSequence" in ds:
        return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    values = stored.astype(np.float32)
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    if (slope, intercept) != (1.0, 0.0):
        values *= slope
        values += intercept
    return values


def _voi(ds, values: np.ndarray, path) -> np.ndarray:
    """Modality values -> [0, 1] as shown: the VOI LUT, else the window, else the full range (in place where it can)."""
    from pydicom.pixels import apply_voi_lut

    if "VOILUTSequence" in ds:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return np.asarray(apply_voi_lut(np.rint(values).astype(np.int64), ds, index=0), dtype=np.float32) / (2**bits - 1)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        centre, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        return _window(values, centre, width, str(ds.get("VOILUTFunction", "LINEAR")).upper(), path)
    lo, hi = float(values.min()), float(values.max())
    values -= lo
    values *= 1.0 / (hi - lo) if hi > lo else 0.0
    return values


def _first(value) -> float:
    """The first of several windows (a viewer's default), or the only one.

    A value pydicom could not read as a number is kept as text ("abcd"): float() refuses
    it whole, where indexing it would have taken its first character.
    """
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        value = value[0]
    return float(value)


def _window(x: np.ndarray, centre: float, width: float, function: str, path="") -> np.ndarray:
    """DICOM window to [0, 1] (PS3.3 C.11.2.1.2.1-3), in place on float ``x``.

    The standard requires Window Width >= 1 for LINEAR and > 0 for LINEAR_EXACT and
    SIGMOID; a header that breaks it (a width of 0 would divide by zero) is refused
    rather than guessed at.

    Not ``pydicom.pixels.apply_windowing``, although it computes the same curves (to one
    float32 rounding, tests/data/test_dicom.py checks it): it works on a float64 copy with
    boolean masks, 15 bytes a pixel on top of the input where this takes none, which breaks
    the 8-bytes-a-pixel budget of a decode (a 64-megapixel upload); it scales to the range
    of BitsStored and PixelRepresentation, writes those back into the dataset, and raises a
    bare ValueError without the file's name. The VOI LUT sequence, which has no such cost,
    goes through pydicom's ``apply_voi_lut``.
    """
    smallest = 1.0 if function == "LINEAR" else 0.0
    if not (np.isfinite(centre) and np.isfinite(width)) or width < smallest or (width == 0.0):
        rule = ">= 1" if function == "LINEAR" else "> 0"
        raise ImageReadError(
            path,
            f"DICOM window is invalid: WindowCenter {centre!r}, WindowWidth {width!r} (must be finite, width {rule} for {function})",
            "Fix the header's WindowCenter/WindowWidth (or remove both to show the full range), or export as PNG.",
        )
    if function == "SIGMOID":
        x -= centre
        x *= -4.0 / width
        np.exp(x, out=x)
        x += 1.0
        return np.reciprocal(x, out=x)
    if function == "LINEAR_EXACT":
        x -= centre
        x /= width
    elif width == 1.0:  # LINEAR with width 1 is a hard threshold at the centre (PS3.3 C.11.2.1.2.1)
        return np.greater(x, centre - 0.5, out=np.empty(x.shape, bool)).astype(x.dtype)
    else:
        x -= centre - 0.5
        x /= width - 1.0
    x += 0.5
    return x


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
