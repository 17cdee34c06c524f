"""Errors a user can fix are PneumoscopeErrors (and keep their built-in class); the command line gives
them one line, and treats any other exception as a bug whose traceback is logged."""

import ast
import logging
import re
from pathlib import Path

import pytest

import pneumoscope
from pneumoscope.cli import error_line
from pneumoscope.errors import MissingFileError, PneumoscopeError, StateError, UsageError

SRC = Path(pneumoscope.__file__).parent


def _kinds():
    from pneumoscope.checkpoint import CheckpointError
    from pneumoscope.data import DataError
    from pneumoscope.download import DownloadError
    from pneumoscope.io import ImageReadError
    from pneumoscope.outputs import OutputExistsError

    return [(DataError, ValueError), (ImageReadError, ValueError), (CheckpointError, ValueError), (OutputExistsError, FileExistsError),
            (DownloadError, ConnectionError), (UsageError, ValueError), (MissingFileError, FileNotFoundError), (StateError, RuntimeError)]


def test_every_user_error_is_a_pneumoscope_error_and_keeps_its_builtin_class():
    for kind, builtin in _kinds():
        assert issubclass(kind, PneumoscopeError) and issubclass(kind, builtin), kind
    assert pneumoscope.PneumoscopeError is PneumoscopeError and "PneumoscopeError" in pneumoscope.__all__


def test_no_builtin_exception_carries_a_message_for_the_user():
    """A raise of a bare built-in whose message gives a fix or names a flag would be printed as a bug."""
    offenders = []
    for path in sorted(SRC.glob("*.py")):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
                if node.exc.func.id in ("ValueError", "RuntimeError", "FileNotFoundError", "ConnectionError", "OSError"):
                    text = ast.get_source_segment(source, node)
                    if "Fix:" in text or re.search(r"--[a-z]", text) or "pneumoscope " in text:
                        offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


@pytest.mark.parametrize("kind", [UsageError, MissingFileError, StateError])
def test_a_pneumoscope_error_is_one_line_without_a_traceback(kind, caplog):
    with caplog.at_level(logging.DEBUG, logger="pneumoscope"):
        line = error_line(kind("--out x.txt: the suffix names no format.\nFix: end it in .csv"))
    assert line == "--out x.txt: the suffix names no format. Fix: end it in .csv" and not caplog.records


@pytest.mark.parametrize("err", [ValueError("could not broadcast"), RuntimeError("index out of range"), KeyError("threshold")])
def test_any_other_error_is_a_bug_and_its_traceback_is_logged(err, caplog):
    try:
        raise err
    except Exception as raised:
        with caplog.at_level(logging.DEBUG, logger="pneumoscope"):
            line = error_line(raised)
    assert line.startswith(f"unexpected {type(err).__name__}:")
    assert any("a bug: please report it" in r.getMessage() and r.exc_info for r in caplog.records)


def test_os_and_memory_errors_stay_one_line(caplog):
    import errno

    with caplog.at_level(logging.DEBUG, logger="pneumoscope"):
        assert "no space left" in error_line(OSError(errno.ENOSPC, "No space left on device", "/out/x.json"))
        assert error_line(MemoryError()).startswith("out of memory")
    assert not caplog.records
