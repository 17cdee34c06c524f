"""Render an evaluation into one self-contained HTML file. Computes nothing.

Images are embedded as data URIs so the file opens anywhere, offline, on its own.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:0}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.figs{display:flex;flex-wrap:wrap;gap:1em}.figs figure{margin:0}figcaption{font-size:.85em;color:#555}
.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:.6em 1em}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(480px,1fr));gap:1.2em}
img{max-width:100%}
.toc{background:#f7f7f7;border:1px solid #e2e2e2;padding:.4em 1em;margin:1em 0;display:inline-block}.toc ol{margin:.3em 0;padding-left:1.4em}
.zoom{display:block;position:relative}.zoom input{position:absolute;opacity:0;width:1px;height:1px}.zoom img{cursor:zoom-in}
.zoom input:checked+img{position:fixed;inset:0;margin:auto;max-width:none;width:96vw;height:94vh;object-fit:contain;z-index:10;
background:#fff;cursor:zoom-out;box-shadow:0 0 0 100vmax rgba(0,0,0,.75)}
.zoom input:focus-visible+img{outline:2px solid #3080e0}
"""


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _zoomable(path: Path, alt: str) -> str:
    """An image that opens full-window on click (and on space when focused); pure CSS, so the file stays script-free."""
    return f"<label class='zoom' title='click to enlarge'><input type='checkbox' aria-label='enlarge {html.escape(alt)}'>{_img(path, alt)}</label>"


