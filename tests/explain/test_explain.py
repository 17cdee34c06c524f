import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pneumoscope.explain.cams import compute_cam
from pneumoscope.models.classifier import create_model


def _manual_gradcam(model, x, sign):
    """Grad-CAM by hand: weights = spatial mean of d(sign * logit)/dA; relu(sum w A); upsample; min-max."""
    acts = {}
    handle = model.cam_layer().register_forward_hook(lambda m, i, o: acts.setdefault("a", o))
    try:
        logit = model(x)[:, 0]
    finally:
        handle.remove()
    a = acts["a"]  # (B, K, h, w)
    (grads,) = torch.autograd.grad((sign * logit).sum(), a)
    w = grads.mean(dim=(2, 3), keepdim=True)  # (B, K, 1, 1)
    cam = F.relu((w * a).sum(1, keepdim=True))  # (B, 1, h, w)
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    lo = cam.amin(dim=(1, 2), keepdim=True)
    hi = cam.amax(dim=(1, 2), keepdim=True)
    return ((cam - lo) / (hi - lo + 1e-7)).detach().numpy()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("efficientnet_lite0", pretrained="imagenet", hidden=16).eval()


@pytest.mark.parametrize("target,sign", [(1, 1.0), (0, -1.0)])
def test_gradcam_matches_a_hand_computation_for_our_head(model, target, sign):
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    ours = compute_cam(model, x, target, method="gradcam")
    ref = _manual_gradcam(model, x, sign)
    assert ours.shape == (2, 224, 224) and np.isfinite(ours).all()
    assert ours.min() >= 0 and ours.max() <= 1
    for a, b in zip(ours, ref, strict=True):
        if b.max() > 0:
            assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.98


def test_normal_and_pneumonia_targets_explain_different_things(model):
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    pos, neg = compute_cam(model, x, 1, method="gradcam")[0], compute_cam(model, x, 0, method="gradcam")[0]
    # the NORMAL target is the negated logit: its pre-ReLU map is the negative of PNEUMONIA's,
    # so where one map is strong the other is (up to upsampling blur) zero
    assert pos.max() > 0 or neg.max() > 0
    assert neg[pos > 0.9].max(initial=0) < 0.1 and pos[neg > 0.9].max(initial=0) < 0.1


def test_hooks_are_released(model):
    layer = model.cam_layer()
    before = (len(layer._forward_hooks), len(layer._backward_hooks), len(layer._forward_pre_hooks))
    compute_cam(model, torch.randn(1, 3, 224, 224), 1, method="gradcam")
    assert (len(layer._forward_hooks), len(layer._backward_hooks), len(layer._forward_pre_hooks)) == before


def test_bad_target_is_refused(model):
    with pytest.raises(ValueError, match="target_class"):
        compute_cam(model, torch.randn(1, 3, 224, 224), 2, method="gradcam")


# --------------------------------------------------------------------------- issue 5: methods and checks

from pneumoscope.explain.cams import CAM_METHODS, views_and_cams  # noqa: E402
from pneumoscope.explain.checks import (  # noqa: E402
    MIN_FAITHFULNESS_IMAGES,
    border_mask,
    cam_mass_outside_centre,
    central_mask,
    compute_road,
    mask_region,
    random_maps,
    randomized_copy,
    spearman,
    summarize_checks,
)
from pneumoscope.explain.command import explain_images  # noqa: E402
from pneumoscope.models.backbones import BACKBONES  # noqa: E402


@pytest.mark.parametrize("name", sorted(BACKBONES))
@pytest.mark.parametrize("method", sorted(CAM_METHODS))
def test_every_method_on_every_backbone(name, method):
    torch.manual_seed(0)
    model = create_model(name, pretrained="none", hidden=8).eval()
    s = model.preprocessing.input_size
    layer = model.cam_layer()
    before = (len(layer._forward_hooks), len(layer._backward_hooks))
    maps = compute_cam(model, torch.randn(1, 3, s, s), [1], method)
    assert maps.shape == (1, s, s) and np.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1
    assert (len(layer._forward_hooks), len(layer._backward_hooks)) == before


