"""report.html rendering on its own (issue 14: table of contents, click-to-enlarge figures)."""

import re

import numpy as np

from pneumoscope.data.preprocessing import Preprocessing
from pneumoscope.evaluation.report import model_card, render_report
from pneumoscope.models.description import HeadShape, RunDescription
from pneumoscope.plots import plot_image_grid


def _description() -> RunDescription:
    return RunDescription(
        backbone="efficientnet_lite0",
        head=HeadShape(1280, 8, 0.3),
        preprocessing=Preprocessing(224, (0.5,) * 3, (0.5,) * 3),
        threshold=0.5,
        threshold_policy="youden",
        temperature=1.25,
        training={"stage": "frozen backbone, head only"},
    )


def _context(tmp_path):
    png = tmp_path / "f.png"
    plot_image_grid([np.zeros((8, 8))], ["x"], png, cols=1)
    metrics = {"n": 10, "n_positive": 6, "threshold": 0.5, "prevalence": 0.6, "ci95": {}}
    return {
        "title": "t",
        "metrics": metrics,
        "description": _description(),
        "data": {"source": "d", "split": "test", "skipped": 0},
        "training_summary": None,
        "history": png,
        "figures": {"confusion_matrix": png, "reliability": png},
        "gallery": [(png, "false positive: a.jpeg"), (png, "true negative: b.jpeg")],
        "model_card": {"Intended use": "research"},
        "notes": [],
    }


def test_table_of_contents_links_every_section(tmp_path):
    html = render_report(_context(tmp_path))
    ids = re.findall(r"<h2 id='(section-\d+)'>(.*?)</h2>", html)
    links = re.findall(r"<li><a href='#(section-\d+)'>(.*?)</a></li>", html)
    assert ids == links and len(ids) == html.count("<h2") >= 5
    assert [t for _, t in ids][:2] == ["Data", "Training history"] and "Gallery" in ids[-2][1]
    assert html.index("<nav") < html.index("<h2")


def test_every_figure_enlarges_on_click_without_script(tmp_path):
    html = render_report(_context(tmp_path))
    n_images = html.count("<img")
    assert n_images == 1 + 2 + 2  # history, two figures, two gallery images
    assert html.count("<label class='zoom'") == n_images
    assert "<script" not in html


def test_values_from_the_data_are_escaped_never_markup(tmp_path):
    ctx = _context(tmp_path)
    evil = "<script>alert(1)</script>"
    ctx["title"] = f"pneumoscope evaluation: {evil}"
    ctx["data"] = {"source": f"/data/{evil}", "split": "test", "skipped": 0}
    ctx["gallery"] = [(ctx["history"], f"false positive: {evil}.jpeg"), (ctx["history"], "true negative: a'b\".jpeg")]
    ctx["model_card"] = {"Evaluation data": f"/data/{evil}: 10 images"}
    html = render_report(ctx)
    assert "<script" not in html
    assert (
        html.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 2 + 1 + 3 + 1
    )  # title twice, source, a caption's alt, aria-label and caption, card
    assert "aria-label='enlarge true negative: a&#39;b&#34;.jpeg'" in html  # a quote cannot close the attribute


def test_the_operating_point_and_the_model_card_read_the_description(tmp_path):
    html = render_report(_context(tmp_path))
    assert "policy: youden." in html and "Temperature 1.250." in html
    card = model_card(_description(), {"n": 10, "n_positive": 6, "sensitivity": 0.5}, "data/test")
    assert (
        card["Model details"].startswith("pneumoscope classifier: efficientnet_lite0 backbone") and "input 224 px" in card["Model details"]
    )
    assert (
        "Training stage: frozen backbone, head only." in card["Model details"] and "Threshold 0.5000 chosen by youden." in card["Metrics"]
    )
    assert "recalibrated" not in card["Metrics"] and "unknown (? layout)" in card["Training data"]


