"""Errors a user can fix. Imports nothing heavy, so any module (and any caller) can use them.

Every error pneumoscope raises for its user (bad data, a bad path, flag or setting, a
damaged or foreign file, state left by another run) is a :class:`PneumoscopeError`, and its
message says the rule, the value and the fix. The command line prints such an error as one
line; any other exception is a bug, and its traceback is logged. Each subclass keeps the
built-in exception it replaced as a second base, so ``except ValueError`` still catches it.

The modules' own kinds: ``data.DataError``, ``io.ImageReadError``, ``description.CheckpointError``,
``outputs.OutputExistsError``.
"""

from __future__ import annotations


class PneumoscopeError(Exception):
    """An error the user can fix; its message says how."""


class UsageError(PneumoscopeError, ValueError):
    """A flag, setting, argument or input that cannot be used as given."""


class MissingFileError(PneumoscopeError, FileNotFoundError):
    """A file or folder the command needs is not there."""


class StateError(PneumoscopeError, RuntimeError):
    """What the command found stops it: state left by another run, a package or network it needs, a check its result failed."""
