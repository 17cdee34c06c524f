"""Drawing only: every function takes computed results and returns a saved figure."""

from __future__ import annotations

import io
import os

import matplotlib

matplotlib.use("Agg")  # no display on servers; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .outputs import write_bytes_atomic  # noqa: E402


def _save(fig, path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def plot_history(history: list[dict], path, *, best_epoch: int | None = None) -> None:
    """Loss and accuracy, train vs val, per epoch (the notebook's history plot)."""
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in ((axes[0], "loss", "Loss"), (axes[1], "accuracy", "Accuracy")):
        ax.plot(epochs, [h[key] for h in history], label="train")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], label="val")
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"best (epoch {best_epoch})")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend()
    _save(fig, path)


def plot_confusion_matrix(cm: dict[str, int], class_names, path, *, title: str = "") -> None:
    """Heatmap with counts, rows = true class, columns = predicted."""
    m = np.array([[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]])
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    im = ax.imshow(m, cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > m.max() / 2 else "black", fontsize=13)
    ax.set_xticks([0, 1], class_names)
    ax.set_yticks([0, 1], class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "Confusion matrix")
    fig.colorbar(im, ax=ax, fraction=0.046)
    _save(fig, path)


def plot_roc(curve: dict, path, *, auc: float | None, operating_point: tuple[float, float] | None = None) -> None:
    """ROC curve; ``operating_point`` is (1 - specificity, sensitivity) at the threshold."""
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    ax.plot(curve["fpr"], curve["tpr"], label=f"ROC (AUC {auc:.3f})" if auc is not None else "ROC")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    _finish_unit_axes(ax, operating_point, "1 - specificity", "sensitivity", "lower right")
    _save(fig, path)


def _finish_unit_axes(ax, operating_point, xlabel: str, ylabel: str, legend_loc: str) -> None:
    if operating_point is not None:
        ax.plot(*operating_point, "o", color="crimson", label="operating point")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.legend(loc=legend_loc)


def plot_image_grid(images: list[np.ndarray], titles: list[str], path, *, cols: int = 4) -> None:
    """Grayscale images in a grid with titles (the notebook's sample grid)."""
    rows = max(1, int(np.ceil(len(images) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images, titles):
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=8)
    _save(fig, path)


def heatmap_rgb(cam: np.ndarray) -> np.ndarray:
    """A [0, 1] CAM as a jet-coloured RGB image (H, W, 3) in [0, 1]."""
    return matplotlib.colormaps["jet"](np.clip(cam, 0, 1))[..., :3]


def overlay_cam(image: np.ndarray, cam: np.ndarray, *, alpha: float = 0.4) -> np.ndarray:
    """Blend a [0, 1] CAM (same H, W as ``image``) as a jet heatmap over a grayscale image; RGB in [0, 1]."""
    heat = heatmap_rgb(cam)  # (H, W, 3)
    gray = np.repeat(np.clip(image, 0, 1)[..., None], 3, axis=2)  # (H, W, 3)
    return np.clip((1 - alpha) * gray + alpha * heat, 0.0, 1.0)


def plot_cam(image: np.ndarray, overlay: np.ndarray, path, *, title: str) -> None:
    """Original beside the Grad-CAM overlay (the notebook's display_gradcam)."""
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 4))
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("original")
    axes[1].imshow(overlay)
    axes[1].set_title("Grad-CAM")
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def plot_pr(precision: np.ndarray, recall: np.ndarray, path, *, ap: float | None, prevalence: float, operating_point: tuple[float, float] | None = None) -> None:
    """Precision-recall curve; ``operating_point`` is (sensitivity, PPV) at the threshold."""
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    ax.plot(recall, precision, label=f"PR (AP {ap:.3f})" if ap is not None else "PR")
    ax.axhline(prevalence, color="grey", ls=":", lw=1, label=f"prevalence {prevalence:.2f}")
    _finish_unit_axes(ax, operating_point, "sensitivity (recall)", "PPV (precision)", "lower left")
    _save(fig, path)


def plot_reliability(reliability: dict, path, *, ece: float, brier: float) -> None:
    """Observed frequency against mean predicted probability per bin, with bin counts."""
    used = reliability["count"] > 0
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(4.5, 5.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="perfect calibration")
    ax.plot(reliability["mean_predicted"][used], reliability["observed"][used], "o-", label=f"model (ECE {ece:.3f}, Brier {brier:.3f})")
    ax.set_ylabel("observed frequency of pneumonia")
    ax.legend(loc="upper left", fontsize=8)
    edges = reliability["edges"]
    axc.bar((edges[:-1] + edges[1:]) / 2, reliability["count"], width=np.diff(edges) * 0.9, color="silver")
    axc.set_xlabel("predicted P(pneumonia)")
    axc.set_ylabel("images")
    _save(fig, path)
