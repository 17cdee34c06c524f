"""Decode image files into float32 grayscale arrays. No torch here.

``read_image`` is the one decoder every other module uses, so training,
evaluation and inference see the same pixels.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff"})

# A radiograph from a large detector is about 4,300 x 3,500 (15 MP); Kaggle's
# largest chest_xray JPEG is about 2,900 x 2,900. Anything far beyond is more
# likely a decompression bomb than an X-ray.
MAX_PIXELS = 64_000_000


class ImageReadError(ValueError):
    """An image file that cannot be used, with the reason and the fix."""

    def __init__(self, path: str | os.PathLike, reason: str, fix: str):
        self.path = str(path)
        self.reason = reason
        self.fix = fix
        super().__init__(f"{self.path}: {reason}. {fix}")


def is_image_path(path: str | os.PathLike) -> bool:
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
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            raise ImageReadError(path, f"cannot be read ({err.strerror})", "Check the path and permissions.") from err
    if len(data) == 0:
        raise ImageReadError(path, "file is empty (0 bytes)", "Re-copy or remove the file.")
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
            path, "not a readable image (unknown format or not an image)", "Remove it or convert it to PNG or JPEG."
        ) from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageReadError(
            path, f"image is corrupt or truncated ({err})", "Re-export or re-download the file, or remove it."
        ) from err


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


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to ``size`` x ``size`` without keeping the aspect ratio (bilinear, antialiased).

    Squashing matches the Kaggle copies that were already squashed to 224 x 224
    and Keras' ``image_dataset_from_directory`` default.
    """
    if image.shape == (size, size):
        return image.astype(np.float32, copy=False)
    resized = Image.fromarray(np.asarray(image, dtype=np.float32)).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)