class _PatchModel(torch.nn.Module):
    """Its logit is the brightness of the top-left quarter: the true explanation is known."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 1)
        torch.nn.init.constant_(self.conv.weight, 1 / 3)
        torch.nn.init.zeros_(self.conv.bias)

    def cam_layer(self):
        return self.conv

    def forward(self, x):
        q = x.shape[-1] // 4
        return 8 * (self.conv(x)[:, :, :q, :q].mean(dim=(1, 2, 3)) - 0.5)[:, None]


def test_road_rewards_the_true_map_over_random_maps():
    model = _PatchModel().eval()
    x = torch.full((4, 3, 64, 64), 0.2)
    x[:, :, :16, :16] = 1.0  # bright patch -> high logit
    true_map = np.zeros((4, 64, 64), np.float32)
    true_map[:, :16, :16] = 1.0
    true_map += np.random.default_rng(0).uniform(0, 0.01, true_map.shape).astype(np.float32)  # break ties
    drop_true = compute_road(model, x, true_map, [1] * 4, most_relevant=True, percent=10)
    drop_least = compute_road(model, x, true_map, [1] * 4, most_relevant=False, percent=10)
    drop_random = compute_road(model, x, random_maps(4, 64, np.random.default_rng(1)), [1] * 4, most_relevant=True, percent=10)
    assert drop_true.mean() < -0.3  # removing the patch kills the evidence
    assert abs(drop_least.mean()) < 0.05  # removing irrelevant pixels does nothing
    assert drop_true.mean() < drop_random.mean() - 0.1


def test_randomized_copy_changes_only_the_top():
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", pretrained="imagenet", hidden=8).eval()
    state = torch.get_rng_state()
    clone = randomized_copy(model, seed=1)
    assert torch.initial_seed() == 0 and torch.equal(torch.get_rng_state(), state)  # the caller's RNG as it was
    assert torch.equal(randomized_copy(model, seed=1).head.fc1.weight, clone.head.fc1.weight)  # and the copy reproducible
    assert torch.equal(clone.backbone.conv_stem.weight, model.backbone.conv_stem.weight)
    assert torch.equal(clone.backbone.blocks[5][0].conv_pw.weight, model.backbone.blocks[5][0].conv_pw.weight)
    assert not torch.equal(clone.backbone.conv_head.weight, model.backbone.conv_head.weight)
    assert not torch.equal(clone.head.fc1.weight, model.head.fc1.weight)


def test_spearman_of_a_map_with_itself_and_with_noise():
    m = random_maps(1, 224, np.random.default_rng(0))[0]
    assert spearman(m, m) == pytest.approx(1.0)
    assert abs(spearman(m, random_maps(1, 224, np.random.default_rng(5))[0])) < 0.5


def test_regions_and_cam_mass():
    shape = (200, 200)
    centre, border = central_mask(shape), border_mask(shape)
    assert centre.mean() == pytest.approx(0.7 * 0.6, abs=0.01)
    assert border.mean() == pytest.approx(1 - 0.8 * 0.8, abs=0.01)
    assert not (centre & border).any()
    assert cam_mass_outside_centre(centre.astype(np.float32)) == 0.0
    assert cam_mass_outside_centre(np.ones(shape, np.float32)) == pytest.approx(1 - centre.mean())
    img = np.random.default_rng(0).uniform(size=shape).astype(np.float32)
    masked = mask_region(img, border)
    assert np.allclose(masked[border], img[~border].mean()) and np.array_equal(masked[~border], img[~border])


def test_summary_verdict_follows_the_evidence():
    good = [{"road_most": -0.3 - 0.01 * i, "road_random": -0.05, "road_least": 0.0} for i in range(20)]
    bad = [{"road_most": -0.05 + 0.01 * (i % 3), "road_random": -0.05, "road_least": 0.0} for i in range(20)]
    partial = [{"road_most": -0.3 - 0.01 * i, "road_random": -0.05, "road_least": -0.4} for i in range(20)]
    assert summarize_checks(good, "gradcam")["faithfulness_verdict"] == "better than random maps"
    assert summarize_checks(good, "gradcam")["road_combined"] > 0
    assert summarize_checks(bad, "eigencam")["faithfulness_verdict"].startswith("NOT better")
    assert summarize_checks(partial, "x")["faithfulness_verdict"].startswith("only partly faithful")


def test_too_few_images_give_no_faithfulness_verdict():
    """With n < 5 a one-sided Wilcoxon test cannot reach p < 0.05: say so rather than call the map NOT better than random."""
    good = [{"road_most": -0.3 - 0.01 * i, "road_random": -0.05, "road_least": 0.0} for i in range(5)]
    two = summarize_checks(good[:2], "gradcam")
    assert two["road_vs_random_p"] is None
    assert two["faithfulness_verdict"] == f"too few images to test faithfulness: n=2, need ≥ {MIN_FAITHFULNESS_IMAGES}"
    assert summarize_checks(good, "gradcam")["faithfulness_verdict"] == "better than random maps"  # 5 is enough: p = 1/32


def test_evaluate_gallery_figures_carry_the_true_label(tiny_run, kaggle_tree, tmp_path, monkeypatch):
    """Issue 14: the report's Grad-CAM figures say what the image truly is, not only what the model decided."""
    from pneumoscope.data.layouts import load_dataset
    from pneumoscope.evaluation import figures
    from pneumoscope.evaluation.scoring import EvaluationResult
    from pneumoscope.inference.predictor import Predictor

    predictor = Predictor.from_checkpoint(tiny_run)  # threshold 0.5
    dataset = load_dataset(kaggle_tree)
    records = [r for label in (0, 1) for r in [r for r in dataset.records if r.split == "test" and r.label == label][:4]]
    y_true = np.array([r.label for r in records])
    y_prob = np.array([0.9, 0.8, 0.1, 0.2] * 2)  # errors and successes of both kinds
    result = EvaluationResult(records, [dataset.display(r) for r in records], y_true, y_prob, {}, [])
    drawn = []
    monkeypatch.setattr(figures, "plot_cam", lambda image, overlay, path, **kw: drawn.append(kw))
    gallery = figures.write_gallery(predictor, dataset, result, tmp_path)
    kinds = [caption.split(":")[0] for _, caption in gallery]
    assert set(kinds) == {"false positive", "false negative", "true positive", "true negative"}
    truth = {"false positive": "NORMAL", "true negative": "NORMAL", "false negative": "PNEUMONIA", "true positive": "PNEUMONIA"}
    assert [kw["true_label"] for kw in drawn] == [truth[k] for k in kinds]
    assert all(kw["title"].startswith(k) for kw, k in zip(drawn, kinds, strict=True))


