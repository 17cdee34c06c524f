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
from PIL import Image

from pneumoscope import outputs
from pneumoscope.cli.main import main
from pneumoscope.errors import ImageReadError
from tests.conftest import make_kaggle_tree


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


# --------------------------------------------------------------------------- the command failed: exit 2, one line


def _truncated_checkpoint(tmp_path, run):
    raw = (run / "model.safetensors").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    return tmp_path / "cut", "damaged or truncated"


def _edited_header(tmp_path, run):
    raw = bytearray((run / "model.safetensors").read_bytes())
    raw[8:12] = b"!!!!"  # the JSON header no longer parses
    (tmp_path / "edited").mkdir()
    (tmp_path / "edited" / "model.safetensors").write_bytes(bytes(raw))
    return tmp_path / "edited", "damaged or truncated"


def _missing_tensor(tmp_path, run):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = run / "model.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(path))
    tensors.pop("head.fc1.weight")
    (tmp_path / "missing").mkdir()
    meta.pop("pneumoscope_sha256")  # as an older version wrote it: the state dict's own check catches it
    save_file(tensors, str(tmp_path / "missing" / "model.safetensors"), metadata=meta)
    return tmp_path / "missing", "do not match its description"


def _flipped_bit(tmp_path, run):
    """Issue 23, item 5: one flipped bit in a weight loaded without a word and changed labels."""
    from safetensors import safe_open

    path = run / "model.safetensors"
    raw = bytearray(path.read_bytes())
    with safe_open(str(path), framework="pt") as fh:
        names = list(fh.keys())
    assert "head.fc2.weight" in names
    raw[-3] ^= 0x10  # a bit in the last tensor's bytes (the data section ends the file)
    (tmp_path / "flipped").mkdir()
    (tmp_path / "flipped" / "model.safetensors").write_bytes(bytes(raw))
    return tmp_path / "flipped", "do not match the SHA-256 digest"


def _flip_after(raw: bytes, needle: bytes, mask: int = 0x01) -> bytes:
    """``raw`` with one bit flipped in the byte that follows the first ``needle``."""
    i = raw.index(needle) + len(needle)
    return raw[:i] + bytes([raw[i] ^ mask]) + raw[i + 1 :]


def _flipped_threshold(tmp_path, run):
    """Issue 23, item 5: one flipped bit in the description (threshold 0.5 -> 0.4) loaded without a word; the digest
    covered the weights only."""
    raw = (run / "model.safetensors").read_bytes()
    (tmp_path / "threshold").mkdir()
    (tmp_path / "threshold" / "model.safetensors").write_bytes(_flip_after(raw, b'\\"threshold\\": 0.'))  # JSON in JSON
    return tmp_path / "threshold", "do not match the SHA-256 digest"


def _flipped_digest_name(tmp_path, run):
    """A flipped bit in the digest's own key would make the file look older than the digest, and go unchecked."""
    raw = (run / "model.safetensors").read_bytes()
    (tmp_path / "name").mkdir()
    (tmp_path / "name" / "model.safetensors").write_bytes(_flip_after(raw, b'"pneumoscope_sha', 0x04))  # sha256 -> shc256
    return tmp_path / "name", "a key no version of pneumoscope wrote"


def _tiny_onnx(path: Path, run: Path) -> Path:
    """A pneumoscope ONNX file without the exporter (which takes seconds): the mean pixel as the logit, ``run``'s
    description in its metadata, with the digest the exporter writes."""
    import onnx
    from onnx import TensorProto, helper

    from pneumoscope.inference.backends import onnx_digest
    from pneumoscope.models.checkpoint import read_description

    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 224, 224])
    logit = helper.make_tensor_value_info("logit", TensorProto.FLOAT, ["batch"])
    axes = helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3])
    node = helper.make_node("ReduceMean", ["image", "axes"], ["logit"], keepdims=0)
    graph = helper.make_graph([node], "mean", [image], [logit], initializer=[axes])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 8
    proto.metadata_props.add(key="pneumoscope", value=json.dumps(read_description(run).to_dict()))
    proto.metadata_props.add(key="pneumoscope_sha256", value=onnx_digest(proto))
    onnx.save(proto, path)
    return path


def _onnx_flipped_threshold(tmp_path, run):
    path = tmp_path / "flipped.onnx"
    path.write_bytes(_flip_after(_tiny_onnx(tmp_path / "tiny.onnx", run).read_bytes(), b'"threshold": 0.'))
    return path, "do not match the SHA-256 digest"