def _summary_context(tmp_path, *, val_specificity=0.956, val_ci=(0.91, 0.98)):
    """Issue 20's numbers: specificity 0.956 on validation, 0.564 on test."""
    from pneumoscope.metrics.clinical import DROP_RULE, compare_with_validation

    ctx = _context(tmp_path)
    test = {
        "n": 624,
        "n_positive": 390,
        "threshold": 0.5,
        "prevalence": 0.625,
        "sensitivity": 0.97,
        "specificity": 0.564,
        "ppv": 0.788,
        "balanced_accuracy": 0.767,
        "roc_auc": 0.93,
        "ci95": {"sensitivity": [0.95, 0.98], "specificity": [0.50, 0.63], "ppv": [0.75, 0.82], "roc_auc": [0.91, 0.95]},
        "not_assessable": {"n": 7, "guard": 6, "screen": 2, "note": ""},
    }
    val = {
        "n": 523,
        "threshold": 0.5,
        "prevalence": 0.74,
        "sensitivity": 0.96,
        "specificity": val_specificity,
        "ppv": 0.98,
        "balanced_accuracy": 0.958,
        "roc_auc": 0.99,
        "ci95": {"sensitivity": [0.94, 0.98], "specificity": list(val_ci), "roc_auc": [0.98, 1.0]},
    }
    ctx["metrics"] = test
    ctx["summary"] = {"rows": compare_with_validation(val, test), "validation": val, "rule": DROP_RULE}
    ctx["site_shift"] = {
        "shift_detected": True,
        "verdict": "The site's images differ from the training images.",
        "mmd": {"mmd2": 0.01, "p_value": 0.002},
        "domain_auc": 0.71,
        "prevalence": {"predicted_positive_rate": 0.7, "mixture": 0.4, "bbse": 0.5, "em": 0.45},
        "validation_prevalence": 0.74,
        "ood_fraction": 0.01,
    }
    ctx["shortcut_audit"] = {
        "n": 624,
        "method": "gradcam",
        "border_fraction": 0.1,
        "central_box": [0.15, 0.85, 0.2, 0.8],
        "central_area_fraction": 0.42,
        "mean_delta_border_masked": 0.05,
        "mean_abs_delta_border_masked": 0.16,
        "mean_delta_centre_masked": 0.02,
        "mean_abs_delta_centre_masked": 0.15,
        "mean_cam_outside_centre": 0.45,
        "shortcut_suspected": True,
        "verdict": "The decision leans on the image border: masking ...",
    }
    ctx["notes"] = ["3 of these images were used to adapt the model."]
    return ctx


def _text(html: str) -> str:
    from html import unescape

    return " ".join(unescape(re.sub(r"<[^>]+>", " ", html)).split())


def test_summary_comes_first_with_test_figures_validation_beside_them_and_the_drop_in_words(tmp_path):
    html = render_report(_summary_context(tmp_path))
    summary = html[html.index("<section class='summary'") : html.index("</section>")]
    assert html.index("<section class='summary'") < html.index("<nav") < html.index(">Data</h2>")
    ids = re.findall(r"<h2 id='(section-\d+)'>(.*?)</h2>", html)
    assert [t for _, t in ids][:3] == ["Summary", "Data", "Training history"]
    text = _text(summary)
    assert "On 624 test images (390 pneumonia, prevalence 0.625) at threshold 0.500" in text
    assert "Sensitivity (recall) 0.970 (95% CI 0.950 – 0.980)" in text and "Specificity 0.564 (95% CI 0.500 – 0.630)" in text
    assert "Specificity falls from 0.956 on validation to 0.564 on the test images (95% intervals 0.910 – 0.980 and 0.500 – 0.630)" in text
    assert "ROC AUC falls from 0.990 on validation to 0.930" in text  # [0.91, 0.95] wholly below [0.98, 1.0]
    assert "Sensitivity (recall) falls" not in text  # 0.96 -> 0.97 is a rise
    assert "do not overlap" in text  # the rule, stated
    table = summary[summary.index("<table id='summary-table'") :]
    assert "Positive predictive value (precision) falls from 0.980 on validation to 0.788" in text  # no validation interval: 0.82 < 0.98
    assert "it also follows the prevalence, 0.740 on validation and 0.625 here" in text
    assert "<th>validation</th><th>test</th>" in table and table.count("class='drop'") == 3
    assert "Site shift: The site's images differ from the training images." in text
    assert (
        "Not assessable: 7 of 624 images would get no label in use (6 flagged by the out-of-distribution guard, 2 by the image screen)"
        in text
    )
    assert "Shortcut audit: The decision leans on the image border" in text
    assert "3 of these images were used to adapt the model." in text and html.count("3 of these images were used") == 1


