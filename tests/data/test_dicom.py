"""DICOM input: pydicom's own test files and DICOMs written here from real images."""

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from pneumoscope.data.decode import read_image
from pneumoscope.errors import ImageReadError
from tests.dicom_util import MALFORMED_HEADERS, write_dicom, write_malformed_dicoms


@pytest.fixture
def radiograph(real_data) -> np.ndarray:
    return read_image(next((real_data / "test" / "PNEUMONIA").iterdir()))


def test_pydicom_ct_applies_rescale_and_spans_unit_range():
    arr = read_image(get_testdata_file("CT_small.dcm"))
    assert arr.shape == (128, 128) and arr.dtype == np.float32
    assert arr.min() == 0.0 and arr.max() == 1.0


def test_pydicom_mr_uses_its_window():
    arr = read_image(get_testdata_file("MR_small.dcm"))  # window 600 / 1600
    assert arr.shape == (64, 64) and arr.min() >= 0 and arr.max() <= 1
    assert arr.max() == 1.0 and arr.min() > 0.1  # windowed, not min-max stretched


@pytest.mark.parametrize(
    "name,reason",
    [
        ("rtplan.dcm", "no pixel data"),
        ("reportsi.dcm", "no pixel data"),
        ("rtdose.dcm", "15 frames"),
        ("examples_rgb_color.dcm", "colour"),
        ("MR_truncated.dcm", "cannot be decoded"),
    ],
)
def test_unusable_dicoms_are_refused_with_the_reason(name, reason):
    with pytest.raises(ImageReadError, match=reason):
        read_image(get_testdata_file(name))


def _stretched(x):
    """Without a window, the full range of the image is shown (min -> black, max -> white)."""
    return (x - x.min()) / (x.max() - x.min())


def test_monochrome2_12bit_decodes_to_the_same_picture(radiograph, tmp_path):
    stored = np.rint(radiograph * 4095)
    arr = read_image(write_dicom(tmp_path / "m2.dcm", stored))
    np.testing.assert_allclose(arr, _stretched(radiograph), atol=2 / 4095)


def test_monochrome1_is_inverted_back(radiograph, tmp_path):
    stored = np.rint((1 - radiograph) * 4095)  # white stored as zero
    arr = read_image(write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1"))
    np.testing.assert_allclose(arr, _stretched(radiograph), atol=2 / 4095)


def test_rescale_and_window_give_the_same_picture(radiograph, tmp_path):
    # stored 1000..3000 for the picture, rescaled to -1000..1000 "units", windowed over exactly that span
    stored = np.rint(1000 + radiograph * 2000)
    arr = read_image(write_dicom(tmp_path / "w.dcm", stored, rescale=(1, -2000), window=(0, 2001)))
    np.testing.assert_allclose(arr, radiograph, atol=2e-3)
    # a narrower window clips: everything above the window is white
    narrow = read_image(write_dicom(tmp_path / "n.dcm", stored, rescale=(1, -2000), window=(-500, 1001)))
    assert (narrow[radiograph > 0.5] == 1.0).all()


def test_voi_lut_sequence_is_applied(radiograph, tmp_path):
    stored = np.rint(radiograph * 4095)
    lut = 65535 - np.arange(4096) * 16  # an inverting LUT: bright stored -> dark shown
    arr = read_image(write_dicom(tmp_path / "lut.dcm", stored, voi_lut=lut))
    np.testing.assert_allclose(arr, 1 - radiograph, atol=2e-3)


def test_multiframe_written_here_is_refused(tmp_path):
    with pytest.raises(ImageReadError, match="2 frames"):
        read_image(write_dicom(tmp_path / "mf.dcm", np.zeros((8, 8)), frames=2))


def test_dicom_without_extension_is_recognised(radiograph, tmp_path):
    path = write_dicom(tmp_path / "m2.dcm", np.rint(radiograph * 4095))
    plain = tmp_path / "IMG0001"
    plain.write_bytes(path.read_bytes())
    np.testing.assert_allclose(read_image(plain), read_image(path))


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "LINEAR", "SIGMOID"])
def test_a_zero_window_width_is_refused_never_nan(tmp_path, function):
    from pydicom import dcmread

    path = write_dicom(tmp_path / "w0.dcm", np.arange(64).reshape(8, 8) * 10, window=(300, 0))
    ds = dcmread(path)
    ds.VOILUTFunction = function
    ds.save_as(path)
    with pytest.raises(ImageReadError, match="WindowWidth 0.0"):
        read_image(path)


def test_a_width_one_linear_window_is_a_threshold_at_the_centre(tmp_path):
    arr = read_image(write_dicom(tmp_path / "w1.dcm", np.arange(64).reshape(8, 8), window=(32, 1)))
    assert set(np.unique(arr)) == {0.0, 1.0} and (arr.ravel()[:32] == 0).all() and (arr.ravel()[32:] == 1).all()


def test_every_decoder_output_is_checked_for_nan(tmp_path, monkeypatch):
    import pneumoscope.data.decode as io_mod

    monkeypatch.setattr(io_mod, "read_dicom", lambda path, data, max_pixels: np.full((4, 4), np.nan, np.float32))
    path = write_dicom(tmp_path / "nan.dcm", np.zeros((4, 4)))
    with pytest.raises(ImageReadError, match="NaN or infinite"):
        read_image(path)


