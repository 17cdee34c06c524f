"""The Python API (pneumoscope.load / predict / explain): every input type gives the CLI's answer; anything else is refused."""

import json

import numpy as np
import pydicom
import pytest
from PIL import Image

import pneumoscope
from pneumoscope.cli.main import main
from pneumoscope.inference.prediction import Prediction
from tests.conftest import PROB_ATOL
from tests.dicom_util import write_dicom


@pytest.fixture(scope="module")
def run(small_real_run):
    return small_real_run


@pytest.fixture(scope="module")
def model(run):
    return pneumoscope.load(run)


@pytest.fixture(scope="module")
def normal_jpeg():
    from tests.conftest import CHEST_XRAY

    return sorted((CHEST_XRAY / "test" / "NORMAL").iterdir())[0]


def cli_prob(run, path, capsys) -> float:
    capsys.readouterr()
    assert main(["-q", "predict", str(run), str(path), "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)[0]["prob"]


def test_load_is_exported_and_predict_gives_the_cli_fields(model, run, normal_jpeg, capsys):
    assert "load" in pneumoscope.__all__ and isinstance(model, pneumoscope.Model)
    one = model.predict(normal_jpeg)
    assert isinstance(one, Prediction) and one.label in ("NORMAL", "PNEUMONIA") and one.threshold == model.threshold
    assert one.ood in (True, False) and one.error == "" and one.path == str(normal_jpeg)
    assert abs(one.prob - cli_prob(run, normal_jpeg, capsys)) <= PROB_ATOL
    several = model.predict([normal_jpeg, str(normal_jpeg)])
    assert isinstance(several, list) and len(several) == 2 and all(abs(p.prob - one.prob) <= PROB_ATOL for p in several)


def test_every_accepted_input_gives_the_cli_probability(model, run, normal_jpeg, tmp_path, capsys):
    """uint8, uint16, float in [0, 1], PIL, RGB or grayscale, paths and DICOM datasets: each against `pneumoscope predict` on its file."""
    pixels = np.asarray(Image.open(normal_jpeg))  # what an imaging user holds: uint8 (H, W)
    assert pixels.dtype == np.uint8 and pixels.ndim == 2
    rgb = np.stack([pixels, np.roll(pixels, 3, axis=1), pixels // 2], axis=-1)  # a colour image whose luminance is not one channel
    Image.fromarray(rgb).save(rgb_png := tmp_path / "rgb.png")
    Image.fromarray(pixels.astype(np.uint16) * 257).save(png16 := tmp_path / "sixteen.png")
    dcm = write_dicom(tmp_path / "x.dcm", pixels.astype(np.uint16) * 16, window=(2047.5, 4096))
    rgba = np.concatenate([rgb, np.full((*pixels.shape, 1), 128, np.uint8)], axis=-1)
    cases = {
        normal_jpeg: [
            pixels,
            pixels[..., None],
            pixels.astype(np.float64) / 255,
            pixels.astype(np.float32) / 255,
            Image.open(normal_jpeg),
            str(normal_jpeg),
        ],
        rgb_png: [rgb, rgba, Image.open(rgb_png), Image.open(rgb_png).convert("RGBA"), rgb_png],
        png16: [np.asarray(Image.open(png16)), Image.open(png16), png16],
        dcm: [pydicom.dcmread(dcm), dcm],
    }
    assert np.asarray(Image.open(png16)).dtype == np.uint16
    for path, inputs in cases.items():
        expected = cli_prob(run, path, capsys)
        got = model.predict(inputs)
        for x, pred in zip(inputs, got, strict=True):
            assert pred.error == "" and abs(pred.prob - expected) <= PROB_ATOL, (
                path.name,
                type(x).__name__,
                getattr(x, "dtype", None),
                pred.prob,
                expected,
            )


def test_the_issue_case_uint8_array_is_no_longer_misread(model, run, normal_jpeg):
    """Issue 14: predict_proba([np.asarray(PIL.Image.open(f))]) went from 0.0025 to 0.91 silently."""
    predictor = model.predictor
    pixels = np.asarray(Image.open(normal_jpeg))
    for low_level in (
        lambda x: predictor.predict_proba([x]),
        lambda x: predictor.run([x]),
        lambda x: predictor.predict_images([x], ["x"]),
        lambda x: predictor.predict_proba([x], tta=True),
    ):
        with pytest.raises(ValueError, match=r"float \(H, W\) arrays in \[0, 1\]; got a uint8 array of shape"):
            low_level(pixels)
        with pytest.raises(ValueError, match=r"must lie in \[0, 1\], its values lie in \[\d+, \d+\]"):
            low_level(pixels.astype(np.float32))  # a uint8 image cast to float is not in [0, 1] either
    assert model.predict(pixels).prob == pytest.approx(predictor.predict_proba([predictor.read(normal_jpeg)])[0], abs=PROB_ATOL)


@pytest.mark.parametrize(
    "bad, given, expected",
    [
        (np.full((64, 64), 2.0), r"values lie in \[2, 2\]", r"must lie in \[0, 1\]"),
        (np.full((64, 64), -0.5, np.float32), r"values lie in \[-0.5, -0.5\]", r"must lie in \[0, 1\]"),
        (np.where(np.eye(64, dtype=bool), np.nan, 0.5), "holds 64 NaN", "Replace them"),
        (np.zeros((64, 64), np.int32), "dtype int32", r"expected uint8 \(0-255\), uint16 \(0-65535\) or float in \[0, 1\]"),
        (np.zeros((64, 64), bool), "dtype bool", "expected uint8"),
        (np.zeros((2, 64, 64), np.uint8), r"shape \(2, 64, 64\)", r"expected \(H, W\) grayscale or \(H, W, 3\|4\)"),
        (np.zeros((1, 3, 64, 64), np.float32), r"shape \(1, 3, 64, 64\)", r"expected \(H, W\)"),
        (np.zeros(64, np.uint8), r"shape \(64,\)", r"expected \(H, W\)"),
        (b"\x89PNG", "type bytes", "Pass a path, a PIL image, a pydicom Dataset"),
        (64, "type int", "Pass a path"),
    ],
    ids=["float>1", "float<0", "nan", "int32", "bool", "stack", "nchw", "1d", "bytes", "int"],
)
def test_refused_inputs_raise_naming_what_was_given(model, bad, given, expected):
    with pytest.raises(ValueError, match=given) as err:
        model.predict(bad)
    assert err.match(expected) and err.match("input 0")
    with pytest.raises(ValueError, match=given):  # one bad input in a list is refused too, not scored
        model.predict([np.full((64, 64), 0.5, np.float32), bad])


def test_an_unreadable_file_gives_an_error_record_as_the_cli_does(model, tmp_path):
    (empty := tmp_path / "empty.png").write_bytes(b"")
    pred = model.predict(empty)
    assert pred.prob is None and pred.label is None and "empty" in pred.error


def test_explain_returns_the_view_the_model_saw_and_its_map(model, normal_jpeg):
    pixels = np.asarray(Image.open(normal_jpeg))
    size = model.predictor.preprocessing.input_size
    maps = model.explain([pixels, normal_jpeg], target="pneumonia")
    assert len(maps) == 2 and all(m.target == "PNEUMONIA" and m.method == "gradcam" for m in maps)
    for m in maps:
        assert m.view.shape == m.cam.shape == (size, size) and m.cam.min() >= 0 and m.cam.max() <= 1 and m.cam.max() > 0
    np.testing.assert_allclose(maps[0].view, model.predictor.preprocessing_view(model.predictor.read(normal_jpeg)), atol=1e-6)
    np.testing.assert_allclose(maps[0].cam, maps[1].cam, atol=1e-5)
    assert maps[0].prediction.prob == pytest.approx(model.predict(pixels).prob, abs=PROB_ATOL)
    one = model.explain(pixels, target="normal")
    assert one.target == "NORMAL" and not np.allclose(one.cam, maps[0].cam)
    predicted = model.explain(pixels)
    assert predicted.target == predicted.prediction.label
    with pytest.raises(ValueError, match="target must be"):
        model.explain(pixels, target="covid")


def test_reprs_name_backbone_classes_threshold_and_input_size_and_a_maps_shape_not_its_arrays(model, run, normal_jpeg):
    """Issue 20: repr(model) was `<pneumoscope.api.Model object at 0x…>`; repr(CamMap) printed two 224x224 arrays."""
    size = model.predictor.preprocessing.input_size
    text = repr(model)
    assert text.startswith("Model(") and "backbone='efficientnet_lite0'" in text and "('NORMAL', 'PNEUMONIA')" in text
    assert f"threshold={model.threshold:.4f}" in text and f"input_size={size}" in text and str(run) in text and "0x" not in text
    cam = model.explain(normal_jpeg)
    text = repr(cam)
    assert f"shape=({size}, {size})" in text and f"target={cam.target!r}" in text and "method='gradcam'" in text, text
    assert "array" not in text and len(text) < 400 and normal_jpeg.name in text


def test_a_map_draws_its_overlay_as_a_pil_image_and_shows_itself_in_a_notebook(model, normal_jpeg):
    import io

    cam = model.explain(normal_jpeg)
    size = model.predictor.preprocessing.input_size
    over = cam.overlay()
    assert isinstance(over, Image.Image) and over.mode == "RGB" and over.size == (size, size)
    assert np.asarray(cam.overlay(alpha=0.0))[..., 0] == pytest.approx(np.round(cam.view * 255), abs=1)  # alpha 0: the view alone
    png = cam._repr_png_()
    assert png.startswith(b"\x89PNG") and np.array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(over))
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 2"):
        cam.overlay(alpha=2)


def test_one_missing_path_raises_file_not_found_and_a_list_keeps_a_record_for_it(model, normal_jpeg, tmp_path):
    missing = tmp_path / "nope.png"
    for call in (model.predict, model.explain):
        with pytest.raises(FileNotFoundError, match=f"{missing}: no such file. Fix: check the path") as err:
            call(missing)
        assert isinstance(err.value, pneumoscope.PneumoscopeError)
    several = model.predict([missing, normal_jpeg])
    assert several[0].prob is None and "No such file" in several[0].error and several[1].prob is not None


def test_everything_pneumoscope_exports_has_a_docstring_with_args_and_returns():
    for name in pneumoscope.__all__:
        if name != "__version__":
            assert (getattr(pneumoscope, name).__doc__ or "").strip(), f"pneumoscope.{name} has no docstring"
    for fn in (
        pneumoscope.load,
        pneumoscope.Model.predict,
        pneumoscope.Model.explain,
        pneumoscope.CamMap.overlay,
        pneumoscope.Prediction.to_dict,
    ):
        assert "Returns:" in fn.__doc__, fn.__qualname__
        assert "Args:" in fn.__doc__ or fn.__code__.co_argcount == 1, fn.__qualname__
    for prop in (pneumoscope.Model.threshold, pneumoscope.Model.class_names, pneumoscope.Model.input_size, pneumoscope.CamMap.shape):
        assert prop.__doc__
