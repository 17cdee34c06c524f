"""Render an evaluation into one self-contained HTML file. Computes nothing.

The page is a Jinja2 template, ``templates/report.html.j2``, rendered with autoescaping
on: file names, paths and data sources from the data are escaped, never markup. Images
are embedded as data URIs so the file opens anywhere, offline, on its own.
"""

from __future__ import annotations

import base64
import functools
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2

from ..data.records import CLASS_NAMES
from ..metrics.names import metric_name

if TYPE_CHECKING:
    from ..models.description import RunDescription


@functools.cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("pneumoscope.evaluation", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,  # a misspelt name fails instead of rendering as nothing
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(fmt=_fmt, ci=_ci, data_uri=_data_uri, metric_name=metric_name)
    return env


def _data_uri(path: str | Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _ci(ci) -> str:
    return "n/a" if not ci else f"{ci[0]:.3f} – {ci[1]:.3f}"


def render_report(ctx: dict) -> str:
    """``ctx`` holds: title, metrics, description (the checkpoint's ``RunDescription``), data (summary of the
    evaluated data), training_summary (or None), figures {name: path}, history (path
    or None), gallery [(path, caption)], model_card {section: text}, notes [str],
    and optionally shortcut_audit and site_shift (dicts, or None) and summary: {"rows":
    :func:`~pneumoscope.metrics.compare_with_validation`, "validation": the run's validation metrics or None,
    "rule": :data:`~pneumoscope.metrics.DROP_RULE`, "shift_skipped": why there is no site_shift}; the summary block
    heads the page."""
    context = {"notes": [], "training_summary": None, "history": None, "shortcut_audit": None, "site_shift": None, "summary": None, **ctx}
    return _environment().get_template("report.html.j2").render(context)


KERMANY = "Kermany et al. 2018 chest X-rays (Guangzhou Women and Children's Medical Center), CC BY 4.0."  # chest_xray and PneumoniaMNIST


def _task(description: RunDescription) -> tuple[str, str, str]:
    """(the head in words, the task in words, what ``n_positive`` counts) of the run's classes."""
    names = list(description.class_names)
    if len(names) > 2:
        normal = description.normal_class
        return (
            f"{len(names)} logits, a softmax over {', '.join(names)}",
            f"{' / '.join(names)} classification, with the screening decision not {normal} vs {normal}",
            f"not {normal}",
        )
    if tuple(names) == CLASS_NAMES:
        return "one logit for PNEUMONIA", "pneumonia vs normal classification", "pneumonia"
    return f"one logit for {names[1]}", f"{names[1]} vs {names[0]} classification", names[1]


def model_card(description: RunDescription, metrics: dict, data_source: str) -> dict[str, str]:
    """Mitchell et al. (2019) sections, filled from the checkpoint and the evaluation."""
    training = description.training or {}
    versions = ", ".join(f"{k} {v}" for k, v in description.versions.items())
    calibration = description.calibration
    head, task, positive = _task(description)
    data = str(training.get("data", ""))
    source = (
        KERMANY
        if ("chest_xray" in data or "pneumoniamnist" in data.lower())
        else "Source and licence not recorded: state them when you share this card."
    )
    per_class = (metrics.get("multiclass") or {}).get("per_class") or {}
    counts = " (" + ", ".join(f"{c} {row['n']}" for c, row in per_class.items()) + ")" if per_class else ""
    return {
        "Model details": f"pneumoscope classifier: {description.backbone} backbone (ImageNet-pretrained), head of global average pooling, "
        f"dropout, dense ReLU layer and {head}; input {description.preprocessing.input_size} px grayscale repeated to 3 channels. "
        f"Training stage: {training.get('stage', 'unknown')}. Software: {versions}.",
        "Intended use": f"Research on pediatric (ages 1-5) frontal (AP) chest radiographs: studying and benchmarking {task}. "
        "Not for diagnosis, triage or any clinical decision.",
        "Out-of-scope uses": "Adults; lateral views; CT or other modalities; other diseases (COVID-19, tuberculosis, effusion); images from "
        "other hospitals or scanners without local validation; any clinical use.",
        "Training data": f"{training.get('data', 'unknown')} ({training.get('layout', '?')} layout): {training.get('n_train', '?')} training and "
        f"{training.get('n_val', '?')} validation images, split by patient. {source}",
        "Evaluation data": f"{data_source}: {metrics['n']} images, {metrics['n_positive']} {positive}{counts}.",
        "Metrics": f"Threshold {description.threshold:.4f} chosen by {description.threshold_policy or '?'}"
        + (f"; recalibrated on a local sample ({calibration.get('n')} images from {calibration.get('data')})" if calibration else "")
        + f". Sensitivity {_fmt(metrics.get('sensitivity'))}, specificity {_fmt(metrics.get('specificity'))}, ROC-AUC {_fmt(metrics.get('roc_auc'))}, "
        "with 95% intervals above.",
        "Limitations": ("Single hospital, pediatric only; " if source == KERMANY else "")
        + "validation split of train is far more optimistic than the official test images "
        "(different grading and prevalence); known shortcut risks (burned-in markers, borders); Grad-CAM heatmaps are not proof of "
        "clinically relevant reasoning.",
        "License and citation": (
            "Data: Kermany D, Zhang K, Goldbaum M (2018), Mendeley Data v2, doi:10.17632/rscbjbr9sj.2, CC BY 4.0; "
            "Kermany DS et al., Cell 172(5):1122-1131 (2018). "
            if source == KERMANY
            else "Data: as its provider states. "
        )
        + "Code: pneumoscope, Apache-2.0. EfficientNet-Lite weights: Apache-2.0.",
        "Not a medical device": "This model is research software and has not been cleared or approved by any regulator.",
    }
