"""A run meets a new site through the command line: shift, adapt without labels, calibrate with a few."""

import json
import logging

import numpy as np
import pytest

from pneumoscope.cli.main import main
from pneumoscope.models.sections import AdaptationSection, CalibrationSection, LeakageSection, ShiftBrief, TrainingSection
from tests.conftest import CHEST_XRAY, conforms


@pytest.fixture(scope="module")
def run(small_real_run):
    return small_real_run


def _site(root, n_per_class, *, labelled=False, offset=0):
    """Real test/ images as a site: one flat folder (unlabelled) or class folders (labelled), symlinked."""
    for cls in ("NORMAL", "PNEUMONIA"):
        folder = root / cls if labelled else root / "images" / cls.lower()[:3]  # nested, names not class names
        folder.mkdir(parents=True, exist_ok=True)
        for f in sorted((CHEST_XRAY / "test" / cls).iterdir())[offset : offset + n_per_class]:
            (folder / f.name).symlink_to(f)
    return root


def _distinct(folder) -> int:
    """How many different images (by their bytes) lie under ``folder``."""
    import hashlib

    return len(
        {hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in (".jpeg", ".jpg")}
    )


def test_shift_on_the_official_test_images_says_the_threshold_may_not_hold(run, capsys):
    assert main(["-q", "shift", str(run), str(CHEST_XRAY / "test"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == _distinct(CHEST_XRAY / "test") and report["shift_detected"] and report["mmd"]["p_value"] < 0.01
    assert "unlikely to hold" in report["verdict"] and "calibrate" in report["verdict"]
    assert 0.0 <= report["prevalence"]["bbse"] <= 1.0
    from pneumoscope.adaptation.assess import ShiftReport
    from pneumoscope.adaptation.shift import MmdTest, Prevalence

    conforms(report, ShiftReport)
    conforms(report["mmd"], MmdTest)
    conforms(report["prevalence"], Prevalence)


def test_shift_between_two_samples_of_the_training_site_is_not_called(run, tmp_path, capsys):
    from tests.conftest import CHEST_XRAY as root

    site = tmp_path / "same"
    site.mkdir()
    val = sorted((root / "train" / "NORMAL").iterdir())[-60:] + sorted((root / "train" / "PNEUMONIA").iterdir())[-120:]
    for f in val:
        (site / f.name).symlink_to(f)
    assert main(["-q", "shift", str(run), str(site), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # training-site images (some seen in training): no clear shift
    assert report["domain_auc"] < 0.7, report


def test_adapt_writes_a_run_that_records_its_images_and_method(run, tmp_path, capsys, caplog):
    site = _site(tmp_path / "site", 60)
    new = tmp_path / "adapted"
    assert main(["-q", "adapt", str(run), str(site), "--out", str(new)]) == 0
    desc = json.loads((new / "checkpoint.json").read_text())
    a = desc["adaptation"]
    distinct = _distinct(site)  # the official test images hold a few byte-identical copies: each image counts once
    assert a["n"] == distinct and len(a["image_sha256"]) == distinct and a["labels_used"] is False and a["method"] == "center+prior"
    assert a["shift_after"]["domain_auc"] < a["shift_before"]["domain_auc"]
    assert 0 < desc["threshold"] < 1 and desc["ood"]["cutoff"] >= json.loads((run / "checkpoint.json").read_text())["ood"]["cutoff"]
    # evaluating on the images it adapted on is flagged as transductive
    ev = tmp_path / "ev"
    with caplog.at_level(logging.WARNING):
        assert main(["-q", "evaluate", str(new), str(CHEST_XRAY), "--out", str(ev), "--bootstraps", "100", "--no-audit"]) == 0
    assert json.loads((ev / "metrics.json").read_text())["adapted_on_evaluated_images"] == 120
    assert "transductive" in caplog.text and "transductive" in (ev / "report.html").read_text()


def test_adapt_ignores_class_folder_names(run, tmp_path):
    """The same images in NORMAL/ PNEUMONIA/ folders or in one flat folder adapt identically."""
    flat, labelled = _site(tmp_path / "flat", 25), _site(tmp_path / "labelled", 25, labelled=True)
    assert main(["-q", "adapt", str(run), str(flat), "--out", str(tmp_path / "a"), "--method", "standardize"]) == 0
    assert main(["-q", "adapt", str(run), str(labelled), "--out", str(tmp_path / "b"), "--method", "standardize"]) == 0
    da, db = (json.loads((tmp_path / x / "checkpoint.json").read_text())["adaptation"] for x in "ab")
    assert da["image_sha256"] == db["image_sha256"] and da["estimated_prevalence"] == db["estimated_prevalence"]


@pytest.mark.slow
def test_an_adapted_run_exports_to_onnx_with_its_adaptation(run, tmp_path, capsys):
    from pneumoscope.inference.predictor import Predictor

    site = _site(tmp_path / "site", 30)
    new = tmp_path / "adapted"
    assert main(["-q", "adapt", str(run), str(site), "--out", str(new)]) == 0
    onnx = tmp_path / "adapted.onnx"
    assert main(["-q", "export", str(new), "--out", str(onnx), "--check-images", str(site)]) == 0
    images = [p for p in sorted(site.rglob("*.jpeg"))[:6]]
    torch_p = [r.prob for r in Predictor.load(new).predict_inputs(images)]
    onnx_p = [r.prob for r in Predictor.load(onnx).predict_inputs(images)]
    base_p = [r.prob for r in Predictor.load(run).predict_inputs(images)]
    np.testing.assert_allclose(onnx_p, torch_p, atol=1e-4)
    assert np.abs(np.array(torch_p) - np.array(base_p)).max() > 1e-3  # the adaptation is in the exported graph


def test_an_adapted_run_is_not_adapted_again(run, tmp_path, capsys):
    """A second adaptation would stack a second prior offset on the head's bias: refused, with the fix."""
    site = _site(tmp_path / "site", 25)
    assert main(["-q", "adapt", str(run), str(site), "--out", str(tmp_path / "once")]) == 0
    capsys.readouterr()
    entry = json.loads((tmp_path / "once" / "checkpoint.json").read_text())["adaptation"]
    conforms(entry, AdaptationSection)
    for brief in (entry["shift_before"], entry["shift_after"]):
        conforms(brief, ShiftBrief)
    assert main(["-q", "adapt", str(tmp_path / "once"), str(site), "--out", str(tmp_path / "twice")]) == 2
    assert "already adapted" in capsys.readouterr().err and not (tmp_path / "twice").exists()


def test_adapt_refuses_too_few_images(run, tmp_path, capsys):
    site = _site(tmp_path / "site", 5)
    assert main(["-q", "adapt", str(run), str(site), "--out", str(tmp_path / "a")]) == 2
    assert "at least 20" in capsys.readouterr().err


@pytest.mark.slow
def test_calibrate_refit_head_on_a_few_labelled_site_images(run, tmp_path, capsys):
    sample = _site(tmp_path / "sample", 20, labelled=True)
    new = tmp_path / "refit"
    assert main(["-q", "calibrate", str(run), str(sample), "--out", str(new), "--refit-head"]) == 0
    desc = json.loads((new / "checkpoint.json").read_text())
    assert "head refitted" in desc["calibration"]["method"] and desc["calibration"]["n"] == 40
    from safetensors.torch import load_file

    before, after = load_file(str(run / "model.safetensors")), load_file(str(new / "model.safetensors"))
    assert not np.allclose(before["head.fc2.weight"].numpy(), after["head.fc2.weight"].numpy())
    assert np.allclose(before["backbone.conv_stem.weight"].numpy(), after["backbone.conv_stem.weight"].numpy())


def test_refitting_the_head_leaves_the_global_rng_alone_and_is_reproducible():
    import torch

    from pneumoscope.adaptation.calibrate import refit_head
    from pneumoscope.models.classifier import FeatureAdapter, create_model

    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", pretrained="none", hidden=8).eval()
    features = np.random.default_rng(0).normal(size=(40, model.head.fc1.in_features)).astype(np.float32)
    y = np.arange(40) % 2
    model.adapter = FeatureAdapter.reference(features, y, seed=0)
    heads = []
    for seed in (1234, 99):
        torch.manual_seed(seed)
        state = torch.get_rng_state()
        heads.append(refit_head(model, features[:20], y[:20], steps=5))
        assert torch.initial_seed() == seed and torch.equal(torch.get_rng_state(), state)
    assert torch.equal(heads[0].fc1.weight, heads[1].fc1.weight)  # dropout's masks come from refit_head's own seed


# --------------------------------------------------------------------------- issue 23, item 7: copies are one image


def test_sixty_copies_of_one_image_are_not_a_site(run, tmp_path, capsys, caplog):
    """60 copies of one image were accepted as a site (prevalence 1.0, an offset of +2.93): they are one image."""
    import logging
    import shutil

    site = tmp_path / "site"
    site.mkdir()
    one = sorted((CHEST_XRAY / "test" / "PNEUMONIA").iterdir())[0]
    for i in range(60):
        shutil.copy(one, site / f"copy{i}.jpeg")
    for f in sorted((CHEST_XRAY / "test" / "NORMAL").iterdir())[:5]:
        shutil.copy(f, site / f.name)
    with caplog.at_level(logging.WARNING, logger="pneumoscope"):
        assert main(["-q", "adapt", str(run), str(site), "--out", str(tmp_path / "a")]) == 2
    assert "6 distinct readable images" in capsys.readouterr().err and "59 of 65 images are copies" in caplog.text


def test_calibrate_refuses_one_image_under_both_labels_and_counts_copies_once(run, tmp_path, capsys):
    import shutil

    sample = _site(tmp_path / "sample", 12, labelled=True)
    both = sorted((CHEST_XRAY / "test" / "NORMAL").iterdir())[0]
    shutil.copy(both, sample / "PNEUMONIA" / "also-normal.jpeg")  # the same bytes under both labels
    assert main(["-q", "calibrate", str(run), str(sample), "--out", str(tmp_path / "c")]) == 2
    assert "1 images carry two labels" in capsys.readouterr().err
    (sample / "PNEUMONIA" / "also-normal.jpeg").unlink()
    for cls in ("NORMAL", "PNEUMONIA"):  # 12 distinct images of each class and 3 copies of each class's first three
        for k, f in enumerate(sorted((sample / cls).iterdir())[:3]):
            shutil.copy(f, sample / cls / f"dup{k}-{f.name}")
    assert main(["-q", "calibrate", str(run), str(sample), "--out", str(tmp_path / "c2")]) == 0
    desc = json.loads((tmp_path / "c2" / "checkpoint.json").read_text())
    assert desc["calibration"]["n"] == 24  # the copies counted once


def test_train_and_calibrate_take_their_operating_point_from_the_one_fitter(run, tmp_path, monkeypatch, kaggle_tree):
    """Both fit their temperature and threshold through `fit_operating_point` and keep its policy text as it is: with the
    fitter's two steps replaced, what they write is what the fitter gave (before issue 21 a source-text test said so)."""
    from pneumoscope.metrics import operating_point

    monkeypatch.setattr(operating_point, "fit_temperature", lambda *_: 1.618)
    monkeypatch.setattr(operating_point, "compute_threshold", lambda *_: 0.3141)
    sample = _site(tmp_path / "sample", 12, labelled=True)
    trained = tmp_path / "trained"
    commands = (
        ["calibrate", str(run), str(sample), "--out", str(tmp_path / "cal")],
        ["train", str(kaggle_tree), "--out", str(trained), "--pretrained", "none", "--epochs", "2"],
    )
    for argv, out in zip(commands, (tmp_path / "cal", trained), strict=True):
        assert main(["-q", *argv]) == 0
        desc = json.loads((out / "checkpoint.json").read_text())
        assert (desc["threshold"], desc["temperature"]) == (0.3141, 1.618), argv[0]
        text = desc["threshold_policy"]  # the fitter's words, nothing edited into them
        policy, fitted_on = text.split(":")[0], text.split(" on ", 1)[1].removeprefix("kernel-smoothed ")
        assert text == operating_point.describe_policy(policy, None, fitted_on)
        assert ("local calibration sample" in text) == (argv[0] == "calibrate")
        conforms(
            desc["calibration" if argv[0] == "calibrate" else "training"], CalibrationSection if argv[0] == "calibrate" else TrainingSection
        )
        conforms(desc["leakage"], LeakageSection)