def _onnx_changed_attribute(tmp_path, run):
    """A node's attribute changed after export (a Gemm's alpha 1.0 -> 0.5 moved P by 0.02 and was accepted)."""
    import onnx

    proto = onnx.load(_tiny_onnx(tmp_path / "tiny.onnx", run))
    (attr,) = proto.graph.node[0].attribute
    attr.i = 1  # keepdims 0 -> 1
    onnx.save(proto, tmp_path / "attribute.onnx")
    return tmp_path / "attribute.onnx", "do not match the SHA-256 digest"


def _onnx_device(tmp_path, run):
    """An .onnx name linked to /dev/zero was read until memory ran out."""
    (tmp_path / "zero.onnx").symlink_to("/dev/zero")
    return tmp_path / "zero.onnx", "a character device, not a regular file"


def _onnx_fifo(tmp_path, run):
    os.mkfifo(tmp_path / "pipe.onnx")
    return tmp_path / "pipe.onnx", "a FIFO (named pipe), not a regular file"


def _truncated_onnx(tmp_path, run):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x08\x07\x12\x04abcd" + bytes(40))
    return path, "ONNX Runtime cannot load it"


@pytest.mark.parametrize(
    "make",
    [
        _truncated_checkpoint,
        _edited_header,
        _missing_tensor,
        _flipped_bit,
        _flipped_threshold,
        _flipped_digest_name,
        _onnx_flipped_threshold,
        _onnx_changed_attribute,
        _onnx_device,
        _onnx_fifo,
        _truncated_onnx,
    ],
)
def test_damaged_model_file_is_one_line_naming_it(make, tiny_run, tmp_path, capsys, caplog):
    model_file, expected = make(tmp_path, tiny_run)
    image = _png(tmp_path / "x.png")
    assert _within(60, main, ["-q", "predict", str(model_file), str(image)]) == 2
    line = _error_line(capsys, caplog)
    assert expected in line and str(model_file) in line and "Fix:" in line


def _compare_inputs(tmp_path) -> list[str]:
    """Two evaluation folders of the same three images, as `evaluate` writes them."""
    folders = []
    for name, probs in (("a", (0.2, 0.7, 0.9)), ("b", (0.3, 0.6, 0.4))):
        folder = tmp_path / name
        folder.mkdir()
        with open(folder / "predictions.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "patient_id", "label", "prob", "pred"])
            for i, (label, p) in enumerate(zip(("NORMAL", "PNEUMONIA", "PNEUMONIA"), probs, strict=True)):
                w.writerow([f"img{i}.png", f"p{i}", label, p, "PNEUMONIA" if p >= 0.5 else "NORMAL"])
        folders.append(str(folder))
    return folders


def _disk_full(monkeypatch, tmp_path):
    def full(fh, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "_write_all", full)
    return tmp_path / "result.json", "no space left on the device"


def _read_only_below(root: Path, make):
    """``make`` (tempfile.mkstemp or mkdtemp), failing with EROFS below ``root``: a read-only mount, even for root."""

    def refuse(*args, dir=None, **kw):
        if str(dir).startswith(str(root)):
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return make(*args, dir=dir, **kw)

    return refuse


def _read_only(monkeypatch, tmp_path):
    monkeypatch.setattr(outputs.tempfile, "mkstemp", _read_only_below(tmp_path / "ro", tempfile.mkstemp))
    return tmp_path / "ro" / "result.json", "read-only"


def _name_too_long(monkeypatch, tmp_path):
    return tmp_path / ("x" * 300 + ".json"), "file name too long"  # a real ENAMETOOLONG, nothing simulated


@pytest.mark.parametrize("make", [_disk_full, _read_only, _name_too_long])
def test_unwritable_output_is_one_line_naming_it(make, monkeypatch, tmp_path, capsys, caplog):
    out, expected = make(monkeypatch, tmp_path)
    assert main(["compare", *_compare_inputs(tmp_path), "--out", str(out)]) == 2
    line = _error_line(capsys, caplog)
    assert expected in line and str(out) in line and "Fix:" in line
    assert not list(out.parent.glob(".*.tmp")) if out.parent.exists() else True  # no temporary file left behind


def test_read_only_out_fails_before_any_work(monkeypatch, tmp_path, capsys, caplog):
    import pneumoscope.training.prepare

    def no_work(*args, **kw):
        raise AssertionError("the data was read before the output folder was checked")

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(outputs.tempfile, "mkdtemp", _read_only_below(tmp_path / "ro", tempfile.mkdtemp))
    monkeypatch.setattr(pneumoscope.training.prepare, "load_dataset", no_work)
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "ro" / "run")]) == 2
    line = _error_line(capsys, caplog)
    assert "read-only" in line and str(tmp_path / "ro") in line


