"""The bad-input corpus (issue 11's target): 30+ kinds of broken or hostile file, DICOM ones included,
through predict, explain, evaluate, train and the web app: no traceback, no NaN or missing probability
turned into a label, and every good file still processed."""

import csv
import io
import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscope.cli.main import main
from tests.conftest import make_kaggle_tree, synthetic_xray
from tests.dicom_util import write_dicom, write_malformed_dicoms


def _img_bytes(arr, fmt, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _dicom(tmp, name, stored, **kw) -> bytes:
    return write_dicom(tmp / name, stored, **kw).read_bytes()


def _dicom_edit(tmp, name, stored, **attrs) -> bytes:
    from pydicom import dcmread

    path = write_dicom(tmp / name, stored)
    ds = dcmread(path)
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.save_as(path)
    return path.read_bytes()


def _bomb_png() -> bytes:
    """A valid PNG header claiming 30,000 x 30,000 pixels (900 MP)."""
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def corpus(tmp: Path) -> dict[str, bytes]:
    """name -> bytes. Each is unreadable or not a radiograph; none may become a silent label."""
    rng = np.random.default_rng(0)
    good = synthetic_xray(rng, 1, size=96)
    jpeg = _img_bytes(good, "JPEG")
    png = _img_bytes(good, "PNG")
    ramp = np.arange(64 * 64).reshape(64, 64) % 4096
    return {
        "empty.png": b"",
        "truncated.jpeg": jpeg[: len(jpeg) // 3],
        "truncated.png": png[: len(png) // 2],
        "garbage.jpeg": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "html.jpeg": b"<html><body>not an image</body></html>",
        "text.png": b"just some text\n" * 20,
        "zip.png": b"PK\x03\x04" + b"\x00" * 100,
        "bomb.png": _bomb_png(),
        "png_as.jpeg": png,  # a PNG named .jpeg is read by content: fine, but must not crash
        "blank_grey.png": _img_bytes(np.full((512, 512), 128, np.uint8), "PNG"),
        "blank_black.png": _img_bytes(np.zeros((300, 300), np.uint8), "PNG"),
        "one_pixel.png": _img_bytes(np.full((1, 1), 200, np.uint8), "PNG"),
        "tiny.png": _img_bytes(rng.integers(0, 255, (8, 8), dtype=np.uint8), "PNG"),
        "sliver.png": _img_bytes(rng.integers(0, 255, (20, 900), dtype=np.uint8), "PNG"),
        "rgba.png": _img_bytes(np.dstack([good] * 3 + [np.zeros_like(good)]), "PNG"),
        "cmyk.jpeg": _cmyk(good),
        "palette.gif": _img_bytes(good, "GIF"),
        "sixteen_bit.png": _img_bytes(good.astype(np.uint16) * 257, "PNG"),
        "float_tiff.tif": _img_bytes(np.where(np.eye(64) > 0, np.nan, 0.5).astype(np.float32), "TIFF"),
        "window_zero.dcm": _dicom_edit(tmp, "w0.dcm", ramp, WindowCenter=2000, WindowWidth=0, VOILUTFunction="LINEAR_EXACT"),
        "window_negative.dcm": _dicom_edit(tmp, "wn.dcm", ramp, WindowCenter=2000, WindowWidth=-5),
        "window_nan.dcm": _dicom_edit(tmp, "wnan.dcm", ramp, WindowCenter="NaN", WindowWidth=400),
        "multiframe.dcm": _dicom(tmp, "mf.dcm", ramp, frames=2),
        "colour.dcm": _dicom_edit(tmp, "rgb.dcm", ramp, PhotometricInterpretation="RGB"),
        "no_pixels.dcm": _no_pixels(tmp),
        "truncated.dcm": _dicom(tmp, "t.dcm", ramp)[:-2000],
        "flat.dcm": _dicom(tmp, "flat.dcm", np.full((64, 64), 1000)),
        "not_dicom.dcm": b"DICM" * 50,
        # headers pydicom cannot interpret: NumberOfFrames "x", WindowCenter "abcd", VOI LUTs without a descriptor,
        # shorter than declared or of 0 bits, a Modality LUT without data
        **{name: path.read_bytes() for name, path in write_malformed_dicoms(tmp / "malformed").items()},
    }


def _cmyk(gray: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gray).convert("CMYK").save(buf, format="JPEG")
    return buf.getvalue()


def _no_pixels(tmp: Path) -> bytes:
    from pydicom import dcmread

    path = write_dicom(tmp / "np.dcm", np.zeros((8, 8)))
    ds = dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("corpus")
    (tmp / "work").mkdir()
    out = {}
    for name, data in corpus(tmp / "work").items():
        (tmp / name).write_bytes(data)
        out[name] = tmp / name
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tree = make_kaggle_tree(tmp_path_factory.mktemp("data") / "chest_xray", n_patients=10)
    run = tmp_path_factory.mktemp("run") / "run"
    assert main(["-q", "train", str(tree), "--out", str(run), "--pretrained", "none", "--epochs", "3", "--val-fraction", "0.3"]) == 0
    return run


def _good(tmp: Path, n=2) -> list[Path]:
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        p = tmp / f"good{i}.png"
        Image.fromarray(synthetic_xray(rng, i % 2, size=96)).save(p)
        out.append(p)
    return out


def test_the_corpus_is_large_and_varied(bad_files):
    assert len(bad_files) >= 30 and sum(n.endswith(".dcm") for n in bad_files) >= 14


def _check_rows(rows: list[dict], good: list[Path]):
    for r in rows:
        prob = r["prob"]
        if r["label"]:
            assert prob is not None and math.isfinite(float(prob)) and 0 <= float(prob) <= 1, r
            assert not r["ood"] and not r["ood_reason"], r  # a diagnosis only for what the model can assess
        elif r["ood"]:
            assert math.isfinite(float(prob)) and r["ood_reason"], r  # not assessable: the reason, the probability for information
        else:
            assert prob in (None, "") and r["error"], r  # no label without a finite probability, and the reason given
    by_path = {r["path"]: r for r in rows}
    assert all(by_path[str(g)]["label"] in ("NORMAL", "PNEUMONIA") for g in good)


def test_predict_answers_every_file_with_a_label_or_a_reason(run, bad_files, tmp_path, capsys):
    good = _good(tmp_path)
    code = main(["predict", str(run), *map(str, good), *map(str, bad_files.values()), "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in out + err
    rows = json.loads(out)  # strict JSON: a NaN would not parse
    assert len(rows) == len(good) + len(bad_files)
    _check_rows(rows, good)
    flagged = {Path(r["path"]).name for r in rows if r["ood"]}
    assert {"blank_grey.png", "blank_black.png", "one_pixel.png", "tiny.png", "sliver.png"} <= flagged | {
        Path(r["path"]).name for r in rows if r["error"]
    }


def test_explain_skips_the_bad_and_explains_the_good(run, bad_files, tmp_path, capsys):
    good = _good(tmp_path)
    code = main(["-q", "explain", str(run), *map(str, good), *map(str, bad_files.values()), "--out", str(tmp_path / "ex"), "--no-checks"])
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in out + err
    assert len(list((tmp_path / "ex").glob("*.png"))) >= len(good)


def _tree_with_bad_files(root: Path, bad_files: dict[str, Path]) -> Path:
    tree = make_kaggle_tree(root, n_patients=10)
    for i, (name, path) in enumerate(bad_files.items()):
        split = ("train", "test")[i % 2]
        cls = ("NORMAL", "PNEUMONIA")[(i // 2) % 2]
        (tree / split / cls / f"bad_{name}").write_bytes(path.read_bytes())
    return tree


def test_train_and_evaluate_skip_and_list_every_bad_file(bad_files, tmp_path, capsys):
    from tests.test_redteam import _specials, _within

    tree = _tree_with_bad_files(tmp_path / "data", bad_files)
    for folder in ("train/NORMAL", "test/PNEUMONIA"):  # a FIFO, device links and a dangling link: rows, never read (issue 23)
        _specials(tree / folder)
    (tree / "train" / "NORMAL" / "loop").symlink_to(tree / "train", target_is_directory=True)
    run = tmp_path / "run"
    code = _within(
        300, main, ["-q", "train", str(tree), "--out", str(run), "--pretrained", "none", "--epochs", "2", "--val-fraction", "0.3"]
    )
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in out + err and (run / "model.safetensors").is_file()
    ev = tmp_path / "ev"
    code = _within(300, main, ["-q", "evaluate", str(run), str(tree), "--out", str(ev), "--no-audit", "--bootstraps", "50"])
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in out + err
    preds = list(csv.DictReader(open(ev / "predictions.csv")))
    assert all(math.isfinite(float(r["prob"])) for r in preds) and len(preds) >= 8  # every good test image evaluated
    skipped = {Path(r["path"]).name for r in csv.DictReader(open(ev / "skipped.csv"))}
    assert any(n.startswith("bad_") for n in skipped)
    assert {"pipe.png", "zero.png", "random.jpeg", "gone.png"} <= skipped, skipped
    trained_skipped = {Path(r["path"]).name for r in csv.DictReader(open(run / "skipped.csv"))}
    assert {"pipe.png", "zero.png", "random.jpeg", "gone.png"} <= trained_skipped, trained_skipped


def test_the_web_app_answers_each_with_a_status_never_a_label_from_nothing(run, bad_files):
    from fastapi.testclient import TestClient

    from pneumoscope.inference.predictor import Predictor
    from pneumoscope.serving.app import create_app

    with TestClient(create_app(Predictor.load(run)), base_url="http://127.0.0.1") as client:
        for name, path in bad_files.items():
            r = client.post("/predict", files={"file": (name, path.read_bytes())})
            assert r.status_code in (200, 413, 415, 422), (name, r.status_code)
            assert "Traceback" not in r.text
            body = r.json()
            if r.status_code == 200:
                assert body["label"] is None or (math.isfinite(body["prob"]) and 0 <= body["prob"] <= 1), (name, body)
                assert not body["ood"] or (body["label"] is None and body["ood_reason"]), (name, body)  # flagged: no diagnosis
        good = _good(Path(bad_files["empty.png"]).parent, 1)[0]
        ok = client.post("/predict", files={"file": ("good.png", good.read_bytes())})
        assert ok.status_code == 200 and ok.json()["label"] in ("NORMAL", "PNEUMONIA")


def _labelled_site(root: Path, bad_files: dict[str, Path]) -> Path:
    """NORMAL/ and PNEUMONIA/ with 12 good images each, the corpus split between them, the special files and a
    branching chain of folder links (d0..d19, each linking x and y to the next) in NORMAL/."""
    from tests.test_redteam import _specials

    rng = np.random.default_rng(5)
    for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
        for k in range(12):
            (root / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(synthetic_xray(rng, label)).save(root / cls / f"site{k:02d}.png")
    for i, (name, path) in enumerate(bad_files.items()):
        (root / ("NORMAL", "PNEUMONIA")[i % 2] / f"bad_{name}").write_bytes(path.read_bytes())
    _specials(root / "NORMAL" / "odd")
    for i in range(20):
        (root / "NORMAL" / "chain" / f"d{i}").mkdir(parents=True)
    for i in range(19):
        for link in ("x", "y"):
            (root / "NORMAL" / "chain" / f"d{i}" / link).symlink_to(root / "NORMAL" / "chain" / f"d{i + 1}", target_is_directory=True)
    return root


@pytest.mark.slow
def test_data_inspect_pack_shift_adapt_and_calibrate_go_past_every_bad_file(run, bad_files, tmp_path, capsys):
    """Issue 23: the rest of the commands over the corpus, FIFOs, device links and a branching chain of links among
    good images: no traceback, no hang, each good image used, each bad one listed or dropped with its reason."""
    import zipfile

    from tests.test_redteam import _within

    site = _labelled_site(tmp_path / "site", bad_files)
    good = {f"site{k:02d}.png" for k in range(12)}
    commands = {
        "inspect": ["data", "inspect", str(site), "--json"],
        "pack": ["pack", str(site), "--out", str(tmp_path / "packed.zip")],
        "shift": ["shift", str(run), str(site), "--json"],
        "adapt": ["adapt", str(run), str(site), "--out", str(tmp_path / "adapted")],
        "calibrate": ["calibrate", str(run), str(site), "--out", str(tmp_path / "calibrated")],
    }
    outputs = {}
    for name, argv in commands.items():
        code = _within(120, main, ["-q", *argv])
        out, err = capsys.readouterr()
        assert code in (0, 1) and "Traceback" not in out + err, (name, code, err[-2000:])
        outputs[name] = out
    inspected = json.loads(outputs["inspect"])
    unreadable = {Path(u["path"]).name for u in inspected["unreadable"]}
    assert {"pipe.png", "zero.png", "random.jpeg", "gone.png", "bad_frames_x.dcm"} <= unreadable and not unreadable & good
    packed = {Path(n).name for n in zipfile.ZipFile(tmp_path / "packed.zip").namelist()}
    assert good <= packed and not {"pipe.png", "zero.png", "random.jpeg"} & packed
    assert json.loads(outputs["shift"])["n"] >= 2 * len(good)  # both classes' good images; the bad ones skipped
    for new_run in ("adapted", "calibrated"):
        assert (tmp_path / new_run / "model.safetensors").is_file()
