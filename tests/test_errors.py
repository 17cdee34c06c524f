"""Errors a user can fix are PneumoscopeErrors (and keep their built-in class); the command line gives
them one line, and treats any other exception as a bug whose traceback is logged."""

import ast
import logging
import re
from pathlib import Path

import pytest

import pneumoscope
from pneumoscope.cli.main import error_line
from pneumoscope.errors import MissingFileError, PneumoscopeError, StateError, UsageError

SRC = Path(pneumoscope.__file__).parent


def _kinds():
    from pneumoscope.errors import CheckpointError, DataError, DownloadError, ImageReadError, OutputExistsError

    return [
        (DataError, ValueError),
        (ImageReadError, ValueError),
        (CheckpointError, ValueError),
        (OutputExistsError, FileExistsError),
        (DownloadError, ConnectionError),
        (UsageError, ValueError),
        (MissingFileError, FileNotFoundError),
        (StateError, RuntimeError),
    ]


def test_every_user_error_is_a_pneumoscope_error_and_keeps_its_builtin_class():
    for kind, builtin in _kinds():
        assert issubclass(kind, PneumoscopeError) and issubclass(kind, builtin), kind
    assert pneumoscope.PneumoscopeError is PneumoscopeError and "PneumoscopeError" in pneumoscope.__all__


def test_no_builtin_exception_carries_a_message_for_the_user():
    """A raise of a bare built-in whose message gives a fix or names a flag would be printed as a bug."""
    offenders = []
    builtins = ("ValueError", "RuntimeError", "FileNotFoundError", "ConnectionError", "OSError")
    paths = sorted(SRC.rglob("*.py"))
    assert len(paths) > 40  # every module of every subpackage (it once read the top level only)
    for path in paths:
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name)):
                continue
            text = ast.get_source_segment(source, node)
            if node.exc.func.id in builtins and ("Fix:" in text or re.search(r"--[a-z]", text) or "pneumoscope " in text):
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno}")
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


# --------------------------------------------------------------------------- issue 23, item 10: configs that were tracebacks


@pytest.mark.parametrize(
    "text, expected",
    [
        ("lr: !!python/object/apply:os.system ['echo hacked']\n", "not plain YAML"),
        ("epochs: [1, 2\n", "not plain YAML"),
        (b"\xff\xfe\x00binary", "not a text file"),
        ("lr: .nan\n", "finite number"),
        ("finetune:\n  lr: .inf\n", "finite number"),
        ("epochs: [1, 2]\n", "finite number"),
        ("hidden: {a: 1}\n", "finite number"),
        ("epochs: 2.5\n", "whole number"),
        ("seed: -1\n", "seed must be 0 or more"),
        ("augment: {rotation_deg: .nan}\n", "augment setting rotation_deg must be finite"),
    ],
    ids=["python-tag", "syntax", "binary", "nan-lr", "inf-finetune-lr", "list", "mapping", "fraction", "negative-seed", "nan-augment"],
)
def test_a_bad_config_file_is_one_line_before_any_work(text, expected, tmp_path, capsys):
    from pneumoscope.cli.main import main

    config = tmp_path / "c.yaml"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert main(["train", str(tmp_path / "no-data"), "--out", str(tmp_path / "run"), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pneumoscope: error: ") and expected in err and "Traceback" not in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_a_set_value_that_is_not_yaml_is_one_line(tmp_path, capsys):
    from pneumoscope.cli.main import main

    assert main(["train", str(tmp_path), "--out", str(tmp_path / "run"), "--set", "lr=[1, 2"]) == 2
    assert "--set lr=[1, 2: the value is not plain YAML" in capsys.readouterr().err
