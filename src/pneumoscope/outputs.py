"""Write results so that nothing is half-written and nothing earlier is lost silently."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputExistsError

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary file beside ``path`` to write; on success it becomes ``path``, whole.

    The one write-to-temp-then-rename of the package. The temporary name starts with
    :func:`partial_name` (the pid: :func:`remove_orphans` recognises a killed write) and
    ends with ``suffix`` (for a library that insists on one, e.g. ``.npy``). The file
    exists, empty, when the block starts. When the block ends normally the file is
    fsynced, given the permissions the user's umask gives a new file (mkstemp alone makes
    it 0600) and renamed into place; when it raises, the temporary file is removed and
    ``path`` is left as it was. An OSError about the temporary file (or about no file,
    like a full disk) names ``path``, the file the user asked for.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=partial_name(path), suffix=suffix)
        os.close(fd)
    except OSError as err:
        named = naming_path(err, path)
        if named is err:
            raise
        raise named from err
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and _about_staging(err, path):
            named = naming_path(err, path)
            if named is not err:
                raise named from err
        raise


def _about_staging(err: OSError, path: Path) -> bool:
    """Whether ``err`` is about a staging file of ``path`` (or about no file: a full disk), not some other file."""
    if err.filename is None:
        return True
    return isinstance(err.filename, str | bytes | os.PathLike) and os.path.basename(os.fsdecode(err.filename)).startswith(
        partial_name(path)
    )


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so that readers see the old content or the new, never half (:func:`atomic_file`)."""
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        _write_all(fh, data)


def _write_all(fh, data: bytes) -> None:
    """The one place bytes reach the disk (tests simulate a full disk here); :func:`atomic_file` fsyncs them."""
    fh.write(data)


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask sets it to read it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def naming_path(err: OSError, path: Path) -> OSError:
    """The same error, naming ``path`` (the file the user asked for) instead of a temporary one."""
    if err.errno is None:
        return err
    return type(err)(err.errno, err.strerror, str(path))


# errno -> (what happened, the fix): one line instead of a traceback
_OS_ERRORS = {
    errno.ENOSPC: (
        "no space left on the device",
        "free space there, or write to another disk (--out; --cache-dir or $PNEUMOSCOPE_CACHE for the cache)",
    ),
    errno.EDQUOT: (
        "disk quota exceeded",
        "free space there, or write to another disk (--out; --cache-dir or $PNEUMOSCOPE_CACHE for the cache)",
    ),
    errno.EROFS: ("the file system is read-only", "write somewhere writable (--out; --cache-dir or $PNEUMOSCOPE_CACHE for the cache)"),
    errno.EACCES: ("permission denied", "write somewhere you may write, or fix the permissions"),
    errno.EPERM: ("operation not permitted", "write somewhere you may write, or fix the permissions"),
    errno.ENAMETOOLONG: ("file name too long (the limit is usually 255 bytes per name)", "use a shorter file or folder name"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.ELOOP: ("too many levels of symbolic links (a link cycle)", "fix or remove the link"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) or use fewer --workers"),
}


def describe_os_error(err: OSError) -> str:
    """One line for an OSError: ``<path>: <what happened>. Fix: <fix>``.

    Errors raised with a message of their own (no errno) keep it.
    """
    if err.errno is None:
        return " ".join(str(err).split())
    what, fix = _OS_ERRORS.get(err.errno, (err.strerror or errno.errorcode.get(err.errno, "error"), "check the path and try again"))
    where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
    return f"{where}: {what}. Fix: {fix}." if where else f"{what}. Fix: {fix}."


def npy_bytes(arr) -> bytes:
    """An array serialised as .npy (no pickle), ready for :func:`write_bytes_atomic`."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.asarray(arr), allow_pickle=False)
    return buf.getvalue()


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON, atomically (numpy values and paths converted)."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n").encode())


def _jsonable(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a non-empty output folder unless ``overwrite``, or one that cannot be written; called before any work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} exists and is not a folder. Choose another --out.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputExistsError(f"{path} is not empty; pass --overwrite to replace it, or choose another --out.")
    check_writable(path)
    return path


def check_writable(path: str | os.PathLike) -> None:
    """Fail now, not after the work, if ``path`` cannot be created beside its siblings.

    Outputs are staged next to ``path`` and renamed, so its parent (or the nearest
    folder that exists above it) must take a new entry. A real probe, not
    ``os.access``: root passes every permission check, but not a read-only mount
    or a full disk.
    """
    folder = Path(path).absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        os.rmdir(tempfile.mkdtemp(dir=folder, prefix=".pneumoscope-probe-"))
    except OSError as err:
        raise naming_path(err, folder) from err


def partial_name(path: Path) -> str:
    """The prefix of ``path``'s staging names; the pid tells a later run whether its owner is gone."""
    return f".{path.name}.partial-{os.getpid()}-"


def remove_orphans(path: str | os.PathLike) -> None:
    """Clean up after runs that were killed while writing ``path``.

    Staging entries (``.NAME.partial-PID-*``) whose process is gone are removed. A
    ``.NAME.old-PID`` is the previous result, moved aside for a moment while the new one
    took its place: it is put back if ``path`` is missing, else removed.
    """
    path = Path(path).absolute()
    # one leading dot, or two: a staged file's own temporary file (``..NAME.partial-PID-unverified.onnx.*.tmp``)
    pattern = re.compile(rf"^\.\.?{re.escape(path.name)}\.(partial|old)-(\d+)(?:[-.].*)?$")
    try:
        entries = sorted(path.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or process_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not path.exists():
            logger.warning("restoring %s from %s (a run was killed while replacing it)", path, entry)
            os.replace(entry, path)
            continue
        logger.warning("removing %s, left by a run that was killed (process %s has ended)", entry, m.group(2))
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` is running (this process, or one that exists, someone else's included)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging folder beside ``path``; on success it becomes ``path``.

    On failure the staging folder is removed and ``path`` is left as it was. With
    ``overwrite`` an earlier ``path`` is replaced only once the new one is complete.
    Staging folders left by killed runs are removed first (:func:`remove_orphans`).
    """
    path = check_output_dir(path, overwrite).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=partial_name(path)))
    os.chmod(staging, 0o777 & ~current_umask())
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if path.exists():
        check_output_dir(path, overwrite)  # it may have been filled meanwhile
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(staging, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_csv(path: str | os.PathLike, header: list[str], rows) -> None:
    """Write a header and rows as CSV, atomically."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    write_bytes_atomic(path, buf.getvalue().encode())
