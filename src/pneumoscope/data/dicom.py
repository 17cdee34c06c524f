"""Decode a grayscale radiograph DICOM into float32 (H, W) in [0, 1] as a viewer shows it, refusing what its header rules out."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from ..errors import ImageReadError
from .bounded import MAX_PIXELS

# What pydicom raises for a header value it cannot interpret: a malformed number (ValueError:
# NumberOfFrames "x", WindowCenter "abcd"), a LUT item without its descriptor or data
# (AttributeError, KeyError), a LUT shorter than its descriptor says (IndexError), a LUT depth
# it does not handle (NotImplementedError: 0 bits), a value of the wrong kind (TypeError), a
# number out of range (OverflowError). DICOM in the wild holds all of these.
HEADER_ERRORS = (ValueError, TypeError, KeyError, AttributeError, IndexError, NotImplementedError, OverflowError)
_HEADER_FIX = "Correct the header (e.g. with dcmodify) or export the image as PNG."
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
    except (InvalidDicomError, EOFError, OSError, *HEADER_ERRORS) as err:
        raise ImageReadError(path, f"not a readable DICOM file ({err})", _DICOM_FIX, kind="unsupported") from err
    return dicom_to_image(ds, path, max_pixels=max_pixels)


@contextmanager
def _interpreting(path, what: str) -> Iterator[None]:
    """An error raised while interpreting the header's ``what`` -> :class:`ImageReadError` naming it and pydicom's reason."""
    try:
        yield
    except ImageReadError:
        raise
    except HEADER_ERRORS as err:
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
