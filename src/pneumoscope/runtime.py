"""Process-level settings for the command line (never applied on import)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def tune_cpu_allocator() -> bool:
    """Keep glibc from mmap/munmap-ing every large activation buffer.

    PyTorch's CPU inference allocates and frees tens of MB per layer; glibc
    serves each with a fresh mmap and returns it on free, so every batch
    page-faults its activations in again. On 2 cores that tripled the time of
    EfficientNet-Lite0 feature extraction (36 -> 111 images/s measured, see
    BENCHMARKS.md). Serving them from the heap, and not trimming it below 1 GiB,
    removes the faults. Returns whether the setting was applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    logger.debug("glibc allocator tuned: %s", ok)
    return ok
