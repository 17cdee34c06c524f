"""Errors a user can fix. Imports nothing heavy, so any module (and any caller) can use them.

Every error pneumoscope raises for its user (bad data, a bad path, flag or setting, a
damaged or foreign file, state left by another run) is a :class:`PneumoscopeError`, and its
message says the rule, the value and the fix. The command line prints such an error as one
line; any other exception is a bug, and its traceback is logged. Each subclass keeps the
built-in exception it replaced as a second base, so ``except ValueError`` still catches it.

Every kind is here, in this module.
"""

from __future__ import annotations

import os


class PneumoscopeError(Exception):
    """An error the user can fix; its message says how."""


class UsageError(PneumoscopeError, ValueError):
    """A flag, setting, argument or input that cannot be used as given."""


class MissingFileError(PneumoscopeError, FileNotFoundError):
    """A file or folder the command needs is not there."""


class StateError(PneumoscopeError, RuntimeError):
    """What the command found stops it: state left by another run, a package or network it needs, a check its result failed."""


# What an ImageReadError is about, set where it is raised (serve maps it to an HTTP status):
# "unsupported": not an image, or a format no decoder here reads; "damaged": everything else
# (an empty, truncated, corrupt or oversized file of a known format, an unusable decode).
ERROR_KINDS = ("damaged", "unsupported")


class ImageReadError(PneumoscopeError, ValueError):
    """An image file that cannot be used, with the reason, the fix and its :data:`kind <ERROR_KINDS>`."""

    def __init__(self, path: str | os.PathLike, reason: str, fix: str, *, kind: str = "damaged"):
        if kind not in ERROR_KINDS:
            raise ValueError(f"kind must be one of {ERROR_KINDS}, got {kind!r}")
        self.path = str(path)
        self.reason = reason
        self.fix = fix
        self.kind = kind
        super().__init__(f"{self.path}: {self.detail}")

    @property
    def detail(self) -> str:
        """The reason and the fix: how a skipped file is recorded beside its path (skipped.csv, a prediction's ``error``)."""
        return f"{self.reason}. {self.fix}"


class DataError(PneumoscopeError, ValueError):
    """A dataset that cannot be used as given, with the fix."""


class CheckpointError(PneumoscopeError, ValueError):
    """A checkpoint (or ONNX export) whose description cannot be used as it stands."""


class OutputExistsError(PneumoscopeError, FileExistsError):
    """An output that is there already and is not replaced without --overwrite."""


class DownloadError(PneumoscopeError, ConnectionError):
    """The download failed: no network, or the server did not answer."""
