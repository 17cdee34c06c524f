"""Evaluate a trained run on labelled data: predictions, metrics with intervals, figures, report."""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import numpy as np

from ..data.decode import screen_image
from ..data.records import Dataset, Record
from ..inference.predictor import Predictor
from ..metrics.clinical import DROP_RULE, compare_with_validation
from ..models.checkpoint import RunFolder
from ..outputs import atomic_output_dir, check_output_dir, write_bytes_atomic, write_csv, write_json
from .figures import screening_names, write_figures, write_gallery
from .report import model_card, render_report
from .scoring import EvaluationResult, evaluate_dataset, not_assessable_flags
from .tables import write_tables

logger = logging.getLogger(__name__)


def count_not_assessable(ood_distance: np.ndarray | None, cutoff: float | None, screened: list[str] | None) -> dict:
    """How many of the evaluated images inference would give no label (``predict.Predictor``: the image screen or the
    OOD guard flags them). ``guard`` or ``screen`` is None where that check could not be counted (no guard; images
    not decoded); ``n`` counts the images either flags. The metrics still include these images."""
    guard, screen = not_assessable_flags(ood_distance, cutoff, screened)  # (N,) bool each, or None
    flagged = [f for f in (guard, screen) if f is not None]
    either = np.logical_or.reduce(flagged) if flagged else None
    unchecked = [
        f"{name} ({why})"
        for name, flags, why in (
            ("the OOD guard", guard, "the run has none"),
            ("the image screen", screen, "it needs the decoded images, which the shortcut audit decodes and --no-audit skips"),
        )
        if flags is None
    ]
    return {
        "n": None if either is None else int(either.sum()),
        "guard": None if guard is None else int(guard.sum()),
        "screen": None if screen is None else int(screen.sum()),
        "note": f"Not counted: {'; '.join(unchecked)}." if unchecked else "",
    }


def _site_shift(predictor: Predictor, result: EvaluationResult) -> tuple[dict | None, str]:
    """How the evaluated images differ from the training split, as `pneumoscope shift` reports it (runs that keep
    training feature statistics, features computed for the evaluation, and at least a few dozen images), or None
    and why not."""
    from ..adaptation.assess import assess_site
    from ..adaptation.shift import MIN_SITE_IMAGES

    if predictor.model.adapter is None:
        return None, "the run keeps no training feature statistics to compare with"
    if result.features is None:
        return None, "test-time augmentation computes no pooled features to compare"
    if len(result.records) < MIN_SITE_IMAGES:
        return None, f"{len(result.records)} images, fewer than the {MIN_SITE_IMAGES} the test needs"
    return assess_site(predictor, result.features, n_perm=200), ""


def seen_in_training(run_folder: RunFolder, records: list[Record]) -> list[Record]:
    """The records whose bytes match an image the run was trained or validated on (by the SHA-256 in its splits.csv)."""
    if not run_folder.splits.is_file():
        return []
    with open(run_folder.splits, newline="", encoding="utf-8", errors="replace") as fh:
        fitted = {row.get("sha256") for row in csv.DictReader(fh) if row.get("split") in ("train", "val") and row.get("status") == "used"}
    fitted.discard("")
    fitted.discard(None)
    return [r for r in records if r.content_hash and r.content_hash in fitted]


def evaluate_run(
    run: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    split: str = "test",
    limit: int | None = None,
    overwrite: bool = False,
    cache_dir=None,
    n_boot: int = 2000,
    audit_shortcuts: bool = True,
    tta: bool = False,
    progress: bool = True,
) -> tuple[Path, EvaluationResult]:
    """The ``pneumoscope evaluate`` command: (the folder written, the evaluation)."""
    check_output_dir(out, overwrite)
    predictor = Predictor.from_checkpoint(run)
    dataset = predictor.load_labelled(data)
    result = evaluate_dataset(predictor, dataset, split=split, limit=limit, cache_dir=cache_dir, n_boot=n_boot, tta=tta, progress=progress)
    m = result.metrics
    run_folder = RunFolder.of(run)
    shown_split = split if dataset.layout != "class-folders" else "all"
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        write_tables(tmp, predictor, result)
        figures = write_figures(tmp, result, screening_names(predictor), n_boot=n_boot)
        if result.problems:
            write_csv(tmp / "skipped.csv", ["path", "reason"], result.problems)
        gallery = write_gallery(predictor, dataset, result, tmp)
        audit, screened = None, result.screened
        if audit_shortcuts:
            audit, screens = _write_audit(tmp, predictor, dataset, result, tta=tta, progress=progress)
            screened = screened or [screens[i] for i in range(len(result.records))]
        m["not_assessable"] = count_not_assessable(result.ood_distance, predictor.ood_cutoff, screened)
        m["seen_in_training"] = _count_seen_in_training(run_folder, dataset, result)
        write_json(tmp / "metrics.json", m)
        shift, shift_skipped = _site_shift(predictor, result)
        if shift:
            write_json(tmp / "site_shift.json", shift)
        context = {
            **_report_context(predictor, dataset, result, run_folder, data=data, split=split, shown_split=shown_split),
            "summary": _report_summary(predictor, m, shift_skipped),
            "figures": figures,
            "gallery": gallery,
            "shortcut_audit": audit,
            "site_shift": shift,
        }
        write_bytes_atomic(tmp / "report.html", render_report(context).encode())
    # the CLI prints these metrics: at INFO they would be said twice
    logger.debug(
        "evaluated %d images: AUC %s, accuracy %.4f; written to %s",
        m["n"],
        "n/a" if m["roc_auc"] is None else f"{m['roc_auc']:.4f}",
        m["accuracy"],
        out,
    )
    _log_to_mlflow(
        predictor, run_folder, m, run=run, data=data, out=out, split=split, shown_split=shown_split, limit=limit, tta=tta, n_boot=n_boot
    )
    return Path(out), result