def test_out_of_memory_is_one_line(monkeypatch, tiny_run, tmp_path, capsys, caplog):
    from pneumoscope.inference.predictor import Predictor

    def huge(*args, **kw):
        raise MemoryError()

    monkeypatch.setattr(Predictor, "predict_batch", huge)  # the streaming path's one forward per batch
    assert main(["-q", "predict", str(tiny_run), str(_png(tmp_path / "x.png"))]) == 2
    assert "out of memory" in _error_line(capsys, caplog)


# --------------------------------------------------------------------------- predict: one row per input, 1 when some failed


def _missing(tmp_path):
    return tmp_path / "nowhere.png", "no such file or folder"


def _pdf(tmp_path):
    path = tmp_path / "scan.pdf"
    path.write_bytes(b"%PDF-1.4 not an image")
    return path, "not an image type pneumoscope reads"


def _long_name(tmp_path):
    return tmp_path / ("y" * 300 + ".png"), "cannot be read"


def _empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    return tmp_path / "empty", "folder holds no image files"


@pytest.mark.parametrize("make", [_missing, _pdf, _long_name, _empty_folder])
def test_one_bad_input_among_many_gets_a_row_and_the_rest_are_predicted(make, tiny_run, tmp_path, capsys, caplog):
    good = [_png(tmp_path / "ok" / f"{i}.png", seed=i) for i in range(2)]
    bad, reason = make(tmp_path)
    assert main(["-q", "predict", str(tiny_run), str(good[0]), str(bad), str(good[1])]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    rows = _rows(out)
    assert all(rows[str(g)]["label"] in ("NORMAL", "PNEUMONIA") for g in good)
    assert reason in rows[str(bad)]["error"] and "Fix:" in rows[str(bad)]["error"]


@pytest.mark.parametrize("make", [_missing, _pdf, _empty_folder])
def test_nothing_to_predict_is_a_failure(make, tiny_run, tmp_path, capsys, caplog):
    bad, _ = make(tmp_path)
    assert main(["-q", "predict", str(tiny_run), str(bad)]) == 2
    assert "none of the 1 inputs could be predicted" in _error_line(capsys, caplog)


@pytest.mark.parametrize("suffix", [".gif", ".webp"])
def test_gif_and_webp_are_read_alike_named_or_found_in_a_folder(suffix, tiny_run, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(folder / f"a{suffix}", lossless=True)
    assert main(["-q", "predict", str(tiny_run), str(folder / f"a{suffix}")]) == 0
    named = _rows(capsys.readouterr().out)
    assert main(["-q", "predict", str(tiny_run), str(folder)]) == 0
    found = _rows(capsys.readouterr().out)
    assert named == found and named[str(folder / f"a{suffix}")]["label"] in ("NORMAL", "PNEUMONIA")


def test_a_folder_with_a_symlink_cycle_is_walked_once(tiny_run, tmp_path, capsys, caplog):
    folder = tmp_path / "images"
    _png(folder / "sub" / "a.png")
    (folder / "sub" / "up").symlink_to(folder, target_is_directory=True)  # images/sub/up -> images: a cycle
    with caplog.at_level(logging.WARNING, logger="pneumoscope"):
        assert main(["-q", "predict", str(tiny_run), str(folder)]) == 0
    assert list(_rows(capsys.readouterr().out)) == [str(folder / "sub" / "a.png")]
    assert any("cycle" in r.getMessage() and str(folder / "sub" / "up") in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- datasets


def test_data_inspect_counts_the_unreadable_files_it_does_not_list(kaggle_tree, capsys):
    for i in range(25):
        (kaggle_tree / "train" / "NORMAL" / f"IM-9{i:03d}-0001.jpeg").write_bytes(b"")
    assert main(["-q", "data", "inspect", str(kaggle_tree)]) == 1  # done, but some inputs were unreadable
    out = capsys.readouterr().out
    assert "unreadable files: 25" in out and "... and 5 more not listed here" in out


def test_data_inspect_survives_a_symlink_cycle(kaggle_tree, capsys, caplog):
    link = kaggle_tree / "train" / "NORMAL" / "loop"
    link.symlink_to(kaggle_tree, target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="pneumoscope"):
        assert main(["-q", "data", "inspect", str(kaggle_tree), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 72  # (12 + 2 + 4) patients x 2 images x 2 classes
    assert any(str(link) in r.getMessage() and "cycle" in r.getMessage() for r in caplog.records)


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


def test_one_image_under_two_labels_is_named_by_inspect_and_refused_by_train_and_evaluate(tiny_run, tmp_path, capsys):
    """The same bytes as NORMAL and as PNEUMONIA: calibrate refused it, but evaluate scored it twice (once wrong by
    construction) without a word, train called it only "identical across splits", data inspect never said."""
    tree = make_kaggle_tree(tmp_path / "data", n_patients=8)
    for split in ("train", "test"):
        source = tree / split / "NORMAL" / "IM-0001-0000.jpeg"
        (tree / split / "NORMAL" / "IM-0001-0000b.jpeg").write_bytes(source.read_bytes())  # a copy under the same label first
        (tree / split / "PNEUMONIA" / "person999_bacteria_1.jpeg").write_bytes(source.read_bytes())
    assert main(["data", "inspect", str(tree)]) == 0
    out = capsys.readouterr().out
    assert "images under two labels (same bytes): 2" in out and "NORMAL:" in out and "PNEUMONIA:" in out, out
    assert main(["data", "inspect", str(tree), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["leakage"]["label_conflicts"]) == 2
    for argv in (
        ["train", str(tree), "--out", str(tmp_path / "run"), "--epochs", "2", "--pretrained", "none"],
        ["evaluate", str(tiny_run), str(tree), "--out", str(tmp_path / "ev"), "--no-audit"],
    ):
        assert main(["-q", *argv]) == 2
        err = capsys.readouterr().err
        assert "carry two labels" in err and "person999_bacteria_1.jpeg (PNEUMONIA)" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "ev").exists()


@pytest.mark.parametrize("damage", ["wrong shape", "nan", "not a float"])
def test_a_damaged_feature_cache_entry_is_recomputed(damage, kaggle_tree, tmp_path, caplog):
    from pneumoscope.data.layouts import load_dataset
    from pneumoscope.data.splits import scan
    from pneumoscope.models.classifier import create_model
    from pneumoscope.models.features import extract_features, part_caches

    model = create_model("efficientnet_lite0", pretrained="none", hidden=8).eval()
    dataset = scan(load_dataset(kaggle_tree))
    records = dataset.records[:2]
    first = extract_features(model, dataset, records, cache_dir=tmp_path, progress=False)
    dim = first.features.shape[1]
    (cache,) = part_caches(model, tmp_path)
    assert cache.dim == dim
    entry = cache._path(records[0].content_hash)
    bad = {"wrong shape": np.zeros(dim + 1, np.float32), "nan": np.full(dim, np.nan, np.float32), "not a float": np.zeros(dim, np.int64)}[
        damage
    ]
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


@pytest.mark.slow
def test_failed_export_keeps_the_previous_file_and_leaves_no_partial(tiny_run, tmp_path, monkeypatch, capsys, caplog):
    import pneumoscope.inference.export

    out = tmp_path / "model.onnx"
    out.write_bytes(b"the previous, verified export")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (tmp_path / f".model.onnx.partial-{dead}-unverified.onnx").write_bytes(b"left by a killed export")
    seen = []

    def parity_fails(torch_predictor, onnx_predictor, images=None):
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        return {"n": 4, "max_abs_prob_diff": 0.5}

    monkeypatch.setattr(pneumoscope.inference.export, "check_parity", parity_fails)
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


def test_explain_keeps_long_input_names_short_and_goes_on_past_a_missing_one(tiny_run, tmp_path, capsys, caplog):
    long = _png(tmp_path / ("z" * 240 + ".png"))  # "0000_" + stem + "_gradcam.png" would pass the 255-byte limit
    out = tmp_path / "explained"
    assert main(["-q", "explain", str(tiny_run), str(long), str(tmp_path / "nowhere.png"), "--out", str(out), "--no-checks"]) == 1
    written = json.loads((out / "explanations.json").read_text())
    assert [e["path"] for e in written["images"]] == [str(long)] and (out / written["images"][0]["figure"]).is_file()
    assert [s["path"] for s in written["skipped"]] == [str(tmp_path / "nowhere.png")]


# --------------------------------------------------------------------------- issue 23, item 3: devices and FIFOs


def _specials(folder: Path) -> dict[str, Path]:
    """A FIFO and links to /dev/zero and /dev/urandom, each named like an image; a link to a missing file."""
    folder.mkdir(parents=True, exist_ok=True)
    os.mkfifo(folder / "pipe.png")
    (folder / "zero.png").symlink_to("/dev/zero")
    (folder / "random.jpeg").symlink_to("/dev/urandom")
    (folder / "gone.png").symlink_to(folder / "no-such-file.png")
    return {p.name: p for p in folder.iterdir()}


def _within(seconds: float, fn, *args):
    """Run fn(*args) in a thread; fail (rather than hang the suite) when it takes longer."""
    import threading

    result, done = {}, threading.Event()

    def target():
        try:
            result["value"] = fn(*args)
        finally:
            done.set()

    threading.Thread(target=target, daemon=True).start()
    assert done.wait(seconds), f"{fn.__name__} still running after {seconds} s (a FIFO or a device being read?)"
    return result["value"]


def test_fifos_and_devices_named_like_images_are_rows_with_a_reason_never_read(tiny_run, tmp_path, capsys, caplog):
    folder = tmp_path / "in"
    specials = _specials(folder)
    good = [_png(folder / f"ok{i}.png", seed=i) for i in range(2)]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([str(specials["pipe.png"]), "/dev/urandom", str(good[0])]) + "\n")
    for argv in (
        ["-q", "predict", str(tiny_run), str(folder), "--format", "json", "--workers", "0"],
        ["-q", "predict", str(tiny_run), "--from-list", str(listing), "--format", "json", "--workers", "0"],
        ["-q", "predict", str(tiny_run), str(specials["pipe.png"]), str(specials["zero.png"]), str(good[1]), "--format", "json"],
    ):
        assert _within(60, main, argv) == 1
        rows = {Path(r["path"]).name: r for r in json.loads(capsys.readouterr().out)}
        bad = [n for n in rows if not n.startswith("ok")]
        assert bad and all(rows[n]["prob"] is None and rows[n]["label"] is None for n in bad), rows
        assert all(("FIFO" in rows[n]["error"] or "device" in rows[n]["error"] or "does not exist" in rows[n]["error"]) for n in bad), rows
        assert all(rows[n]["label"] in ("NORMAL", "PNEUMONIA") or rows[n]["ood"] for n in rows if n.startswith("ok"))
    # every special file of the folder gets its row, the dangling link too (they were skipped without a word)
    assert main(["-q", "predict", str(tiny_run), str(folder), "--format", "json", "--workers", "0"]) == 1
    assert {Path(r["path"]).name for r in json.loads(capsys.readouterr().out)} == {*specials, "ok0.png", "ok1.png"}


def test_the_api_refuses_a_device_rather_than_reading_it(tiny_run):
    import pneumoscope

    model = pneumoscope.load(tiny_run)
    preds = _within(30, model.predict, ["/dev/zero", "/dev/urandom"])
    assert all(p.prob is None and "character device" in p.error for p in preds), preds


def test_data_inspect_lists_a_fifo_and_a_device_in_a_class_folder_and_goes_on(kaggle_tree, capsys):
    _specials(kaggle_tree / "train" / "NORMAL")
    assert _within(120, main, ["data", "inspect", str(kaggle_tree), "--json"]) == 1
    unreadable = {Path(u["path"]).name: u["reason"] for u in json.loads(capsys.readouterr().out)["unreadable"]}
    assert {"pipe.png", "zero.png", "random.jpeg", "gone.png"} <= set(unreadable), unreadable
    assert "FIFO" in unreadable["pipe.png"] and "character device" in unreadable["zero.png"]


def test_a_file_over_the_byte_bound_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from pneumoscope.data import bounded

    big = tmp_path / "big.png"
    with open(big, "wb") as fh:
        fh.truncate(2_000_000)  # sparse: costs no disk
    monkeypatch.setattr(bounded, "MAX_MEMBER_BYTES", 1_000_000)
    with pytest.raises(ImageReadError, match="over the limit of 1,000,000"):
        bounded.read_file(big)


# --------------------------------------------------------------------------- issue 23, items 8 and 9


def test_branching_symlink_chains_are_walked_in_linear_time(tmp_path):
    """d0..d24 each link `x` and `y` to the next: 2^24 paths to the last folder, which is walked once."""
    from pneumoscope.data.folders import walk_files

    root = tmp_path / "d0"
    for i in range(25):
        (tmp_path / f"d{i}").mkdir()
        _png(tmp_path / f"d{i}" / f"img{i}.png", seed=i)
    for i in range(24):
        for name in ("x", "y"):
            (tmp_path / f"d{i}" / name).symlink_to(tmp_path / f"d{i + 1}", target_is_directory=True)
    files = _within(30, walk_files, root)
    assert sorted(f.name for f in files) == sorted(f"img{i}.png" for i in range(25))  # each image once


def test_pack_keeps_both_images_when_a_new_name_would_collide(tmp_path):
    import zipfile

    from pneumoscope.data.layouts import load_dataset
    from pneumoscope.data.pack import pack_dataset

    for cls in ("NORMAL", "PNEUMONIA"):
        (tmp_path / "src" / cls).mkdir(parents=True)
        Image.fromarray((np.random.default_rng(1).uniform(size=(400, 400)) * 255).astype(np.uint8)).save(tmp_path / "src" / cls / "a.png")
        _png(tmp_path / "src" / cls / "a.png.jpeg")  # small: stored as it is, under the name a.png would get
    summary = pack_dataset(tmp_path / "src", tmp_path / "out.zip", size=256, progress=False)
    names = [n for n in zipfile.ZipFile(tmp_path / "out.zip").namelist() if n.endswith(("png", "jpeg"))]
    assert len(names) == len(set(names)) == 4 and summary["images"] == 4, names
    assert "NORMAL/a.png.1.jpeg" in names and "NORMAL/a.png.jpeg" in names
    assert len(load_dataset(tmp_path / "out.zip").records) == 4


def test_a_description_that_is_not_json_is_a_damaged_file_not_a_traceback():
    """A flipped byte in an ONNX export's metadata (or a checkpoint's header) made json.loads raise a bare ValueError."""
    from pneumoscope.errors import PneumoscopeError
    from pneumoscope.models.checkpoint import description_from_json

    with pytest.raises(PneumoscopeError, match=r"model.onnx: its description is not valid JSON .* Fix: copy it again"):
        description_from_json('{"format": "pneumoscope-run", "threshold": 0.5,,}', "model.onnx")


@pytest.mark.parametrize("make", [_flipped_threshold, _onnx_flipped_threshold])
def test_a_flipped_bit_in_the_description_is_refused_by_the_api(make, tiny_run, tmp_path):
    import pneumoscope
    from pneumoscope.errors import CheckpointError

    model_file, expected = make(tmp_path, tiny_run)
    with pytest.raises(CheckpointError, match=expected) as err:
        pneumoscope.load(model_file)
    assert str(model_file) in str(err.value) and "Fix:" in str(err.value) and "\n" not in str(err.value)


def test_model_files_with_their_digest_load_and_predict(tiny_run, tmp_path):
    import pneumoscope

    image = _png(tmp_path / "x.png")
    for model_file in (tiny_run, _tiny_onnx(tmp_path / "tiny.onnx", tiny_run)):
        assert pneumoscope.load(model_file).predict(image).threshold == 0.5


def _as_older_versions_wrote(run: Path, out: Path, keep_weights_digest: bool) -> Path:
    """``run``'s checkpoint without the digest of description and weights: with only the weights' (as the version
    before wrote it), or with none (as the versions before that)."""
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = run / "model.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    meta.pop("pneumoscope_sha256")
    out.mkdir()
    save_file(load_file(str(path)), str(out / "model.safetensors"), metadata=meta)
    if keep_weights_digest:
        raw = (out / "model.safetensors").read_bytes()
        meta["pneumoscope_weights_sha256"] = hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little") :]).hexdigest()
        save_file(load_file(str(path)), str(out / "model.safetensors"), metadata=meta)
    return out


@pytest.mark.parametrize("keep_weights_digest", [False, True])
def test_old_checkpoints_without_a_digest_still_load(keep_weights_digest, tiny_run, tmp_path):
    from safetensors.torch import load_file

    from pneumoscope.models.checkpoint import load_checkpoint

    old = _as_older_versions_wrote(tiny_run, tmp_path / "old", keep_weights_digest)
    model, description = load_checkpoint(old)
    assert all(k in model.state_dict() for k in load_file(str(tiny_run / "model.safetensors")))
    assert description.threshold == 0.5


def test_an_old_checkpoints_weights_digest_is_still_checked(tiny_run, tmp_path, capsys, caplog):
    old = _as_older_versions_wrote(tiny_run, tmp_path / "old", keep_weights_digest=True)
    raw = bytearray((old / "model.safetensors").read_bytes())
    raw[-3] ^= 0x10  # a bit in the last tensor's bytes
    (old / "model.safetensors").write_bytes(bytes(raw))
    assert main(["-q", "predict", str(old), str(_png(tmp_path / "x.png"))]) == 2
    assert "the weights do not match the SHA-256 digest" in _error_line(capsys, caplog)


def test_old_onnx_exports_without_a_digest_still_load(tiny_run, tmp_path):
    import onnx

    import pneumoscope

    proto = onnx.load(_tiny_onnx(tmp_path / "tiny.onnx", tiny_run))
    kept = [p for p in proto.metadata_props if p.key != "pneumoscope_sha256"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in (("threshold", "0.5"), ("preprocessing", "{}"), ("class_names", "[]")):  # as exports wrote them
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, tmp_path / "old.onnx")
    assert pneumoscope.load(tmp_path / "old.onnx").threshold == 0.5


@pytest.mark.slow
def test_an_export_carries_the_digest_of_its_description_and_graph(tiny_run, tmp_path, capsys, caplog):
    """The digest is written into the file that takes the name --out (the export is verified under another name)."""
    import onnx

    import pneumoscope
    from pneumoscope.errors import CheckpointError

    out = tmp_path / "m.onnx"
    assert main(["-q", "export", str(tiny_run), "--out", str(out)]) == 0
    capsys.readouterr()
    assert "pneumoscope_sha256" in {p.key for p in onnx.load(out).metadata_props}
    assert pneumoscope.load(out).threshold == 0.5
    image = str(_png(tmp_path / "x.png"))
    for name, needle, mask in (("threshold", b'"threshold": 0.', 0x01), ("mean", b'"mean": [0.', 0x01), ("weights", None, 0)):
        flipped = tmp_path / f"{name}.onnx"
        raw = out.read_bytes()
        if needle is None:  # a bit in the largest initializer's bytes: a weight
            data = max(onnx.load(out).graph.initializer, key=lambda t: len(t.raw_data)).raw_data
            needle, mask = data[:64], 0x10
        flipped.write_bytes(_flip_after(raw, needle, mask))
        assert main(["-q", "predict", str(flipped), image]) == 2
        line = _error_line(capsys, caplog)
        assert "do not match the SHA-256 digest" in line and str(flipped) in line
        with pytest.raises(CheckpointError, match="do not match the SHA-256 digest"):
            pneumoscope.load(flipped)


# --------------------------------------------------------------------------- issue 23, items 10-11: a closed pipe, a long boundary


def test_predict_into_a_pipe_closed_early_ends_quietly(tiny_run, tmp_path):
    """`pneumoscope predict … | head -1`: "error: Broken pipe" with exit 2 before; now no word, and 141 as after SIGPIPE."""
    import subprocess
    import sys

    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{_png(tmp_path / 'imgs' / f'{i}.png', seed=i)}\n" for i in range(3)) * 20)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pneumoscope", "predict", str(tiny_run), "--from-list", str(listing), "--batch-size", "1", "--workers", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout.readline().startswith(b"path,")
    proc.stdout.close()  # as `head -1` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "error" not in err and "Traceback" not in err, err


def test_a_multipart_boundary_over_70_characters_is_a_400_not_a_500(tiny_run):
    from fastapi.testclient import TestClient

    from pneumoscope.inference.predictor import Predictor
    from pneumoscope.serving.app import create_app

    boundary = "b" * 300
    body = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\nxx\r\n--{boundary}--\r\n'.encode()
    with TestClient(create_app(Predictor.load(tiny_run)), base_url="http://127.0.0.1") as client:
        r = client.post("/predict", content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 400 and "boundary is 300 characters; at most 70" in r.json()["detail"]


def test_temporary_files_of_a_killed_export_are_removed_by_the_next(tmp_path):
    """Issue 23 item 11: a kill during export left `..m.onnx.partial-PID-unverified.onnx.XXXX.tmp` (18-21 MB) that the
    next export never removed: its pattern expected one leading dot."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    left = [
        f"..m.onnx.partial-{dead}-unverified.onnx.k2j4x9.tmp",
        f".m.onnx.partial-{dead}-unverified.onnx",
        f"..m.onnx.partial-{dead}-unverified.onnx.partial-{dead}-a8f3.tmp",
    ]
    for name in left:
        (tmp_path / name).write_bytes(b"x" * 100)
    (tmp_path / "other.onnx").write_bytes(b"not ours")
    outputs.remove_orphans(tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.onnx"]


def test_an_atomic_write_names_its_temporary_file_with_its_pid(tmp_path, monkeypatch):
    """So that a kill mid-write leaves a name that the next run recognises as an orphan and removes."""
    seen = []
    real = os.replace
    monkeypatch.setattr(outputs.os, "replace", lambda src, dst: seen.append(Path(src).name) or real(src, dst))
    outputs.write_bytes_atomic(tmp_path / "a.csv", b"1\n")
    assert seen and seen[0].startswith(f".a.csv.partial-{os.getpid()}-") and seen[0].endswith(".tmp")


def test_atomic_file_stages_under_a_pid_name_that_a_later_run_removes_once_its_writer_is_dead(tmp_path):
    """Issue 21: one writer. Its staging name is :func:`outputs.partial_name` (the pid) plus the suffix asked for."""
    out = tmp_path / "cache.npy"
    with outputs.atomic_file(out, suffix=".npy") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(outputs.partial_name(out)) and tmp.name.endswith(".npy")
        assert tmp.is_file() and not out.exists()
        tmp.write_bytes(b"whole")
        outputs.remove_orphans(out)  # its writer (this process) is alive: kept
        assert tmp.is_file()
    assert out.read_bytes() == b"whole" and os.listdir(tmp_path) == ["cache.npy"]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (tmp_path / tmp.name.replace(f"-{os.getpid()}-", f"-{dead}-")).write_bytes(b"left by a killed write")
    outputs.remove_orphans(out)
    assert os.listdir(tmp_path) == ["cache.npy"]


@pytest.mark.parametrize("failure", [KeyboardInterrupt, ValueError, OSError])
def test_atomic_file_removes_its_temporary_file_on_any_failure_and_keeps_the_previous_file(failure, tmp_path):
    out = tmp_path / "a.csv"
    out.write_bytes(b"previous")
    with pytest.raises(failure), outputs.atomic_file(out) as tmp:
        tmp.write_bytes(b"half")
        raise failure()
    assert out.read_bytes() == b"previous" and os.listdir(tmp_path) == ["a.csv"]


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["022", "077"])
def test_atomic_file_gives_the_umask_permissions_whatever_wrote_the_temporary_file(umask, tmp_path):
    old = os.umask(umask)
    try:
        with outputs.atomic_file(tmp_path / "a.bin") as tmp:
            os.chmod(tmp, 0o600)  # as mkstemp leaves it
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_file_fsyncs_before_the_rename(tmp_path, monkeypatch):
    calls = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(outputs.os, "fsync", lambda fd: calls.append("fsync") or fsync(fd))
    monkeypatch.setattr(outputs.os, "replace", lambda a, b: calls.append("replace") or replace(a, b))
    with outputs.atomic_file(tmp_path / "a.bin") as tmp:
        tmp.write_bytes(b"x")
    assert calls == ["fsync", "replace"]


def test_atomic_file_failure_names_the_destination_not_the_temporary_file(tmp_path):
    out = tmp_path / "result.json"
    with pytest.raises(OSError) as err, outputs.atomic_file(out):
        raise OSError(errno.ENOSPC, "No space left on device")  # a write to the temporary file: no file named
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(out)
    with pytest.raises(OSError) as err, outputs.atomic_file(out) as tmp:
        tmp.unlink()
        open(tmp, "rb")  # names the temporary file
    assert err.value.errno == errno.ENOENT and err.value.filename == str(out)
    other = tmp_path / "source.csv"
    with pytest.raises(OSError) as err, outputs.atomic_file(out):
        open(other, "rb")  # an error about another file keeps naming it
    assert err.value.filename == str(other)
    assert os.listdir(tmp_path) == []
