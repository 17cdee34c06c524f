"""Figures: each plot_* draws what it is given (issue 14). The figure is caught before it is saved."""

import matplotlib
import numpy as np
import pytest

from pneumoscope import plots
from pneumoscope.metrics.calibration import compute_adaptive_reliability, compute_reliability
from pneumoscope.metrics.classification import compute_binary_metrics, compute_roc_curve
from pneumoscope.metrics.intervals import compute_pr_band, compute_roc_band


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions would save, in order; the PNGs are still written."""
    figs = []
    save = plots._save

    def keep(fig, path, **kwargs):
        figs.append(fig)
        save(fig, path, **kwargs)

    monkeypatch.setattr(plots, "_save", keep)
    return figs


def _texts(fig) -> str:
    parts = [t.get_text() for t in fig.findobj(matplotlib.text.Text)]
    return "\n".join(parts)


def _scores(seed=0, n=240):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = 1 / (1 + np.exp(-(2.5 * (y - 0.5) + rng.normal(0, 1.2, n))))
    return y, p, np.arange(n) // 3  # three images per patient


def test_confusion_matrix_shows_counts_and_row_percentages(drawn, tmp_path):
    cm = {"tn": 150, "fp": 84, "fn": 3, "tp": 387}
    plots.plot_confusion_matrix(cm, ["NORMAL", "PNEUMONIA"], tmp_path / "cm.png", title="n = 624")
    text = _texts(drawn[0])
    assert "150\n64.1%\nspecificity" in text and "387\n99.2%\nsensitivity" in text  # 150/234, 387/390
    assert "84\n35.9%" in text and "3\n0.8%" in text
    assert (tmp_path / "cm.png").stat().st_size > 1000


def test_roc_draws_the_band_and_writes_the_threshold_at_the_operating_point(drawn, tmp_path):
    y, p, groups = _scores()
    band = compute_roc_band(y, p, groups, n_boot=100, seed=0)
    m = compute_binary_metrics(y, p, 0.4)
    plots.plot_roc(
        compute_roc_curve(y, p),
        tmp_path / "roc.png",
        auc=m["roc_auc"],
        auc_ci=[0.8, 0.9],
        threshold=0.4,
        operating_point=(1 - m["specificity"], m["sensitivity"]),
        band=band,
    )
    fig = drawn[0]
    text = _texts(fig)
    assert "threshold 0.400" in text and f"sensitivity {m['sensitivity']:.2f}" in text
    assert "patient bootstrap" in text and "95% CI 0.800-0.900" in text
    ax = fig.axes[0]
    assert any(isinstance(c, matplotlib.collections.PolyCollection) for c in ax.collections)  # the band


def test_reliability_has_interval_bars_and_names_the_ece_bins(drawn, tmp_path):
    y, p, _ = _scores(1)
    rel = compute_adaptive_reliability(y, p, n_bins=8)
    plots.plot_reliability(rel, tmp_path / "rel.png", ece=0.05, brier=0.1, histogram=compute_reliability(y, p))
    fig = drawn[0]
    text = _texts(fig)
    assert "15 equal-width bins" in text and "equal-count" in text and "8 bins of ~30 images" in text
    bars = [c for c in fig.axes[0].collections if isinstance(c, matplotlib.collections.LineCollection)]
    segments = np.concatenate([b.get_segments() for b in bars])
    assert len(segments) == 2 * 8  # a vertical (Wilson) and a horizontal (span) bar per bin
    assert len(fig.axes) == 2


def test_pr_curve_has_a_title_and_a_patient_bootstrap_band(drawn, tmp_path):
    from sklearn.metrics import precision_recall_curve

    y, p, groups = _scores()
    band = compute_pr_band(y, p, groups, n_boot=100, seed=0)
    precision, recall, _ = precision_recall_curve(y, p)
    plots.plot_pr(
        precision, recall, tmp_path / "pr.png", ap=0.9, ap_ci=[0.85, 0.94], prevalence=y.mean(), operating_point=(0.8, 0.85), band=band
    )
    ax = drawn[0].axes[0]
    text = _texts(drawn[0])
    assert ax.get_title() == "Precision-recall curve"
    assert "patient bootstrap (100 resamples)" in text and "AP 0.900, 95% CI 0.850-0.940" in text
    assert any(isinstance(c, matplotlib.collections.PolyCollection) for c in ax.collections)  # the band


def test_reliability_names_the_range_of_bin_sizes_when_a_crowd_is_one_bin(drawn, tmp_path):
    rng = np.random.default_rng(0)
    p = np.r_[rng.uniform(0.97, 1.0, 300), rng.uniform(0.0, 0.97, 200)]
    y = (rng.uniform(size=p.size) < p).astype(int)
    rel = compute_adaptive_reliability(y, p)
    plots.plot_reliability(rel, tmp_path / "rel.png", ece=0.05, brier=0.1)
    text = _texts(drawn[0])
    assert f"{len(rel['count'])} bins of {rel['count'].min()}-{rel['count'].max()} images" in text and "~" not in text
    x = drawn[0].axes[0].lines[-1].get_xdata()  # the model's line: each bin at its mean prediction
    np.testing.assert_allclose(sorted(x), rel["mean_predicted"])
    plots.plot_reliability(compute_adaptive_reliability(y[:40], np.full(40, 0.5)), tmp_path / "rel1.png", ece=0.0, brier=0.25)
    assert "model: 1 bin of ~40 images" in _texts(drawn[1])  # every prediction in one crowd


def test_history_has_axis_labels_a_backbone_title_and_the_legend_outside_the_axes(drawn, tmp_path):
    history = [
        {"epoch": e, "loss": 1 / e, "accuracy": 1 - 1 / (e + 1), "val_loss": 1.1 / e, "val_accuracy": 0.9 - 1 / (e + 2)}
        for e in range(1, 9)
    ]
    plots.plot_history(history, tmp_path / "h.png", best_epoch=6, title="Training history: resnet50 backbone")
    fig = drawn[0]
    assert fig._suptitle.get_text() == "Training history: resnet50 backbone"
    assert all(ax.get_xlabel() == "epoch" and ax.get_ylabel() for ax in fig.axes)
    assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1
    fig.canvas.draw()
    legend_box = fig.legends[0].get_window_extent()
    assert all(not legend_box.overlaps(ax.get_window_extent()) for ax in fig.axes)


def test_cam_figure_has_a_colour_bar_a_uniform_colour_map_and_the_true_label(drawn, tmp_path):
    rng = np.random.default_rng(0)
    image, cam = rng.uniform(size=(32, 32)), rng.uniform(size=(32, 32))
    plots.plot_cam(
        image, plots.overlay_cam(image, cam), tmp_path / "cam.png", title="false positive: P(pneumonia) = 0.91", true_label="NORMAL"
    )
    fig = drawn[0]
    assert "true label: NORMAL" in fig._suptitle.get_text()
    colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(colorbars) == 1
    assert plots.CAM_CMAP in {"viridis", "inferno", "magma", "plasma", "cividis"}
    np.testing.assert_allclose(plots.heatmap_rgb(np.array([[0.0, 1.0]])), matplotlib.colormaps[plots.CAM_CMAP]([0.0, 1.0])[None, :, :3])


def test_importing_and_drawing_leave_matplotlib_backend_alone(tmp_path):
    import os
    import subprocess
    import sys

    code = (
        "import matplotlib, pneumoscope.plots as p; "
        f"p.plot_image_grid([[[0.5]]], ['x'], {str(tmp_path / 'g.png')!r}); print(matplotlib.get_backend())"
    )
    env = {**os.environ, "MPLBACKEND": "svg", "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == "svg" and (tmp_path / "g.png").stat().st_size > 0


def test_an_n_class_confusion_matrix_is_drawn_with_counts_and_row_shares(tmp_path):
    from PIL import Image as PILImage

    from pneumoscope.plots import plot_confusion_matrix_n

    out = tmp_path / "cm.png"
    plot_confusion_matrix_n([[10, 2, 1], [3, 20, 4], [0, 0, 0]], ["NORMAL", "BACTERIA", "VIRUS"], out)
    with PILImage.open(out) as im:
        assert im.width > 300 and im.height > 300  # an empty class (row of zeros) draws, as n/a