def test_large_dicom_decodes_within_eight_bytes_a_pixel(tmp_path):
    """A server decodes uploads side by side: float64 temporaries took a 64-megapixel RLE DICOM to 1.6 GB."""
    import tracemalloc

    from tests.dicom_util import write_rle_dicom

    rows, cols = 3000, 2000
    path = write_rle_dicom(tmp_path / "big.dcm", rows, cols)
    data = path.read_bytes()
    assert len(data) < rows * cols / 16  # compressed: the pixels are the cost, not the upload
    tracemalloc.start()
    try:
        arr = read_image(path, data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert arr.shape == (rows, cols) and arr[0, 0] == 0.0 and arr[-1, 0] == 1.0
    assert peak < 8 * rows * cols, f"{peak / (rows * cols):.1f} bytes a pixel"


def test_image_pixels_reads_the_header_only(tmp_path):
    from PIL import Image

    from pneumoscope.data.decode import image_pixels
    from tests.dicom_util import write_rle_dicom

    dcm = write_rle_dicom(tmp_path / "h.dcm", 300, 200)
    assert image_pixels(dcm, dcm.read_bytes()) == 60_000
    png = tmp_path / "a.png"
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(png)
    assert image_pixels(png, png.read_bytes()) == 1200
    assert image_pixels("x.png", b"not an image") is None


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize("window", [(0, 2001), (-500, 1001), (100.5, 37.3), (32, 1)])
def test_windowing_equals_pydicoms_apply_windowing(tmp_path, function, window):
    """Our in-place float32 window against pydicom's float64 reference, rescaled to [0, 1]."""
    from pydicom import dcmread
    from pydicom.pixels import apply_windowing

    stored = np.random.default_rng(0).integers(1000, 3001, (64, 64))
    path = write_dicom(tmp_path / "w.dcm", stored, rescale=(1, -2000), window=window)
    ds = dcmread(path)
    ds.VOILUTFunction = function
    ds.save_as(path)
    y_min, y_max = -2000, 4095 - 2000  # the 12-bit stored range, rescaled
    with np.errstate(over="ignore"):  # exp overflows to inf far below a narrow sigmoid window: 1 / inf = 0
        ref = (apply_windowing(ds.pixel_array.astype(np.float64) - 2000, dcmread(path)) - y_min) / (y_max - y_min)
        ours = read_image(path)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- malformed headers: one unreadable file, never a whole command


@pytest.mark.parametrize("name", sorted(MALFORMED_HEADERS))
def test_a_malformed_header_is_an_unreadable_image_naming_the_part(tmp_path, name):
    path = write_malformed_dicoms(tmp_path)[name]
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    err = info.value
    assert err.path == str(path) and "cannot be interpreted" in err.reason and MALFORMED_HEADERS[name][1] in err.reason
    assert "Correct the header" in err.fix


@pytest.fixture
def folder_with_malformed(tmp_path) -> tuple[list, dict]:
    """NORMAL/ and PNEUMONIA/ of good synthetic PNGs, with every malformed DICOM among the NORMAL ones."""
    from PIL import Image

    from tests.conftest import synthetic_xray

    rng = np.random.default_rng(0)
    good = []
    for i in range(8):
        cls = ("NORMAL", "PNEUMONIA")[i % 2]
        (tmp_path / "data" / cls).mkdir(parents=True, exist_ok=True)
        good.append(tmp_path / "data" / cls / f"good{i}.png")
        Image.fromarray(synthetic_xray(rng, i % 2)).save(good[-1])
    return good, write_malformed_dicoms(tmp_path / "data" / "NORMAL")


def test_data_inspect_lists_the_malformed_dicoms_and_counts_the_rest(folder_with_malformed, capsys):
    import json

    from pneumoscope.cli.main import main

    good, bad = folder_with_malformed
    assert main(["-q", "data", "inspect", str(good[0].parent.parent), "--json"]) == 1  # done, some files unreadable
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == len(good)
    reasons = {row["path"]: row["reason"] for row in summary["unreadable"]}
    assert set(reasons) == set(map(str, bad.values())) and all("cannot be interpreted" in why for why in reasons.values())


def test_predict_gives_the_malformed_dicoms_an_error_and_the_rest_probabilities(folder_with_malformed, tiny_run, capsys):
    import csv

    from pneumoscope.cli.main import main

    good, bad = folder_with_malformed
    assert main(["-q", "predict", str(tiny_run), str(good[0].parent.parent), "--workers", "0"]) == 1
    rows = {r["path"]: r for r in csv.DictReader(capsys.readouterr().out.splitlines())}
    assert len(rows) == len(good) + len(bad)
    assert all(rows[str(p)]["prob"] and rows[str(p)]["label"] and not rows[str(p)]["error"] for p in good)
    assert all(not rows[str(p)]["prob"] and "cannot be interpreted" in rows[str(p)]["error"] for p in bad.values())


def test_the_server_answers_422_for_a_malformed_dicom_and_the_batch_still_answers_the_good_image(folder_with_malformed, tiny_run):
    from fastapi.testclient import TestClient

    from pneumoscope.inference.predictor import Predictor
    from pneumoscope.serving.app import create_app

    good, bad = folder_with_malformed
    with TestClient(create_app(Predictor.load(tiny_run)), base_url="http://127.0.0.1") as client:
        for name, path in bad.items():
            r = client.post("/predict", files={"file": (name, path.read_bytes())})
            assert r.status_code == 422 and "cannot be interpreted" in r.json()["detail"], (name, r.status_code, r.text)
            batch = client.post(
                "/predict/batch", files=[("files", (name, path.read_bytes())), ("files", ("good.png", good[0].read_bytes()))]
            )
            assert batch.status_code == 200, (name, batch.text)
            failed, ok = batch.json()["results"]
            assert failed["status"] == 422 and failed["prob"] is None and "cannot be interpreted" in failed["error"]
            assert ok["label"] in ("NORMAL", "PNEUMONIA") and 0 <= ok["prob"] <= 1
