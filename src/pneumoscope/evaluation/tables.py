"""evaluate's tables: predictions.csv (one row an image) and classification_report.txt, for two classes or N."""

from __future__ import annotations

from pathlib import Path

from sklearn.metrics import classification_report

from ..inference.predictor import Predictor
from ..outputs import write_bytes_atomic, write_csv
from .scoring import EvaluationResult


def write_tables(tmp: Path, predictor: Predictor, result: EvaluationResult) -> None:
    """predictions.csv (one row an image) and classification_report.txt (scikit-learn's, at the run's threshold)."""
    names = list(predictor.class_names)
    header = f"threshold {predictor.threshold:.4f} ({predictor.description.threshold_policy})\n\n"
    if predictor.multiclass:
        _write_multiclass_tables(tmp, predictor, result, header)
        return
    write_csv(
        tmp / "predictions.csv",
        ["path", "patient_id", "true_label", "prob", "pred_label"],
        [
            [path, r.patient_id, names[r.label], f"{p:.6f}", predictor.label_of(p)]
            for r, path, p in zip(result.records, result.paths, result.y_prob, strict=True)
        ],
    )
    y_pred = predictor.decide(result.y_prob)
    report = classification_report(result.y_true, y_pred, labels=[0, 1], target_names=names, digits=4, zero_division=0)
    write_bytes_atomic(tmp / "classification_report.txt", (header + report).encode())


def _write_multiclass_tables(tmp: Path, predictor: Predictor, result: EvaluationResult, header: str) -> None:
    """N classes: predictions.csv with the true class, the screening probability and decision, the class decided and
    each class's probability; the classification report of the most probable class, and of the screening decision."""
    names = list(predictor.class_names)
    normal = predictor.description.normal_class
    rows = []
    for r, path, p, probs in zip(result.records, result.paths, result.y_prob, result.class_probs, strict=True):
        screen = "NOT " + normal if predictor.decide(p) else normal
        rows.append([path, r.patient_id, names[r.label], f"{p:.6f}", screen, predictor.class_label(p, probs), *(f"{q:.6f}" for q in probs)])
    columns = ["path", "patient_id", "true_label", "prob", "screen", "pred_label", *(f"prob_{c}" for c in names)]
    write_csv(tmp / "predictions.csv", columns, rows)
    top1 = classification_report(
        result.y_class, result.class_probs.argmax(1), labels=list(range(len(names))), target_names=names, digits=4, zero_division=0
    )
    screening = classification_report(
        result.y_true, predictor.decide(result.y_prob), labels=[0, 1], target_names=[normal, "NOT " + normal], digits=4, zero_division=0
    )
    text = f"most probable class (top-1)\n\n{top1}\nscreening decision, {header}{screening}"
    write_bytes_atomic(tmp / "classification_report.txt", text.encode())
