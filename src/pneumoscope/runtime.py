"""Process-level state: the command line's settings (never applied on import), and PyTorch's global
RNG seeded for a block and restored after it."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
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


LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record arrives, so a redirection (or a test's capture) made later is honoured."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def configure_logging(*, quiet: bool = False, verbose: bool = False) -> None:
    """The command line's logging: pneumoscope's INFO on stderr; third-party libraries only from WARNING.

    Only the ``pneumoscope`` logger gets a handler, so a dependency's INFO chatter (onnx_ir
    printed 78 lines per export when the root logger was set to INFO) stays silent; their
    warnings still reach stderr through logging's last-resort handler. ``quiet``: warnings
    and errors only. ``verbose``: pneumoscope's DEBUG and every library's INFO. Calling it
    again replaces the handler it installed rather than adding a second one.
    """
    own, root = logging.getLogger("pneumoscope"), logging.getLogger()
    for lg in (own, root):
        for h in [h for h in lg.handlers if isinstance(h, _StderrHandler)]:
            lg.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(logging.WARNING if quiet else logging.NOTSET)
    own.setLevel(logging.DEBUG if verbose else logging.INFO)
    if verbose:
        root.setLevel(logging.INFO)
        root.addHandler(handler)  # pneumoscope's records reach it by propagation
    else:
        own.addHandler(handler)


def progress_wanted(*, quiet: bool = False) -> bool:
    """Whether the command line shows progress bars: not with ``-q``, and not when stderr is
    not a terminal (a log file would fill with carriage-return frames)."""
    return not quiet and sys.stderr.isatty()


@contextlib.contextmanager
def seeded_rng(seed: int):
    """PyTorch's global CPU generator seeded with ``seed`` inside the block, and restored after it.

    For code that draws from the global generator and takes no other (``reset_parameters``,
    dropout, ``torch.randn_like`` inside a library): its draws are reproducible, and the
    caller's random stream (``torch.initial_seed()`` included) is as it was.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


# Set by the launchers that start the processes of a distributed run: Lightning's DDP (LOCAL_RANK, NODE_RANK),
# torchrun (RANK, LOCAL_RANK, GROUP_RANK for the node).
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


def is_launched_rank() -> bool:
    """True in a process a distributed launcher started beside the first one, on this node or another:
    it joins the fit, and leaves the output folder, its work folder and the run's files to the first."""
    return any(int(os.environ.get(k) or 0) > 0 for k in _RANK_VARIABLES)