def _with_contents(parts: list[str]) -> list[str]:
    """Give every <h2> an id and put a linked table of contents after the title (parts[1])."""
    titles = []

    def anchor(match: re.Match) -> str:
        titles.append(match.group(1))
        return f"<h2 id='section-{len(titles)}'>{match.group(1)}</h2>"

    body = [re.sub(r"<h2>(.*?)</h2>", anchor, part) for part in parts]
    items = "".join(f"<li><a href='#section-{i}'>{t}</a></li>" for i, t in enumerate(titles, 1))
    return body[:2] + [f"<nav class='toc' aria-label='contents'><b>Contents</b><ol>{items}</ol></nav>"] + body[2:]


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def _ci(ci) -> str:
    return "n/a" if not ci else f"{ci[0]:.3f} – {ci[1]:.3f}"


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_report(ctx: dict) -> str:
    """``ctx`` holds: title, metrics, description (checkpoint), data (summary of the
    evaluated data), training_summary (or None), figures {name: path}, history (path
    or None), gallery [(path, caption)], model_card {section: text}, notes [str]."""
    m, desc = ctx["metrics"], ctx["description"]
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(ctx['title'])}</title><style>{_CSS}</style></head><body>"]
    parts.append(f"<h1>{html.escape(ctx['title'])}</h1>")
    parts.append("<p class='warn'><b>Research software, not a medical device.</b> These results describe one model on one data set; "
                 "they are not a clinical validation.</p>")  # fmt: skip
    for note in ctx.get("notes", []):
        parts.append(f"<p class='warn'>{html.escape(note)}</p>")

    parts.append("<h2>Data</h2>")
    d = ctx["data"]
    parts.append(f"<p>Evaluated: <code>{html.escape(d['source'])}</code>, split <code>{html.escape(d['split'])}</code>: "
                 f"{m['n']} images, {m['n_positive']} pneumonia; prevalence {_fmt(m.get('prevalence'))} "
                 "(PPV and NPV depend on it). Images skipped as unreadable: "
                 f"{d['skipped']}. Images excluded because they were used for calibration: {d.get('excluded_calibration', 0)}.</p>")  # fmt: skip
    if d.get("patients") is not None:
        parts.append(f"<p>Patients in the evaluated images: {d['patients']}.</p>")
    ts = ctx.get("training_summary")
    if ts:
        rows = [[name, sp["images"], sp["classes"]["NORMAL"], sp["classes"]["PNEUMONIA"], _fmt(sp["patients"]), _fmt(sp["max_images_per_patient"])]
                for name, sp in ts["splits"].items()]  # fmt: skip
        parts.append("<p>Training data (the run's splits):</p>" + _table(["split", "images", "NORMAL", "PNEUMONIA", "patients", "max images / patient"], rows))
        lk = ts["leakage"]
        crossing = lk.get("patients_in_several_splits")
        parts.append(f"<p>Leakage check: {'passed' if lk.get('ok') else 'FAILED'}; patients in several splits: "
                     f"{'not checkable' if crossing is None else len(crossing)}; identical images across splits: "
                     f"{len(lk.get('duplicates_across_splits', []))}.</p>")  # fmt: skip
    if ctx.get("history"):
        parts.append("<h2>Training history</h2><div class='figs'><figure>" + _zoomable(ctx["history"], "training history") + "</figure></div>")

    parts.append("<h2>Operating point</h2>")
    parts.append(f"<p>Threshold <b>{m['threshold']:.4f}</b> on calibrated P(pneumonia); policy: {html.escape(desc.get('threshold_policy', 'unknown'))}. "
                 f"Temperature {desc.get('temperature', 1.0):.3f}. The threshold was never chosen on the evaluated images.</p>")  # fmt: skip

    parts.append("<h2>Metrics (95% intervals)</h2>")
    ci = m.get("ci95", {})
    keys = ["sensitivity", "specificity", "ppv", "npv", "accuracy", "balanced_accuracy", "f1", "roc_auc", "pr_auc"]
    parts.append(_table(["metric", "value", "95% interval"], [[k, _fmt(m.get(k)), _ci(ci.get(k))] for k in keys]
                        + [["brier", _fmt(m.get("brier")), ""], ["ece", _fmt(m.get("ece")), ""]]))  # fmt: skip
    parts.append(f"<p><small>{html.escape(m.get('ci95_method', ''))}</small></p>")
    if m.get("note"):
        parts.append(f"<p class='warn'>{html.escape(m['note'])}</p>")
    figs = ctx["figures"]
    captions = {"confusion_matrix": "Confusion matrix: counts and % of each true class", "roc_curve": "ROC curve with a 95% patient-bootstrap band, operating point marked",
                "pr_curve": "Precision-recall curve, operating point marked", "reliability": "Reliability diagram: equal-count bins with 95% Wilson intervals"}  # fmt: skip
    parts.append("<div class='figs'>" + "".join(f"<figure>{_zoomable(figs[k], captions[k])}<figcaption>{captions[k]}</figcaption></figure>"
                                                 for k in captions if k in figs) + "</div>")  # fmt: skip

    if m.get("subgroups"):
        parts.append("<h2>Subgroups</h2>")
        rows = [[t, g["n"], _fmt(g["sensitivity"]), _ci(g["ci95"])] for t, g in m["subgroups"].items()]
        parts.append(_table(["pneumonia type", "images", "sensitivity", "95% interval"], rows))

    shift = ctx.get("site_shift")
    if shift:
        prev = shift["prevalence"]
        parts.append("<h2>Site shift</h2>")
        parts.append(f"<p class='{'warn' if shift['shift_detected'] else ''}'>{html.escape(shift['verdict'])}</p>")
        parts.append(_table(["measure", "value"], [
            ["MMD² (training split vs these images), permutation p-value", f"{shift['mmd']['mmd2']:.4f}, p = {shift['mmd']['p_value']:.3g}"],
            ["domain classifier AUC (0.5: indistinguishable)", _fmt(shift["domain_auc"])],
            ["predicted positive rate", _fmt(prev["predicted_positive_rate"])],
            ["estimated prevalence without labels: mixture / BBSE / EM", f"{_fmt(prev['mixture'])} / {_fmt(prev['bbse'])} / {_fmt(prev['em'])}"],
            ["validation prevalence", _fmt(shift["validation_prevalence"])],
            ["flagged out of distribution one by one", _fmt(shift["ood_fraction"])],
        ]))  # fmt: skip

    audit = ctx.get("shortcut_audit")
    if audit:
        parts.append("<h2>Shortcut audit</h2>")
        parts.append(
            f"<p>Over {audit['n']} images: masking a border band ({audit['border_fraction']:.0%} of each side) changes P(pneumonia) by "
            f"{audit['mean_delta_border_masked']:+.3f} on average (mean absolute change {audit['mean_abs_delta_border_masked']:.3f}); masking the "
            f"central chest region (rows {audit['central_box'][0]:.0%}-{audit['central_box'][1]:.0%}, columns {audit['central_box'][2]:.0%}-"
            f"{audit['central_box'][3]:.0%}) changes it by {audit['mean_delta_centre_masked']:+.3f} (mean absolute {audit['mean_abs_delta_centre_masked']:.3f}). "
            f"Share of {html.escape(audit['method'])} mass outside the central region: {audit['mean_cam_outside_centre']:.3f} "
            f"(the region outside covers {1 - audit['central_area_fraction']:.2f} of the image). A model that leans on borders, markers or "
            "labels changes more when the border is masked than when the chest is.</p>"
        )

    parts.append("<h2>Gallery: most confident errors and successes, with Grad-CAM</h2>")
    if ctx["gallery"]:
        parts.append("<p>Click an image to enlarge it; click again to close.</p>")
        parts.append("<div class='gallery'>" + "".join(f"<figure>{_zoomable(p, c)}<figcaption>{html.escape(c)}</figcaption></figure>" for p, c in ctx["gallery"]) + "</div>")
    else:
        parts.append("<p>No errors to show.</p>")

    parts.append("<h2>Model card</h2>")
    for section, text in ctx["model_card"].items():
        parts.append(f"<h3>{html.escape(section)}</h3><p>{html.escape(text)}</p>")
    parts.append("</body></html>")
    return "\n".join(_with_contents(parts))


