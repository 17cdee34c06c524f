"""report.html rendering on its own (issue 14: table of contents, click-to-enlarge figures)."""

import re

import numpy as np

from pneumoscope.description import HeadShape, RunDescription
from pneumoscope.backbones import Preprocessing
from pneumoscope.plots import plot_image_grid
from pneumoscope.report import model_card, render_report


def _description() -> RunDescription:
    return RunDescription(backbone="efficientnet_lite0", head=HeadShape(1280, 8, 0.3), preprocessing=Preprocessing(224, (0.5,) * 3, (0.5,) * 3),
                          threshold=0.5, threshold_policy="youden", temperature=1.25, training={"stage": "frozen backbone, head only"})  # fmt: skip


def _context(tmp_path):
    png = tmp_path / "f.png"
    plot_image_grid([np.zeros((8, 8))], ["x"], png, cols=1)
    metrics = {"n": 10, "n_positive": 6, "threshold": 0.5, "prevalence": 0.6, "ci95": {}}
    return {
        "title": "t", "metrics": metrics, "description": _description(),
        "data": {"source": "d", "split": "test", "skipped": 0}, "training_summary": None, "history": png,
        "figures": {"confusion_matrix": png, "reliability": png}, "gallery": [(png, "false positive: a.jpeg"), (png, "true negative: b.jpeg")],
        "model_card": {"Intended use": "research"}, "notes": [],
    }  # fmt: skip


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
    assert html.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 2 + 1 + 3 + 1  # title twice, source, a caption's alt, aria-label and caption, card
    assert "aria-label='enlarge true negative: a&#39;b&#34;.jpeg'" in html  # a quote cannot close the attribute


def test_the_operating_point_and_the_model_card_read_the_description(tmp_path):
    html = render_report(_context(tmp_path))
    assert "policy: youden." in html and "Temperature 1.250." in html
    card = model_card(_description(), {"n": 10, "n_positive": 6, "sensitivity": 0.5}, "data/test")
    assert card["Model details"].startswith("pneumoscope classifier: efficientnet_lite0 backbone") and "input 224 px" in card["Model details"]
    assert "Training stage: frozen backbone, head only." in card["Model details"] and "Threshold 0.5000 chosen by youden." in card["Metrics"]
    assert "recalibrated" not in card["Metrics"] and "unknown (? layout)" in card["Training data"]
