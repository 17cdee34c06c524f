"""The red-team corpus (issue 11): hostile inputs and broken environments, one line and a stated exit code each.

Exit status for every command: 0 done; 1 done, but some inputs were unreadable
(listed); 2 the command failed, with one ``pneumoscope: error: ...`` line.
"""

import csv
import errno
import json
import logging
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pneumoscope import outputs
from pneumoscope.cli import main
from tests.conftest import make_kaggle_tree


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A checkpoint of an untrained model (random head): enough to load, predict and export."""
    from pneumoscope.checkpoint import describe, save_checkpoint
    from pneumoscope.models import create_model

    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", pretrained="none", hidden=8).eval()
    run = tmp_path_factory.mktemp("tiny") / "run"
    save_checkpoint(run, model, describe(model, threshold=0.5, threshold_policy="test"))
    return run


def _png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(seed).uniform(size=(48, 48)) * 255).astype(np.uint8)).save(path)
    return path


def _error_line(capsys, caplog) -> str:
    """The one ``pneumoscope: error:`` line on stderr; no traceback anywhere."""
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err + caplog.text
    lines = [line for line in err.splitlines() if line.startswith("pneumoscope: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _rows(out: str) -> dict[str, dict]:
    return {r["path"]: r for r in csv.DictReader(out.splitlines())}


# --------------------------------------------------------------------------- datasets


def test_train_warns_and_records_identical_images_across_splits(tmp_path, caplog):
    tree = make_kaggle_tree(tmp_path / "data", n_patients=8)
    source = tree / "train" / "PNEUMONIA" / "person0_bacteria_0.jpeg"
    (tree / "test" / "PNEUMONIA" / "person77_bacteria_0.jpeg").write_bytes(source.read_bytes())
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="pneumoscope"):
        assert main(["-q", "train", str(tree), "--out", str(run), "--epochs", "2", "--val-fraction", "0.3", "--pretrained", "none"]) == 0
    assert any("identical (same bytes) across splits" in r.getMessage() for r in caplog.records)
    leakage = json.loads((run / "checkpoint.json").read_text())["leakage"]
    assert leakage["duplicates_across_splits"] == 1 and not leakage["ok"]
    assert any(p.endswith("person77_bacteria_0.jpeg") for p in leakage["duplicate_examples"][0])


@pytest.mark.parametrize("damage", ["wrong shape", "nan", "not a float"])
def test_a_damaged_feature_cache_entry_is_recomputed(damage, kaggle_tree, tmp_path, caplog):
    from pneumoscope.data import load_dataset, scan
    from pneumoscope.features import FeatureCache, extract_features, model_key
    from pneumoscope.models import create_model

    model = create_model("efficientnet_lite0", pretrained="none", hidden=8).eval()
    dataset = scan(load_dataset(kaggle_tree))
    records = dataset.records[:2]
    first = extract_features(model, dataset, records, cache_dir=tmp_path, progress=False)
    dim = first.features.shape[1]
    cache = FeatureCache(tmp_path, model_key(model), dim=dim)
    entry = cache._path(records[0].content_hash)
    bad = {"wrong shape": np.zeros(dim + 1, np.float32), "nan": np.full(dim, np.nan, np.float32), "not a float": np.zeros(dim, np.int64)}[damage]
    entry.write_bytes(outputs.npy_bytes(bad))
    with caplog.at_level(logging.WARNING, logger="pneumoscope"):
        again = extract_features(model, dataset, records, cache_dir=tmp_path, progress=False)
    np.testing.assert_allclose(again.features, first.features, atol=1e-5)
    assert any(str(entry) in r.getMessage() and "recomputing" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(cache.get(records[0].content_hash), first.features[0], atol=1e-5)  # repaired on disk


# --------------------------------------------------------------------------- nothing half-done left behind


def test_staging_folder_of_a_killed_run_is_removed_by_the_next(tmp_path):
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os, signal
        from pneumoscope.outputs import atomic_output_dir
        with atomic_output_dir({str(out)!r}) as tmp:
            (tmp / "half.json").write_text("{{")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    assert subprocess.run([sys.executable, "-c", script], env=env).returncode == -9
    orphans = list(tmp_path.glob(".run.partial-*"))
    assert len(orphans) == 1 and not out.exists()
    with outputs.atomic_output_dir(out) as tmp:
        (tmp / "done.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["run"] and (out / "done.json").is_file()


def test_a_result_moved_aside_by_a_killed_run_is_restored(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    aside = tmp_path / f".run.old-{dead}"
    aside.mkdir()
    (aside / "model.safetensors").write_bytes(b"good")
    outputs.remove_orphans(tmp_path / "run")
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == b"good" and not aside.exists()


def test_failed_export_keeps_the_previous_file_and_leaves_no_partial(tiny_run, tmp_path, monkeypatch, capsys, caplog):
    import pneumoscope.export

    out = tmp_path / "model.onnx"
    out.write_bytes(b"the previous, verified export")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (tmp_path / f".model.onnx.partial-{dead}-unverified.onnx").write_bytes(b"left by a killed export")
    seen = []

    def parity_fails(torch_predictor, onnx_predictor, images=None):
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        return {"n": 4, "max_abs_prob_diff": 0.5}

    monkeypatch.setattr(pneumoscope.export, "check_parity", parity_fails)
    assert main(["-q", "export", str(tiny_run), "--out", str(out), "--overwrite"]) == 2
    assert "differs from PyTorch" in _error_line(capsys, caplog)
    assert out.read_bytes() == b"the previous, verified export"  # the unverified model never took its name
    assert len(seen[0]) == 2 and seen[0][1] == "model.onnx"  # checked under a temporary name, the killed one's leftover gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["022", "077"])
def test_outputs_follow_the_umask(umask, tmp_path):
    old = os.umask(umask)
    try:
        outputs.write_json(tmp_path / "a.json", {})
        with outputs.atomic_output_dir(tmp_path / "run") as tmp:
            outputs.write_json(tmp / "b.json", {})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "run" / "b.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o777 & ~umask
