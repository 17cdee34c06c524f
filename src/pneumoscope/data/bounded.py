"""Bounds on what is read for one image (its pixels, its bytes), and regular files and zip members read within them."""

from __future__ import annotations

import os
import stat
import zipfile
import zlib

from ..errors import ImageReadError

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


_ZIP_FIX = "Unpack the archive and check the file, or remove it from the archive."

# A --from-list of 2.5 million paths of 100 characters; a settings file is a page of `name: value` lines.
MAX_LIST_BYTES = 256_000_000
MAX_CONFIG_BYTES = 1_000_000


_NOT_READ = "not an image file; only regular files are read"
_GIVE_THE_FILE = "Give the image file itself."


def _kind(mode: int) -> str:
    """What a file that is not regular is: a FIFO, a device, a socket."""
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "a socket" if stat.S_ISSOCK(mode) else "not a regular file"


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
    kind = _kind(mode)
    return f"{kind}, {_NOT_READ}. {_GIVE_THE_FILE}"


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
        if not stat.S_ISREG(info.st_mode):  # the same words as not_regular_file's, as a skipped row carries them
            raise ImageReadError(path, f"{_kind(info.st_mode)}, {_NOT_READ}", _GIVE_THE_FILE)
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


def read_regular(path: str | os.PathLike, limit: int, *, pipes: bool = False) -> bytes:
    """A file's bytes, at most ``limit``: a regular file, or with ``pipes`` also a FIFO (a shell's ``<(...)``), read
    to its end within the bound. A device (``/dev/zero`` never ends) or a socket is refused unread.

    Raises OSError when it cannot be opened, ValueError (with the reason) for a device or a file over ``limit``."""
    nonblock = 0 if pipes else getattr(os, "O_NONBLOCK", 0)  # a FIFO that is not wanted is refused, not waited on
    fd = os.open(path, os.O_RDONLY | nonblock | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        if not (stat.S_ISREG(info.st_mode) or (pipes and stat.S_ISFIFO(info.st_mode))):
            raise ValueError(f"{_kind(info.st_mode)}, not a regular file")
        too_big = ValueError(f"holds more than {limit:,} bytes, the limit")
        if info.st_size > limit:  # a regular file's size is known: refused before a byte is read
            raise too_big
        data = fh.read(limit + 1)  # a pipe's is not, nor a file's that grows: read to the bound
    if len(data) > limit:
        raise too_big
    return data


def read_text(path: str | os.PathLike, limit: int, *, pipes: bool = False) -> str:
    """A UTF-8 text file's content, read by :func:`read_regular`; bytes that are not UTF-8 raise ValueError
    (UnicodeDecodeError)."""
    return read_regular(path, limit, pipes=pipes).decode("utf-8")


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
