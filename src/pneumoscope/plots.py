"""Drawing only: every function takes computed results and returns a saved figure."""

from __future__ import annotations

import io
import os

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .outputs import write_bytes_atomic


def _subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **kwargs):
    """``pyplot.subplots`` without pyplot: a Figure drawn by Agg, so no display is needed and
    matplotlib's backend and pyplot's list of open figures are left alone."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def _save(fig, path: str | os.PathLike, *, dpi: int = 110) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    write_bytes_atomic(path, buf.getvalue())


def plot_history(history: list[dict], path, *, best_epoch: int | None = None, title: str = "") -> None:
    """Loss and accuracy, train vs val, per epoch; one legend below both panels, clear of the curves."""
    epochs = [h["epoch"] for h in history]
    fig, axes = _subplots(1, 2, figsize=(10, 4.2))
    for ax, key, name, ylabel in ((axes[0], "loss", "Loss", "binary cross-entropy"), (axes[1], "accuracy", "Accuracy", "accuracy")):
        ax.plot(epochs, [h[key] for h in history], marker=".", label="train")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], marker=".", label="validation")
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"best epoch ({best_epoch}), weights kept")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(name)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(title or "Training history")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    _save(fig, path)


def plot_confusion_matrix(cm: dict[str, int], class_names, path, *, title: str = "") -> None:
    """Counts with row percentages (so the diagonal reads as specificity and sensitivity); colour = row share."""
    m = np.array([[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]])  # rows = true class, columns = predicted
    _draw_confusion(
        m,
        class_names,
        path,
        title=title,
        figsize=(5.2, 4.4),
        fontsize=12,
        xlabel="predicted",
        diagonal={(0, 0): "specificity", (1, 1): "sensitivity"},
    )


def plot_confusion_matrix_n(cm, class_names, path, *, title: str = "") -> None:
    """An N x N confusion matrix (rows true, columns predicted): counts with row percentages (the diagonal reads as
    each class's sensitivity); colour = row share."""
    k = len(class_names)
    _draw_confusion(
        np.asarray(cm),
        class_names,
        path,
        title=title,
        figsize=(2.0 + 1.4 * k, 1.6 + 1.2 * k),
        fontsize=11 if k <= 4 else 8,
        xlabel="predicted (most probable class)",
    )


def _draw_confusion(m: np.ndarray, class_names, path, *, title: str, figsize, fontsize: int, xlabel: str, diagonal=None) -> None:
    """The one confusion-matrix drawing: counts (rows true, columns predicted) over row shares, a cell's row share
    "n/a" for a class with no images, ``diagonal`` naming what some cells read as."""
    from sklearn.metrics import ConfusionMatrixDisplay

    rows = m.sum(axis=1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros(m.shape), where=rows > 0)  # row fractions
    fig, ax = _subplots(figsize=figsize)
    disp = ConfusionMatrixDisplay(share, display_labels=list(class_names))
    disp.plot(ax=ax, cmap="Blues", colorbar=False, im_kw={"vmin": 0, "vmax": 1})
    for (i, j), text in np.ndenumerate(disp.text_):
        pct = f"{share[i, j]:.1%}" if rows[i, 0] else "n/a"
        named = (diagonal or {}).get((i, j))
        text.set_text(f"{m[i, j]}\n{pct}" + (f"\n{named}" if named else ""))
        text.set_fontsize(fontsize)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("true")
    ax.set_yticks(range(len(class_names)), [f"{c}\n(n = {n})" for c, n in zip(class_names, rows[:, 0], strict=True)])
    ax.set_title((title + "\n" if title else "") + "count and % of the true class (row)", fontsize=10)
    cbar = fig.colorbar(disp.im_, ax=ax, fraction=0.046)
    cbar.set_label("share of the row")
    _save(fig, path)


def plot_roc(
    curve: dict,
    path,
    *,
    auc: float | None,
    operating_point: tuple[float, float] | None = None,
    threshold: float | None = None,
    band: dict | None = None,
    auc_ci: list[float] | None = None,
) -> None:
    """ROC curve with an optional bootstrap band (:func:`~pneumoscope.metrics.compute_roc_band`);
    ``operating_point`` is (1 - specificity, sensitivity) at ``threshold``, which is written beside it."""
    from sklearn.metrics import RocCurveDisplay

    fig, ax = _subplots(figsize=(5, 4.8))
    if band is not None:
        ax.fill_between(
            band["fpr"],
            band["tpr_lower"],
            band["tpr_upper"],
            step="post",
            color="C0",
            alpha=0.2,
            lw=0,
            label=f"{band['confidence']:.0%} band, patient bootstrap ({band['n_resamples']} resamples)",
        )
    name = "ROC" if auc is None else f"ROC (AUC {auc:.3f}" + (f", 95% CI {auc_ci[0]:.3f}-{auc_ci[1]:.3f})" if auc_ci else ")")
    RocCurveDisplay(fpr=curve["fpr"], tpr=curve["tpr"]).plot(ax=ax, name=name)
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="chance")
    if operating_point is not None and threshold is not None:
        x, y = operating_point
        ax.annotate(
            f"threshold {threshold:.3f}\nsensitivity {y:.2f}\nspecificity {1 - x:.2f}",
            (x, y),
            xytext=(x + 0.12, y - 0.28),
            fontsize=9,
            arrowprops={"arrowstyle": "-", "color": "crimson"},
            bbox={"boxstyle": "round", "fc": "white", "ec": "crimson"},
        )
    _finish_unit_axes(ax, operating_point, "1 - specificity (false positive rate)", "sensitivity (true positive rate)", "lower right")
    ax.set_title("ROC curve")
    _save(fig, path)


