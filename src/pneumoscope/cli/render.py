"""What the commands print: the tables of ``data inspect`` and ``evaluate``, and how a number (and its interval) reads."""

from __future__ import annotations


def format_summary(s: dict) -> str:
    """The summary of ``data inspect`` as lines of text: splits, patients, leakage, duplicates, unreadable files."""
    lines = [f"{s['source']} ({s['layout']} layout), {s['images']} readable images"]
    if "classes" in s:  # a task of other classes: images and patients per class
        lines += _class_lines(s)
        return "\n".join(lines + _leakage_lines(s))
    lines.append(f"{'split':<6} {'images':>7} {'NORMAL':>7} {'PNEUM.':>7} {'%pneu':>6} {'patients':>9} {'max/pt':>7}  types")
    for name, sp in s["splits"].items():
        c = sp["classes"]
        pts = "-" if sp["patients"] is None else sp["patients"]
        mx = "-" if sp["max_images_per_patient"] is None else sp["max_images_per_patient"]
        types = ", ".join(f"{k} {v}" for k, v in sp["pneumonia_types"].items())
        lines.append(
            f"{name:<6} {sp['images']:>7} {c['NORMAL']:>7} {c['PNEUMONIA']:>7} {100 * sp['positive_fraction']:>5.1f}% {pts:>9} {mx:>7}  {types}"
        )
    return "\n".join(lines + _leakage_lines(s))


def _class_lines(s: dict) -> list[str]:
    """Per split: images, then images (patients) of each class."""
    names = s["classes"]
    lines = [f"{'split':<6} {'images':>7}  " + "  ".join(f"{c[:12]:>18}" for c in names) + "  (images (patients) a class)"]
    for name, sp in s["splits"].items():
        per = sp.get("patients_per_class") or {}
        cells = "  ".join(f"{sp['classes'][c]:>9} ({per.get(c, '-')!s:>5})" if per else f"{sp['classes'][c]:>18}" for c in names)
        lines.append(f"{name:<6} {sp['images']:>7}  {cells}")
    return lines


def _leakage_lines(s: dict) -> list[str]:
    """The leakage check, duplicates and unreadable files of a ``data inspect`` summary."""
    lines = []
    lk = s["leakage"]
    if lk["patients_in_several_splits"] is None:
        lines.append(f"leakage check: {lk['note']}")
    else:
        lines.append(
            f"leakage check: {'OK' if lk['ok'] else 'FAILED'}: {len(lk['patients_in_several_splits'])} patients in several splits, "
            f"{len(lk['duplicates_across_splits'])} identical images across splits"
        )
    lines.append(f"duplicate images (same bytes): {lk['duplicate_images']} images in {lk['duplicate_groups']} groups")
    if lk.get("label_conflicts"):
        lines.append(
            f"images under two labels (same bytes): {len(lk['label_conflicts'])}, e.g. {' and '.join(_two_labels(lk['label_conflicts'][0]))}; "
            "train, evaluate and calibrate refuse them. Fix: keep each under its one true label"
        )
    if s["patient_id_from_file_stem"]:
        lines.append(f"patient id not in file name (file stem used): {s['patient_id_from_file_stem']} images")
    lines.append(f"unreadable files: {len(s['unreadable'])}")
    for u in s["unreadable"][:20]:
        lines.append(f"  {u['path']}: {u['reason']}")
    if len(s["unreadable"]) > 20:
        lines.append(f"  ... and {len(s['unreadable']) - 20} more not listed here (--json lists them all)")
    if s["ignored_files"]:
        lines.append(f"ignored files (not images in class folders): {s['ignored_files']}")
    return lines


def format_metrics(m: dict) -> str:
    """The metrics an evaluation prints: the table at the threshold with intervals (N classes: the classes' table
    first, then the screening decision's)."""
    ci = m.get("ci95", {})
    lines = []
    if "multiclass" in m:
        lines += format_multiclass(m["multiclass"])
        positive = "not normal"
    else:
        positive = "pneumonia"
    lines += [f"n={m['n']} ({m['n_positive']} {positive}, prevalence {_fmt(m.get('prevalence'))}), threshold {m['threshold']:.4f}"]
    for key in ("sensitivity", "specificity", "ppv", "npv", "accuracy", "balanced_accuracy", "f1", "roc_auc", "pr_auc"):
        if key in m:
            interval = ci.get(key)
            lines.append(f"  {key:<18} {_with_ci(m[key], interval)}")
    if m.get("note"):
        lines.append(f"  note: {m['note']}")
    return "\n".join(lines)


def format_multiclass(mc: dict) -> list[str]:
    """N classes: top-1 accuracy, macro and micro AUC with intervals, and one line a class (one-vs-rest)."""
    ci = mc["ci95"]
    lines = [
        f"{len(mc['classes'])} classes, n={mc['n']}: top-1 accuracy {_with_ci(mc['accuracy'], ci['accuracy'])}",
        f"  macro AUC {_with_ci(mc['macro_auc'], ci['macro_auc'])}; micro AUC {_with_ci(mc['micro_auc'], ci['micro_auc'])}",
        f"  {'class':<14} {'n':>5} {'sens':>7} {'spec':>7} {'ppv':>7} {'npv':>7} {'auc':>7}",
    ]
    for name, row in mc["per_class"].items():
        cells = " ".join(f"{_fmt(row[k]):>7}" for k in ("sensitivity", "specificity", "ppv", "npv", "roc_auc"))
        lines.append(f"  {name[:14]:<14} {row['n']:>5} {cells}")
    lines.append("screening decision (normal vs not):")
    return lines


def _two_labels(group: list[str]) -> list[str]:
    """Of a group of one image's copies ("LABEL:path"), the first under each of two labels."""
    first: dict[str, str] = {}
    for entry in group:
        first.setdefault(entry.split(":", 1)[0], entry)
    return list(first.values())[:2]


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _with_ci(value, interval) -> str:
    """A value and its 95% interval, as the evaluation tables print them."""
    return _fmt(value) + (f"  [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "")