def test_summary_says_so_when_nothing_falls_beyond_the_intervals(tmp_path):
    html = render_report(_summary_context(tmp_path, val_specificity=0.60, val_ci=(0.52, 0.68)))
    text = _text(html[: html.index("</section>")])
    assert "Specificity falls" not in text and "ROC AUC falls" in text
    ctx = _summary_context(tmp_path)
    ctx["summary"]["rows"] = [dict(r, drop_flagged=False) for r in ctx["summary"]["rows"]]
    text = _text(render_report(ctx))
    assert (
        "No figure falls from validation to the test images by more than the 95% intervals explain." in text and "falls from 0." not in text
    )
    ctx["summary"]["validation"] = None
    assert "The run records no validation figures" in _text(render_report(ctx))


def test_summary_says_why_the_site_shift_was_not_assessed(tmp_path):
    ctx = _summary_context(tmp_path)
    ctx["site_shift"], ctx["summary"]["shift_skipped"] = None, "12 images, fewer than the 20 the test needs"
    text = _text(render_report(ctx))
    assert "Site shift: not assessed: 12 images, fewer than the 20 the test needs." in text


def test_metric_names_are_for_people_not_field_names(tmp_path):
    from pneumoscope.metrics.names import METRIC_NAMES, metric_name

    html = render_report(_summary_context(tmp_path))
    table = html[html.index("<table id='metrics-table'") :]
    table = table[: table.index("</table>")]
    names = re.findall(r"<tr><td>(.*?)</td>", table)
    assert names[:3] == ["Sensitivity (recall)", "Specificity", "Positive predictive value (precision)"]
    assert "Balanced accuracy" in names and "Expected calibration error (ECE)" in names
    assert not {"ppv", "npv", "balanced_accuracy", "roc_auc", "pr_auc", "brier", "ece"} & set(names)
    assert metric_name("npv") == METRIC_NAMES["npv"] == "Negative predictive value" and metric_name("unknown_field") == "unknown_field"


def test_metric_names_load_nothing_heavy():
    import subprocess
    import sys

    code = "import sys, pneumoscope.metrics.names; print(sorted(m for m in ('numpy', 'sklearn', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_page_is_laid_out_for_a_phone(tmp_path):
    html = render_report(_summary_context(tmp_path))
    assert "<meta name='viewport' content='width=device-width, initial-scale=1'>" in html
    assert html.count("<table") == html.count("<div class='scroll'><table")  # a wide table scrolls inside its box, not the page
    assert "minmax(min(480px,100%),1fr)" in html  # gallery cells no wider than a phone


def test_shortcut_verdict_names_the_border_when_it_moves_the_decision():
    from pneumoscope.explain.checks import shortcut_verdict

    base = {"method": "gradcam", "central_area_fraction": 0.42, "mean_cam_outside_centre": 0.45}
    leans, sentence = shortcut_verdict({**base, "mean_abs_delta_border_masked": 0.162, "mean_abs_delta_centre_masked": 0.152})
    assert leans and sentence.startswith("The decision leans on the image border: masking the border band changes P(pneumonia) by 0.162")
    assert "masking the chest centre by 0.152" in sentence and "about as much as" in sentence
    leans, sentence = shortcut_verdict({**base, "mean_abs_delta_border_masked": 0.02, "mean_abs_delta_centre_masked": 0.20})
    assert not leans and sentence.startswith("No sign of a border shortcut")
    leans, sentence = shortcut_verdict(
        {**base, "mean_abs_delta_border_masked": 0.02, "mean_abs_delta_centre_masked": 0.20, "mean_cam_outside_centre": 0.80}
    )
    assert leans and "80% of their mass outside the centre, which covers 58% of the image" in sentence
    leans, sentence = shortcut_verdict({**base, "mean_abs_delta_border_masked": 0.005, "mean_abs_delta_centre_masked": 0.004})
    assert not leans and sentence.startswith("Inconclusive")