def _write_audit(
    tmp: Path, predictor: Predictor, dataset: Dataset, result: EvaluationResult, *, tta: bool, progress: bool
) -> tuple[dict, dict[int, str]]:
    """The shortcut audit, written to shortcut_audit.json: (the audit, {index: the image screen} of the images it decoded)."""
    from ..explain.checks import audit_dataset

    reader, size, screens = dataset.reader, predictor.preprocessing.input_size, {}

    def image_of(i: int) -> np.ndarray:  # the audit decodes every image: screen it on the way, as inference would
        image = reader.read_image(result.records[i].ref, draft_size=size)
        screens[i] = screen_image(image)
        return image

    audit = audit_dataset(predictor, image_of, len(result.records), probs=None if tta else result.y_prob, progress=progress)
    write_json(tmp / "shortcut_audit.json", audit)
    return audit, screens


def _count_seen_in_training(run_folder: RunFolder, dataset: Dataset, result: EvaluationResult) -> int:
    """How many evaluated images the run was trained or validated on (a warning when any)."""
    seen = seen_in_training(run_folder, result.records)
    if seen:
        logger.warning(
            "%d of the %d evaluated images are byte-identical to images this run was trained or validated on (e.g. %s): "
            "these figures are optimistic. Fix: evaluate on images the run never saw.",
            len(seen),
            len(result.records),
            dataset.display(seen[0]),
        )
    return len(seen)


def _report_summary(predictor: Predictor, m: dict, shift_skipped: str) -> dict:
    """The report's summary: these metrics beside the validation's, and the rule that flags a drop."""
    val = predictor.description.metrics.get("val")
    return {
        "rows": compare_with_validation(val or {}, m),
        "validation": val,
        "rule": DROP_RULE,
        "shift_skipped": shift_skipped,
    }


def _report_context(
    predictor: Predictor,
    dataset: Dataset,
    result: EvaluationResult,
    run_folder: RunFolder,
    *,
    data: str | os.PathLike,
    split: str,
    shown_split: str,
) -> dict:
    """The report's title, metrics, data, the run's training summary and history, model card and notes."""
    m = result.metrics
    return {
        "title": f"pneumoscope evaluation: {Path(str(data)).name} ({split})",
        "metrics": m,
        "description": predictor.description,
        "data": {
            "source": str(data),
            "split": shown_split,
            "skipped": len(result.problems),
            "excluded_calibration": result.excluded_calibration,
            "patients": len({r.patient_id for r in result.records}) if dataset.has_patient_ids else None,
        },
        "training_summary": json.loads(run_folder.data_summary.read_text()) if run_folder.data_summary.is_file() else None,
        "history": run_folder.history_png if run_folder.history_png.is_file() else None,
        "model_card": model_card(predictor.description, m, str(data)),
        "notes": _report_notes(m),
    }


def _report_notes(m: dict) -> list[str]:
    """The report's notes: the metrics' own, and what makes the figures optimistic or transductive."""
    notes = [m["note"]] if m.get("note") else []
    if m["seen_in_training"]:
        notes.append(
            f"{m['seen_in_training']} of these images are byte-identical to images the model was trained or validated on: "
            "the figures are optimistic."
        )
    if m.get("adapted_on_evaluated_images"):
        notes.append(
            f"{m['adapted_on_evaluated_images']} of these images were used, without their labels, to adapt the model to the site: "
            "the figures are transductive."
        )
    return notes


def _log_to_mlflow(
    predictor: Predictor,
    run_folder: RunFolder,
    m: dict,
    *,
    run: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    split: str,
    shown_split: str,
    limit: int | None,
    tta: bool,
    n_boot: int,
) -> None:
    """A run trained with ``--logger mlflow``: this evaluation joins it in its store. Others: nothing."""
    tracked = (predictor.description.training or {}).get("mlflow")
    if not tracked:
        return
    from ..training.tracking import log_evaluation

    log_evaluation(
        run_folder.path,
        tracked,
        out,
        m,
        split=shown_split,
        params={
            "run": Path(run).absolute(),
            "data": Path(data).absolute(),
            "split": split,
            "limit": limit,
            "tta": tta,
            "bootstraps": n_boot,
            "out": Path(out).absolute(),
        },
    )