def test_explaining_leaves_the_global_rng_alone_and_its_checks_are_reproducible(tiny_run, tmp_path):
    from PIL import Image

    from pneumoscope.inference.predictor import Predictor

    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(image)
    predictor = Predictor.from_checkpoint(tiny_run)
    scores = []
    for seed in (1234, 99):
        torch.manual_seed(seed)
        torch.rand(3)
        state = torch.get_rng_state()
        explain_images(predictor, [image], tmp_path / str(seed), checks=True, progress=False)
        assert torch.initial_seed() == seed and torch.equal(torch.get_rng_state(), state)
        scores.append((tmp_path / str(seed) / "scores.csv").read_text())
    assert scores[0] == scores[1]  # ROAD's noise and the randomised layers come from the checks' own seed


# --------------------------------------------------------------------------- issue 12: one path from images to CAMs


def test_views_and_cams_explain_the_class_decided_after_temperature(tiny_run):
    """The map explains prob >= threshold on the calibrated probability, and is compute_cam on the model's input."""
    from pneumoscope.inference.predictor import Predictor

    predictor = Predictor.from_checkpoint(tiny_run)
    rng = np.random.default_rng(0)
    images = [rng.uniform(size=(48 + 8 * k, 40)).astype(np.float32) for k in range(3)]
    raw = predictor.predict_proba(images)
    predictor.description = dataclasses.replace(predictor.description, temperature=4.0)
    probs = predictor.predict_proba(images)
    k = int(np.argmax(probs))
    predictor.description = dataclasses.replace(predictor.description, threshold=float(probs[k]))  # at it: PNEUMONIA; the two below: NORMAL
    assert raw[k] < predictor.threshold  # without the temperature it would be NORMAL too
    views, cams, classes = views_and_cams(predictor, images)
    assert classes == [int(i == k) for i in range(3)]
    x = torch.cat([predictor.preprocess(im) for im in images])  # (3, C, S, S)
    np.testing.assert_array_equal(cams, compute_cam(predictor.model, x, classes))
    for view, image in zip(views, images, strict=True):
        np.testing.assert_array_equal(view, predictor.preprocessing_view(image))
    # the caller's probabilities decide when given; a named target is explained whatever was decided
    assert views_and_cams(predictor, images, probs=[0.0, 1.0, 0.0])[2] == [0, 1, 0]
    _, normal, classes = views_and_cams(predictor, images, target="normal", method="gradcam++")
    assert classes == [0, 0, 0]
    np.testing.assert_array_equal(normal, compute_cam(predictor.model, x, 0, "gradcam++"))