def _finish_unit_axes(ax, operating_point, xlabel: str, ylabel: str, legend_loc: str) -> None:
    if operating_point is not None:
        ax.plot(*operating_point, "o", color="crimson", ms=7, zorder=5, label="operating point")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.legend(loc=legend_loc, fontsize=8)


def plot_image_grid(images: list[np.ndarray], titles: list[str], path, *, cols: int = 4) -> None:
    """Grayscale images in a grid with titles (the notebook's sample grid)."""
    rows = max(1, int(np.ceil(len(images) / cols)))
    fig, axes = _subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images, titles, strict=False):
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=8)
    _save(fig, path)


CAM_CMAP = "inferno"  # perceptually uniform and still ordered in greyscale; jet invents edges where there are none


def heatmap_rgb(cam: np.ndarray) -> np.ndarray:
    """A [0, 1] CAM coloured with :data:`CAM_CMAP` as an RGB image (H, W, 3) in [0, 1]."""
    return matplotlib.colormaps[CAM_CMAP](np.clip(cam, 0, 1))[..., :3]


def overlay_cam(image: np.ndarray, cam: np.ndarray, *, alpha: float = 0.45) -> np.ndarray:
    """Blend a [0, 1] CAM (same H, W as ``image``) as a :data:`CAM_CMAP` heatmap over a grayscale image; RGB in [0, 1]."""
    heat = heatmap_rgb(cam)  # (H, W, 3)
    gray = np.repeat(np.clip(image, 0, 1)[..., None], 3, axis=2)  # (H, W, 3)
    return np.clip((1 - alpha) * gray + alpha * heat, 0.0, 1.0)


def plot_cam(image: np.ndarray, overlay: np.ndarray, path, *, title: str, true_label: str | None = None, method: str = "Grad-CAM") -> None:
    """Original beside the CAM overlay, with a colour bar for the map; the true label in the title when known."""
    fig, axes = _subplots(1, 2, figsize=(7.2, 4.0), gridspec_kw={"wspace": 0.04})
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("image as the model sees it", fontsize=11)
    axes[1].imshow(overlay)
    axes[1].set_title(method, fontsize=11)
    for ax in axes:
        ax.axis("off")
    mappable = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, 1), cmap=CAM_CMAP)
    cbar = fig.colorbar(mappable, ax=axes, fraction=0.035, pad=0.02, shrink=0.82)
    cbar.set_label("relative weight in the map", fontsize=9)
    fig.suptitle(title + (f"\ntrue label: {true_label}" if true_label else ""), fontsize=12)
    _save(fig, path, dpi=150)  # sharp when the report enlarges it to the window