def test_not_assessable_counts_the_guard_and_the_screen_and_says_what_it_could_not_count():
    from pneumoscope.evaluation.evaluate import count_not_assessable

    dist = np.array([1.0, 5.0, 9.0, 2.0])
    got = count_not_assessable(dist, 4.0, ["", "", "image is near-constant", "image is 10x10 pixels"])
    assert got == {"n": 3, "guard": 2, "screen": 2, "note": ""}  # image 2 is flagged by both, counted once
    got = count_not_assessable(dist, 4.0, None)
    assert (got["n"], got["guard"], got["screen"]) == (2, 2, None) and "Not counted: the image screen" in got["note"]
    got = count_not_assessable(None, None, None)
    assert got["n"] is None and "the OOD guard (the run has none)" in got["note"]


def test_the_model_card_names_the_runs_own_task_and_data():
    """Issue 22: the card said "one logit for PNEUMONIA", "pneumonia vs normal" and credited Kermany et al. for any run."""
    import dataclasses

    from pneumoscope.models.description import HeadShape

    desc = dataclasses.replace(
        _description(),
        class_names=("NORMAL", "BACTERIA", "VIRUS"),
        normal_class="NORMAL",
        head=HeadShape(in_features=1280, hidden=256, dropout=0.3, outputs=3),
        format_version=2,
        output="3 logits, one per class in class_names order; P(class) = softmax(logits / temperature)",
        training={"data": "/data/our-hospital", "layout": "class-folders", "stage": "frozen backbone, head only."},
    )
    per_class = {"NORMAL": {"n": 4}, "BACTERIA": {"n": 3}, "VIRUS": {"n": 3}}
    card = model_card(desc, {"n": 10, "n_positive": 6, "multiclass": {"per_class": per_class}}, "data/test")
    assert "3 logits, a softmax over NORMAL, BACTERIA, VIRUS" in card["Model details"] and "PNEUMONIA" not in card["Model details"]
    assert "NORMAL / BACTERIA / VIRUS classification" in card["Intended use"]
    assert card["Evaluation data"] == "data/test: 10 images, 6 not NORMAL (NORMAL 4, BACTERIA 3, VIRUS 3)."
    assert "Kermany" not in card["Training data"] + card["License and citation"] and "not recorded" in card["Training data"]
    kermany = dataclasses.replace(_description(), training={"data": "/x/chest_xray", "layout": "kaggle"})
    assert "Kermany et al. 2018" in model_card(kermany, {"n": 10, "n_positive": 6}, "t")["Training data"]


def test_an_audit_whose_maps_are_all_empty_says_so_without_nan(tiny_run, monkeypatch):
    """Every map empty (no activation): numpy's nanmean warned "Mean of empty slice" and the report said "nan%"."""
    import json
    import warnings

    from pneumoscope.explain import checks
    from pneumoscope.inference.predictor import Predictor

    predictor = Predictor.from_checkpoint(tiny_run)
    monkeypatch.setattr(checks, "views_and_cams", lambda p, images, **kw: (None, np.zeros((len(images), 8, 8)), None))
    images = [np.random.default_rng(i).uniform(size=(64, 64)).astype(np.float32) for i in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        audit = checks.audit_dataset(predictor, lambda i: images[i], 3, progress=False)
    assert audit["mean_cam_outside_centre"] is None and "maps are empty" in audit["verdict"] and "nan" not in audit["verdict"]
    json.dumps(audit, allow_nan=False)
