"""Process-level state: the command line's settings (never applied on import), and PyTorch's global
RNG seeded for a block and restored after it."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import sys
import warnings

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def tune_cpu_allocator() -> bool:
    """Keep glibc from mmap/munmap-ing every large activation buffer.

    PyTorch's CPU inference allocates and frees tens of MB per layer; glibc
    serves each with a fresh mmap and returns it on free, so every batch
    page-faults its activations in again. On a small machine that made
    EfficientNet-Lite0 feature extraction several times slower (see
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
    global _VERBOSE
    _VERBOSE = verbose
    if not verbose:
        # pydicom warns of header values it cannot interpret or adjusts, as a Python warning with its source line; a file
        # that cannot be used is refused and its row names the value and the fix; the rest is for -v, which shows them
        warnings.filterwarnings("ignore", category=UserWarning, module="pydicom")
    if verbose:
        root.setLevel(logging.INFO)
        root.addHandler(handler)  # pneumoscope's records reach it by propagation
    else:
        own.addHandler(handler)


_VERBOSE = False  # set by configure_logging


def quiet_lightning() -> None:
    """Lightning's loggers from WARNING, like every other library's (unless the command line is verbose).

    Lightning sets its own loggers to INFO, with a handler, when it is imported ("GPU available: False", a tip to
    install a cloud logger, "Trainer.fit stopped"); call this after that import, before a Trainer is made."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.INFO if _VERBOSE else logging.WARNING)


def progress_wanted(*, quiet: bool = False) -> bool:
    """Whether the command line shows progress: not with ``-q``. :func:`progress_bar` draws a bar
    when stderr is a terminal and logs a line about every 10 s otherwise."""
    return not quiet


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


# --------------------------------------------------------------------------- CPUs this process can use


def available_cpus() -> int:
    """CPUs this process may actually run on: its affinity mask, capped by a cgroup CPU quota.

    ``os.cpu_count()`` (and PyTorch's default thread count) counts the machine's CPUs, so a
    container limited to 2 of 16 CPUs by ``cpu.max``, or a job pinned by ``taskset``, would run
    more compute threads than it gets CPUs, and each parallel region would wait for a thread
    that is not running.
    """
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None and quota > 0:
        n = min(n, max(1, int(quota + 0.5)))
    return max(1, n)


def _cgroup_cpu_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """The cgroup v2 ``cpu.max`` (or v1 ``cpu.cfs_quota_us``) quota in CPUs, or None when unlimited or unknown."""
    for quota_file, period_file in ((f"{root}/cpu.max", None), (f"{root}/cpu/cpu.cfs_quota_us", f"{root}/cpu/cpu.cfs_period_us")):
        try:
            with open(quota_file) as fh:
                text = fh.read().split()
            if period_file is not None:
                with open(period_file) as fh:
                    text = [text[0], fh.read().strip()]
            quota, period = text[0], text[1]
        except (OSError, IndexError):
            continue
        if quota in ("max", "-1"):
            return None
        try:
            return int(quota) / int(period)
        except (ValueError, ZeroDivisionError):
            return None
    return None


def configure_cpu_threads() -> int:
    """Compute threads for this process, set before PyTorch or ONNX Runtime start their pools. Returns the count.

    One thread per CPU the process can get (:func:`available_cpus`), and OpenMP threads that
    sleep rather than spin while they wait (``OMP_WAIT_POLICY=PASSIVE``): with other programs
    competing for the CPUs, a spinning thread burns the time slice that its partner needs to
    finish the parallel region, which made the shortcut audit lose twice its share of the CPU
    (BENCHMARKS.md, "Contention"). Settings the user made in the environment win; PyTorch's
    count is set too when torch is already imported.
    """
    n = available_cpus()
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch = sys.modules.get("torch")
    threads = int(os.environ["OMP_NUM_THREADS"]) if os.environ["OMP_NUM_THREADS"].isdigit() else n
    if torch is not None:
        torch.set_num_threads(max(1, threads))
    return threads


# --------------------------------------------------------------------------- child processes

_PR_SET_PDEATHSIG = 1


def die_with_parent(*_) -> None:
    """Make this (child) process receive SIGKILL when its parent dies, however the parent dies.

    A DataLoader worker otherwise outlives a parent killed with SIGKILL: blocked writing to a
    queue nobody reads, it holds its memory (hundreds of MB each for ``predict``) until killed by
    hand. Linux only (``prctl(PR_SET_PDEATHSIG)``); elsewhere PyTorch's own watchdog remains.
    Takes and ignores the worker id, so it can be a DataLoader's ``worker_init_fn``.
    """
    if not sys.platform.startswith("linux"):
        return
    import signal

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent or parent == 1:  # the parent died before the signal was armed
        os._exit(1)


# --------------------------------------------------------------------------- progress

PROGRESS_LOG_EVERY_S = 10.0


def progress_bar(iterable=None, *, total: int | None = None, desc: str, unit: str = "it", enabled: bool = True):
    """Progress of a phase: a tqdm bar when stderr is a terminal, else a log line about every
    10 s (done/total, rate, time left), so a log file shows a long phase is alive without
    filling with carriage-return frames. ``enabled=False`` shows nothing. Use it as tqdm:
    iterate over it, or ``update(n)``, ``set_postfix(...)``, ``close()``, or a ``with`` block."""
    if enabled and sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True)
    return _LogProgress(iterable, total=total, desc=desc, unit=unit, enabled=enabled)


class _LogProgress:
    """tqdm's small surface (iteration, update, set_postfix, close, context manager), logged at INFO every 10 s."""

    def __init__(self, iterable, *, total: int | None, desc: str, unit: str, enabled: bool, clock=None):
        import time

        self.iterable, self.desc, self.unit, self.enabled = iterable, desc, unit, enabled
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.postfix = 0, ""
        self._clock = clock or time.monotonic
        self._start = self._last = self._clock()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self._clock()
        if self.enabled and now - self._last >= PROGRESS_LOG_EVERY_S:
            self._last = now
            logger.info("%s", self.line(now))

    def line(self, now: float) -> str:
        elapsed = now - self._start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        done = f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"
        left = ""
        if self.total and rate > 0:
            left = f", about {_duration((self.total - self.n) / rate)} left"
        extra = f" ({self.postfix})" if self.postfix else ""
        return f"{self.desc}: {done} after {_duration(elapsed)} ({rate:.1f} {self.unit}/s){left}{extra}"

    def close(self) -> None:
        pass


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"