def plot_pr(
    precision: np.ndarray,
    recall: np.ndarray,
    path,
    *,
    ap: float | None,
    prevalence: float,
    operating_point: tuple[float, float] | None = None,
    band: dict | None = None,
    ap_ci: list[float] | None = None,
) -> None:
    """Precision-recall curve with an optional bootstrap band (:func:`~pneumoscope.metrics.compute_pr_band`);
    ``operating_point`` is (sensitivity, PPV) at the threshold."""
    fig, ax = _subplots(figsize=(5, 4.8))
    if band is not None:
        ax.fill_between(
            band["recall"],
            band["precision_lower"],
            band["precision_upper"],
            color="C0",
            alpha=0.2,
            lw=0,
            label=f"{band['confidence']:.0%} band, patient bootstrap ({band['n_resamples']} resamples)",
        )
    name = "PR" if ap is None else f"PR (AP {ap:.3f}" + (f", 95% CI {ap_ci[0]:.3f}-{ap_ci[1]:.3f})" if ap_ci else ")")
    ax.plot(recall, precision, color="C0", drawstyle="steps-post", label=name)
    ax.axhline(prevalence, color="grey", ls=":", lw=1, label=f"chance: prevalence {prevalence:.2f}")
    _finish_unit_axes(ax, operating_point, "sensitivity (recall)", "PPV (precision)", "lower left")
    ax.set_title("Precision-recall curve")
    _save(fig, path)


def plot_reliability(reliability: dict, path, *, ece: float, brier: float, ece_bins: int = 15, histogram: dict | None = None) -> None:
    """Reliability diagram on bins placed where the predictions are (:func:`~pneumoscope.metrics.compute_adaptive_reliability`):
    observed frequency against the bin's mean prediction, vertical bars the Wilson interval, horizontal bars the bin's
    span of predictions.

    ``histogram`` (:func:`~pneumoscope.metrics.compute_reliability`, equal-width) draws below where the predictions lie.
    """
    from sklearn.calibration import CalibrationDisplay

    rel = reliability
    if histogram is not None:
        fig, (ax, axh) = _subplots(2, 1, figsize=(5, 5.8), sharex=True, gridspec_kw={"height_ratios": [3.2, 1]})
    else:
        fig, ax = _subplots(figsize=(5, 4.6))
    counts = rel["count"]
    sizes = f"~{int(np.median(counts))}" if counts.max() - counts.min() <= 1 else f"{counts.min()}-{counts.max()}"
    name = f"model: {len(counts)} bin{'s' if len(counts) > 1 else ''} of {sizes} images"
    CalibrationDisplay(rel["observed"], rel["mean_predicted"], None).plot(ax=ax, name=name, color="C0")
    yerr = np.vstack([rel["observed"] - rel["observed_lower"], rel["observed_upper"] - rel["observed"]])  # (2, n_bins)
    xerr = np.vstack([rel["mean_predicted"] - rel["edges"][:, 0], rel["edges"][:, 1] - rel["mean_predicted"]])
    ax.errorbar(
        rel["mean_predicted"],
        rel["observed"],
        yerr=yerr,
        xerr=xerr,
        fmt="none",
        ecolor="C0",
        elinewidth=1,
        capsize=2,
        alpha=0.6,
        label=f"{rel['confidence']:.0%} Wilson interval; bin's span of predictions",
    )
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal" if histogram is None else "auto")
    ax.set_xlabel("" if histogram is not None else "predicted P(pneumonia)")
    ax.set_ylabel("observed frequency of pneumonia")
    ax.set_title(f"Reliability (adaptive equal-count bins)\nECE {ece:.3f} ({ece_bins} equal-width bins), Brier {brier:.3f}", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    if histogram is not None:
        edges = histogram["edges"]
        axh.bar((edges[:-1] + edges[1:]) / 2, histogram["count"], width=np.diff(edges) * 0.9, color="silver")
        axh.set_xlabel("predicted P(pneumonia)")
        axh.set_ylabel("images")
        axh.set_title("where the predictions lie", fontsize=9)
    _save(fig, path)