def model_card(description: dict, metrics: dict, data_source: str) -> dict[str, str]:
    """Mitchell et al. (2019) sections, filled from the checkpoint and the evaluation."""
    training = description.get("training", {})
    versions = ", ".join(f"{k} {v}" for k, v in description.get("versions", {}).items())
    calibration = description.get("calibration")
    return {
        "Model details": f"pneumoscope classifier: {description['backbone']} backbone (ImageNet-pretrained), head of global average pooling, "
        f"dropout, dense ReLU layer and one logit for PNEUMONIA; input {description['preprocessing']['input_size']} px grayscale repeated to 3 channels. "
        f"Training stage: {training.get('stage', 'unknown')}. Software: {versions}.",
        "Intended use": "Research on pediatric (ages 1-5) frontal (AP) chest radiographs: studying and benchmarking pneumonia vs normal "
        "classification. Not for diagnosis, triage or any clinical decision.",
        "Out-of-scope uses": "Adults; lateral views; CT or other modalities; other diseases (COVID-19, tuberculosis, effusion); images from "
        "other hospitals or scanners without local validation; any clinical use.",
        "Training data": f"{training.get('data', 'unknown')} ({training.get('layout', '?')} layout): {training.get('n_train', '?')} training and "
        f"{training.get('n_val', '?')} validation images, split by patient. Kermany et al. 2018 chest X-rays (Guangzhou Women and Children's "
        "Medical Center), CC BY 4.0.",
        "Evaluation data": f"{data_source}: {metrics['n']} images, {metrics['n_positive']} pneumonia.",
        "Metrics": f"Threshold {description['threshold']:.4f} chosen by {description.get('threshold_policy', '?')}"
        + (f"; recalibrated on a local sample ({calibration.get('n')} images from {calibration.get('data')})" if calibration else "")
        + f". Sensitivity {_fmt(metrics.get('sensitivity'))}, specificity {_fmt(metrics.get('specificity'))}, ROC-AUC {_fmt(metrics.get('roc_auc'))}, "
        "with 95% intervals above.",
        "Limitations": "Single hospital, pediatric only; validation split of train is far more optimistic than the official test images "
        "(different grading and prevalence); known shortcut risks (burned-in markers, borders); Grad-CAM heatmaps are not proof of "
        "clinically relevant reasoning.",
        "License and citation": "Data: Kermany D, Zhang K, Goldbaum M (2018), Mendeley Data v2, doi:10.17632/rscbjbr9sj.2, CC BY 4.0; "
        "Kermany DS et al., Cell 172(5):1122-1131 (2018). Code: pneumoscope, Apache-2.0. EfficientNet-Lite weights: Apache-2.0.",
        "Not a medical device": "This model is research software and has not been cleared or approved by any regulator.",
    }
