"""The ``pneumoscope explain`` command: overlays, raw maps, per-image check scores and their summary."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.decode import read_many
from ..errors import UsageError
from ..inference.inputs import expand_inputs
from ..inference.predictor import Predictor
from ..outputs import atomic_output_dir, npy_bytes, write_bytes_atomic, write_csv, write_json
from ..plots import overlay_cam, plot_cam
from ..runtime import progress_bar, seeded_rng
from .cams import check_method, views_and_cams
from .checks import REMOVE_PERCENT, SCORE_COLUMNS, check_batch, reinitialised_copy, summarize_checks

logger = logging.getLogger(__name__)


MAX_STEM = 50  # characters of an input name kept in output names: 4-byte UTF-8 and the suffixes stay under 255 bytes


@dataclass(frozen=True)
class Explanation:
    """One explained image: its path, probability (of :attr:`Predictor.prob_of`), the label decided as ``predict``
    decides it, the class explained and the overlay's file name."""

    path: str
    prob: float
    label: str
    target: str
    figure: str


def explain_images(
    predictor: Predictor,
    paths: list[str | os.PathLike],
    out: str | os.PathLike,
    *,
    target: str = "predicted",
    method: str = "gradcam",
    checks: bool = True,
    overwrite: bool = False,
    batch_size: int = 8,
    progress: bool = True,
) -> list[Explanation]:
    """The ``pneumoscope explain`` command: overlays, raw CAMs, per-image check scores and their summary."""
    check_method(method)
    files, problems = expand_inputs(paths)
    if not files:
        raise UsageError(f"none of the inputs {[str(p) for p in paths][:5]} is an image that can be read: {problems[0][1]}")
    # the checks draw from PyTorch's global RNG (reset_parameters, and ROAD's imputation noise: torch.randn_like
    # inside pytorch-grad-cam; neither takes a generator): seeded with 0 here, the caller's left as it was
    with seeded_rng(0):
        randomized = reinitialised_copy(predictor.model) if checks else None
        results, skipped, rows, unassessed = [], [{"path": p, "reason": why} for p, why in problems], [], []
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            (tmp / "cams").mkdir()
            bar = progress_bar(total=len(files), desc=f"explain ({method})", unit="img", enabled=progress)
            for start in range(0, len(files), batch_size):
                chunk = files[start : start + batch_size]
                decoded = read_many(chunk, predictor.read, log=logger)
                skipped += [{"path": path, "reason": why} for path, why in decoded.skipped]
                if decoded.images:
                    batch = _Batch([chunk[k] for k in decoded.index], decoded.images, seed=start)
                    explained = _assessable(predictor, batch, skipped, unassessed)
                    if explained is not None:
                        _explain_batch(
                            predictor, explained, tmp, target=target, method=method, randomized=randomized, results=results, rows=rows
                        )
                bar.update(len(chunk))
            bar.close()
            summary = _write_summary(
                tmp, predictor, method, checks=checks, results=results, rows=rows, skipped=skipped, unassessed=unassessed
            )
    if unassessed:
        logger.warning(
            "%d images not assessable (no diagnosis, so no map; e.g. %s: %s); listed in explanations.json",
            len(unassessed),
            unassessed[0]["path"],
            unassessed[0]["reason"],
        )
    if summary:
        logger.debug(
            "%s on %d images: ROAD drop %.3f (top %d%% removed) vs random %.3f: %s; sanity Spearman %.3f",
            method,
            summary["n"],
            summary["mean_road_most"],
            REMOVE_PERCENT,
            summary["mean_road_random"],
            summary["faithfulness_verdict"],
            summary["mean_sanity_spearman"],
        )
    return results


@dataclass(frozen=True)
class _Batch:
    paths: list  # the inputs that decoded
    images: list[np.ndarray]
    seed: int  # of the checks' random maps: the batch's first index among the inputs
    predictions: list | None = None  # each image's Prediction, as predict gives it


def _assessable(predictor: Predictor, batch: _Batch, skipped: list, unassessed: list) -> _Batch | None:
    """The images of ``batch`` the model gives a diagnosis for, with their predictions (None if none is).

    The rule is predict's and the web page's: an image the screen or the out-of-distribution guard flags gets no
    label, so no map of a decision it does not have; it is listed in ``unassessed`` with the reason (a non-finite
    output in ``skipped``)."""
    preds = predictor.predict_images(batch.images, [str(p) for p in batch.paths])
    keep = [j for j, p in enumerate(preds) if p.label is not None]
    for p in preds:
        if p.label is None and p.prob is None:
            skipped.append({"path": p.path, "reason": p.error})
        elif p.label is None:
            unassessed.append({"path": p.path, "prob": p.prob, "reason": p.ood_reason})
    if not keep:
        return None
    return _Batch([batch.paths[j] for j in keep], [batch.images[j] for j in keep], batch.seed, [preds[j] for j in keep])


def _explain_batch(
    predictor: Predictor, batch: _Batch, tmp: Path, *, target: str, method: str, randomized, results: list, rows: list
) -> None:
    """CAMs of a batch of decoded images (and, with ``randomized``, their check scores): an overlay and a raw map per
    image written to ``tmp``, and an :class:`Explanation` and a scores row appended to ``results`` and ``rows``."""
    images, preds = batch.images, batch.predictions
    probs = np.array([p.prob for p in preds])
    class_probs = [list(p.probs.values()) for p in preds] if predictor.multiclass else None
    views, cams, classes = views_and_cams(predictor, images, probs=probs, class_probs=class_probs, target=target, method=method)
    scores = None
    if randomized is not None:
        scores = check_batch(predictor, images, cams, classes, method, probs=probs, randomized=randomized, seed=batch.seed)
    for j, (path, shown) in enumerate(zip(batch.paths, views, strict=True)):
        i = len(results)
        label = preds[j].label
        name = f"{i:04d}_{Path(path).stem[:MAX_STEM]}"
        title = (
            f"{Path(path).name}: P({predictor.prob_of}) = {probs[j]:.3f} -> {label} (threshold {predictor.threshold:.3f}); "
            f"{method} for {predictor.class_names[classes[j]]}"
        )
        plot_cam(shown, overlay_cam(shown, cams[j]), tmp / f"{name}_{method}.png", title=title, method=method)
        write_bytes_atomic(tmp / "cams" / f"{name}.npy", npy_bytes(cams[j].astype(np.float16)))
        results.append(Explanation(str(path), float(probs[j]), label, predictor.class_names[classes[j]], f"{name}_{method}.png"))
        row = {"path": str(path), "prob": float(probs[j]), "label": label, "target": predictor.class_names[classes[j]]}
        if scores is not None:
            row.update({c: float(scores[c][j]) for c in SCORE_COLUMNS if c in scores})
        rows.append(row)


def _write_summary(
    tmp: Path, predictor: Predictor, method: str, *, checks: bool, results: list, rows: list, skipped: list, unassessed: list
) -> dict | None:
    """scores.csv and explanations.json; returns the checks' summary (None without checks or images)."""
    columns = ["path", "prob", "label", "target"] + (SCORE_COLUMNS if checks else [])
    write_csv(tmp / "scores.csv", columns, [[r.get(c) for c in columns] for r in rows])
    summary = summarize_checks(rows, method) if checks and rows else None
    write_json(
        tmp / "explanations.json",
        {
            "method": method,
            "layer": predictor.model.spec.cam_layer,
            "images": [e.__dict__ for e in results],
            "not_assessable": unassessed,
            "skipped": skipped,
            "checks": summary,
        },
    )
    return summary
