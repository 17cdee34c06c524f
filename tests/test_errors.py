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
        ("seed: -1\n", "seed must be from 0 to 2**32 - 1"),
        ("seed: 99999999999999999999999\n", "seed must be from 0 to 2**32 - 1"),
        ("augment: {rotation_deg: .nan}\n", "augment setting rotation_deg must be finite"),
    ],
    ids=[
        "python-tag",
        "syntax",
        "binary",
        "nan-lr",
        "inf-finetune-lr",
        "list",
        "mapping",
        "fraction",
        "negative-seed",
        "huge-seed",
        "nan-augment",
    ],
)
def test_a_bad_config_file_is_one_line_before_any_work(text, expected, tmp_path, capsys):
    from pneumoscope.cli.main import main

    config = tmp_path / "c.yaml"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert main(["train", str(tmp_path / "no-data"), "--out", str(tmp_path / "run"), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pneumoscope: error: ") and expected in err and "Traceback" not in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "DATA", "--out", "RUN", "--seed", "18446744073709551616"],
        ["train", "DATA", "--out", "RUN", "--seeds", "0", "99999999999999999999999"],
        ["train", "DATA", "--out", "RUN", "--set", "seed=99999999999999999999999"],
        ["shift", "RUN", "DATA", "--seed", "4294967296"],
        ["data", "inspect", "DATA", "--seed", "-3"],
    ],
    ids=["train", "seeds", "set", "shift", "inspect"],
)
def test_a_seed_outside_what_the_generators_take_is_one_line(argv, tmp_path, capsys):
    """A seed over 2**64 ended train in torch's "Overflow when unpacking long long" traceback, shift's in NumPy's."""
    from pneumoscope.cli.main import main

    argv = [str(tmp_path / a) if a in ("DATA", "RUN") else a for a in argv]
    try:
        code = main(argv)
    except SystemExit as done:  # argparse refuses it, with the usage line first
        code = done.code
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("outside 0 to 4,294,967,295" in err or "seed must be from 0 to 2**32 - 1" in err), err
    assert not (tmp_path / "RUN").exists()


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_a_device_given_as_config_or_list_is_refused_unread(device, tmp_path, capsys):
    """``--from-list /dev/zero`` and ``--config /dev/zero`` read for ever, past 7 GB in 20 s."""
    from pneumoscope.cli.main import main
    from tests.test_redteam import _within

    for argv in (
        ["train", str(tmp_path), "--out", str(tmp_path / "run"), "--config", device],
        ["predict", str(tmp_path / "run"), "--from-list", device],
    ):
        assert _within(30, main, argv) == 2
        err = capsys.readouterr().err
        assert "character device" in err and "Traceback" not in err, err


def test_a_list_from_a_pipe_is_read(tmp_path):
    """`--from-list <(find ...)` hands over a pipe: that is a list, read to its end."""
    import os
    import threading

    from pneumoscope.inference.inputs import read_list

    fifo = tmp_path / "list"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("a.png\n# comment\n\nb.png\n"), daemon=True)
    writer.start()
    assert read_list(fifo) == ["a.png", "b.png"]
    writer.join(10)


def test_a_list_or_config_over_its_bound_is_refused(tmp_path, monkeypatch):
    from pneumoscope.data import bounded
    from pneumoscope.errors import UsageError
    from pneumoscope.inference import inputs
    from pneumoscope.training.config import _read_yaml

    big = tmp_path / "big.txt"
    big.write_text("a.png\n" * 1000)
    monkeypatch.setattr(inputs, "MAX_LIST_BYTES", 100)
    with pytest.raises(UsageError, match="more than 100 bytes"):
        inputs.read_list(big)
    monkeypatch.setattr("pneumoscope.training.config.MAX_CONFIG_BYTES", 100)
    with pytest.raises(UsageError, match="more than 100 bytes"):
        _read_yaml(big)
    assert bounded.MAX_CONFIG_BYTES == 1_000_000


def test_a_set_value_that_is_not_yaml_is_one_line(tmp_path, capsys):
    from pneumoscope.cli.main import main

    assert main(["train", str(tmp_path), "--out", str(tmp_path / "run"), "--set", "lr=[1, 2"]) == 2
    assert "--set lr=[1, 2: the value is not plain YAML" in capsys.readouterr().err