def test_the_web_app_heatmap_is_the_cam_of_the_decided_class_over_its_view(tiny_run, tmp_path):
    from fastapi.testclient import TestClient
    from PIL import Image

    from pneumoscope.inference.predictor import Predictor
    from pneumoscope.plots import heatmap_rgb, overlay_cam
    from pneumoscope.serving.app import create_app
    from pneumoscope.serving.pipeline import _png

    path = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 260), dtype=np.uint8)).save(path)
    predictor = Predictor.from_checkpoint(tiny_run)
    client = TestClient(create_app(predictor), base_url="http://127.0.0.1")
    res = client.post("/predict?heatmap=true", files={"file": ("x.png", path.read_bytes())})
    assert res.status_code == 200, res.text
    body = res.json()
    (view,), (cam,), (cls,) = views_and_cams(predictor, [predictor.read(path)])
    assert body["cam_target"] == body["label"] == predictor.class_names[cls]
    assert body["heatmap_png"] == _png(heatmap_rgb(cam), alpha=np.ones_like(cam))
    assert body["overlay_png"] == _png(overlay_cam(view, cam))


def test_the_evaluation_gallery_explains_the_decision_on_the_evaluated_probability(tiny_run, kaggle_tree, tmp_path, monkeypatch):
    """Not a probability recomputed without test-time augmentation: the one the report shows."""
    from pathlib import Path

    from pneumoscope.data.layouts import load_dataset
    from pneumoscope.evaluation import figures
    from pneumoscope.evaluation.scoring import EvaluationResult
    from pneumoscope.inference.predictor import Predictor
    from pneumoscope.plots import overlay_cam

    predictor = Predictor.from_checkpoint(tiny_run)  # threshold 0.5; its own probabilities are all near 0.43
    dataset = load_dataset(kaggle_tree)
    records = [r for label in (0, 1) for r in [r for r in dataset.records if r.split == "test" and r.label == label][:4]]
    y_prob = np.array([0.9, 0.8, 0.1, 0.2] * 2)
    result = EvaluationResult(records, [dataset.display(r) for r in records], np.array([r.label for r in records]), y_prob, {}, [])
    drawn = []
    monkeypatch.setattr(figures, "plot_cam", lambda image, overlay, path, **kw: drawn.append((overlay, kw)))
    gallery = figures.write_gallery(predictor, dataset, result, tmp_path)
    place = {Path(p).name: i for i, p in enumerate(result.paths)}
    assert len(drawn) == len(gallery) == 8
    for (_, caption), (overlay, kw) in zip(gallery, drawn, strict=True):
        i = place[caption.split(": ", 1)[1].split(", ")[0]]
        cls = int(y_prob[i] >= 0.5)
        image = dataset.reader.read_image(records[i].ref, draft_size=predictor.preprocessing.input_size)
        cam = compute_cam(predictor.model, predictor.preprocess(image), cls)[0]
        assert kw["method"] == f"Grad-CAM for {predictor.class_names[cls]}"
        np.testing.assert_array_equal(overlay, overlay_cam(predictor.preprocessing_view(image), cam))


def test_explain_maps_only_what_predict_gives_a_diagnosis_and_labels_it_as_predict_does(tiny_run, tmp_path):
    """A blank image is not assessable for predict and the web page (no label, no heatmap): explain drew a map and wrote
    a label for it. Every label explain writes is predict's."""
    import json

    from PIL import Image

    import pneumoscope
    from pneumoscope.inference.predictor import Predictor
    from tests.conftest import synthetic_xray

    rng = np.random.default_rng(3)
    good = [tmp_path / f"good{i}.png" for i in range(3)]
    for i, path in enumerate(good):
        Image.fromarray(synthetic_xray(rng, i % 2)).save(path)
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((300, 300), 128, np.uint8)).save(blank)
    out = tmp_path / "ex"
    results = explain_images(Predictor.from_checkpoint(tiny_run), [*good, blank], out, checks=False, progress=False)
    written = json.loads((out / "explanations.json").read_text())
    predicted = {p.path: p for p in pneumoscope.load(tiny_run).predict([*map(str, good), str(blank)])}
    assert predicted[str(blank)].label is None
    assert [r.path for r in results] == [str(g) for g in good]
    assert all(r.label == predicted[r.path].label for r in results)
    assert [u["path"] for u in written["not_assessable"]] == [str(blank)] and written["not_assessable"][0]["reason"]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(r.figure for r in results)  # no map of the blank image
