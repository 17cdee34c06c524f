"""The ``pneumoscope`` command line. Thin: each command calls into the modules.

Exit status, the same for every command: 0 done; 1 done, but some inputs were
unreadable and skipped (they are listed); 2 the command failed (one line on
stderr says why and how to fix it), including usage errors.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import logging
import os
import sys
import time
from pathlib import Path

logger = logging.getLogger("pneumoscope")

EXIT_OK, EXIT_SOME_INPUTS_SKIPPED, EXIT_FAILED = 0, 1, 2
EXIT_BROKEN_PIPE = 141  # as a shell reports a command ended by SIGPIPE: the reader of stdout stopped reading


def _exit_status(skipped: int) -> int:
    return EXIT_SOME_INPUTS_SKIPPED if skipped else EXIT_OK


def _add_train_args(p: argparse.ArgumentParser) -> None:
    """Training options. Defaults come from TrainConfig, then --config YAML, then these flags, then --set."""
    from ..data.augment import PRESETS
    from ..models.backbones import BACKBONES, PRETRAINED, UNFREEZE
    from ..training.tracking import LOGGERS

    S = argparse.SUPPRESS
    p.add_argument("--config", help="YAML file of training settings (TrainConfig field names)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set finetune.lr=3e-5 (or finetune_lr=3e-5)",
    )
    _add_task_args(p, default=S)
    p.add_argument(
        "--normal-class",
        default=S,
        help="N > 2 classes: the class the screening decision (normal vs not, with its threshold) is taken against (default NORMAL)",
    )
    p.add_argument("--backbone", choices=sorted(BACKBONES), default=S, help="default efficientnet_lite0")
    p.add_argument("--pretrained", choices=PRETRAINED, default=S, help="ImageNet weights or random initialisation")
    p.add_argument("--weights", default=S, help="local state dict (.pth/.safetensors, timm key names) for the backbone")
    p.add_argument("--epochs", type=int, default=S, help="head epochs (default 100)")
    p.add_argument("--patience", type=int, default=S, help="early stopping on val loss (default 10)")
    p.add_argument("--seed", type=int, default=S, help="seed of the patient split, the head's initialisation and its batches (default 0)")
    p.add_argument("--batch-size", type=int, default=S, help="head training batch size (default 64)")
    p.add_argument("--val-fraction", type=float, default=S, help="share of train patients held out for validation (default 0.1)")
    p.add_argument("--limit", type=int, default=S, help="at most N images per split (quick runs)")
    p.add_argument("--workers", dest="num_workers", type=int, default=S, help="image decoding worker processes (default 1)")
    p.add_argument("--cache-dir", default=S, help="feature and image cache (default: $PNEUMOSCOPE_CACHE or the user cache dir)")
    p.add_argument("--finetune-epochs", type=int, default=S, help="stage 2: fine-tune the backbone for up to N epochs (default 0: off)")
    p.add_argument("--unfreeze", choices=UNFREEZE, default=S, help="stage 2: the top layers (default) or the whole backbone")
    p.add_argument("--finetune-lr", type=float, default=S, help="stage 2 AdamW learning rate for the backbone (head 10x; default 1e-4)")
    a = p.add_mutually_exclusive_group()
    a.add_argument("--augment", metavar="PRESET", default=S, help=f"stage 2 augmentation: {', '.join(PRESETS)} (see BENCHMARKS.md)")
    a.add_argument("--no-augment", dest="augment", action="store_const", const="none", default=S, help="stage 2 without augmentation")
    p.add_argument("--devices", default=S, help="stage 2: devices per node (an integer, or auto)")
    p.add_argument("--num-nodes", type=int, default=S, help="stage 2: machines (default 1)")
    p.add_argument("--accelerator", default=S, help="stage 2: auto, cpu, gpu")
    p.add_argument(
        "--logger",
        choices=list(LOGGERS),
        default=S,
        help="training logs of both stages in RUN/logs: csv (default; always written), or tensorboard or mlflow beside it",
    )
    _add_policy_args(p, default=S)


def _add_task_args(p: argparse.ArgumentParser, default=None) -> None:
    """Which classes the data's folders (or file names) give."""
    from ..data.layouts import LABEL_SOURCES

    p.add_argument(
        "--classes",
        default=default,
        metavar="auto|A,B,...",
        help="the task's classes: auto (every class folder, sorted, as Keras' loader does) or names in order "
        "(default NORMAL,PNEUMONIA; other folders are ignored with a warning)",
    )
    p.add_argument(
        "--labels",
        choices=LABEL_SOURCES,
        default=default,
        help="folders (default), or pneumonia-type: NORMAL / BACTERIA / VIRUS from Kermany's file names (person12_bacteria_45.jpeg)",
    )


def _add_policy_args(p: argparse.ArgumentParser, default=None) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--target-sensitivity", type=float, default=default, help="threshold: the highest reaching this sensitivity (default: Youden's J)"
    )
    g.add_argument("--target-specificity", type=float, default=default, help="threshold: the lowest reaching this specificity")


def _policy(args) -> tuple[str, float | None]:
    if getattr(args, "target_sensitivity", None) is not None:
        return "sensitivity", args.target_sensitivity
    if getattr(args, "target_specificity", None) is not None:
        return "specificity", args.target_specificity
    return "youden", None


def _config(args):
    from ..training.config import load_train_config, setting_name

    flags = {k: v for k, v in vars(args).items() if setting_name(k) is not None}  # the flags given (the rest are suppressed)
    if "devices" in flags and str(flags["devices"]).isdigit():
        flags["devices"] = int(flags["devices"])
    policy, target = _policy(args)
    if policy != "youden":
        flags.update(threshold_policy=policy, threshold_target=target)
    return load_train_config(args.config, flags, args.set)


def cmd_inspect(args) -> int:
    """``pneumoscope data inspect``: print the dataset's summary (or its JSON); exit status 1 when files were unreadable."""
    from ..data.layouts import load_dataset
    from ..data.splits import scan, split_by_patient, summarize

    dataset = load_dataset(args.data, classes=args.classes, labels=args.labels or "folders")
    if dataset.layout != "npz":
        dataset = dataset.subset(split_by_patient(dataset.records, val_fraction=args.val_fraction, seed=args.seed))
    dataset = scan(dataset, progress=args.progress and not args.json)
    summary = summarize(dataset)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
    return _exit_status(len(summary["unreadable"]))


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


def cmd_train(args) -> int:
    """``pneumoscope train`` (one run, or one per ``--seeds``): print where the runs went."""
    from ..training.pipeline import train_run

    if args.seeds:
        from ..training.pipeline import train_seeds

        summary = train_seeds(
            args.data, args.out, _config(args), args.seeds, overwrite=args.overwrite, resume=args.resume, progress=args.progress
        )
        if summary is None:
            return EXIT_OK  # a launched distributed rank
        for key, stats in summary["val"].items():
            print(f"val {key}: {stats['mean']:.4f} ± {stats['sd']:.4f} over seeds {args.seeds}")
        print(f"runs written to {args.out}/seed-*")
        return _exit_status(sum(_skipped_in_run(Path(args.out) / f"seed-{seed}") for seed in args.seeds))
    out = train_run(args.data, args.out, _config(args), overwrite=args.overwrite, resume=args.resume, progress=args.progress)
    if out is None:
        return EXIT_OK
    print(f"run written to {out}")
    return _exit_status(_skipped_in_run(out))


def _skipped_in_run(run: Path) -> int:
    """Images a training run skipped as unreadable (its skipped.csv, header excluded)."""
    from ..models.checkpoint import RunFolder

    with open(RunFolder.of(run).skipped, newline="") as fh:
        return max(0, sum(1 for _ in csv.reader(fh)) - 1)


def cmd_evaluate(args) -> int:
    """``pneumoscope evaluate``: print the metrics and where the report is."""
    from ..evaluation.evaluate import evaluate_run

    out, result = evaluate_run(
        args.run,
        args.data,
        args.out,
        split=args.split,
        limit=args.limit,
        overwrite=args.overwrite,
        cache_dir=args.cache_dir,
        n_boot=args.bootstraps,
        audit_shortcuts=args.audit,
        tta=args.tta,
        progress=args.progress,
    )
    print(format_metrics(result.metrics) + f"\nwritten to {out} (report: {out / 'report.html'})")
    return _exit_status(len(result.problems))


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


def cmd_export(args) -> int:
    """``pneumoscope export``: print the ONNX file written and its parity with PyTorch."""
    from ..data.decode import read_image
    from ..errors import UsageError
    from ..inference.export import export_onnx
    from ..inference.inputs import expand_inputs

    images = None
    if args.check_images:  # the check runs on the images asked for, or not at all
        files, problems = expand_inputs(args.check_images)
        if problems:
            raise UsageError(f"--check-images: {problems[0][0]}: {problems[0][1]}")
        images = [read_image(p) for p in files]
    report = export_onnx(args.run, args.out, overwrite=args.overwrite, check_images=images)
    print(f"wrote {args.out}; parity with PyTorch on {report['n']} images: max |delta prob| {report['max_abs_prob_diff']:.2e}")
    return 0


def cmd_serve(args) -> int:
    """``pneumoscope serve``: serve the run until interrupted."""
    from ..serving.app import serve

    serve(args.run, host=args.host, port=args.port, allow_hosts=tuple(args.allow_host))
    return 0


def cmd_calibrate(args) -> int:
    """``pneumoscope calibrate``: print the new temperature and threshold and where the new run is."""
    from ..adaptation.calibrate import calibrate_run

    policy, target = _policy(args)
    out, desc = calibrate_run(
        args.run,
        args.data,
        args.out,
        split=args.split,
        policy=policy,
        target=target,
        refit=args.refit_head,
        overwrite=args.overwrite,
        cache_dir=args.cache_dir,
        progress=args.progress,
    )
    c = desc.calibration
    print(
        f"calibrated on {c['n']} images: temperature {desc.temperature:.3f}, threshold {desc.threshold:.4f} "
        f"(was {c['previous_threshold']:.4f}); new run in {out}"
    )
    return _exit_status(c["skipped"])


def cmd_shift(args) -> int:
    """``pneumoscope shift``: print how a site's images differ from the training split (or the report as JSON)."""
    from ..adaptation.adapt import shift_report
    from ..outputs import write_json

    report = shift_report(args.run, args.site, cache_dir=args.cache_dir, seed=args.seed, progress=args.progress)
    if args.out:
        write_json(args.out, report)
    if args.json:
        print(json.dumps(report, indent=2, allow_nan=False))
        return _exit_status(report["skipped"])
    prev = report["prevalence"]
    print(
        f"{report['n']} site images vs the training split of {args.run}\n"
        f"  two-sample test: MMD² {report['mmd']['mmd2']:.4f}, permutation p = {report['mmd']['p_value']:.3g}\n"
        f"  domain classifier AUC (0.5: indistinguishable): {report['domain_auc']:.3f}\n"
        f"  predicted positive rate {prev['predicted_positive_rate']:.3f}; estimated prevalence {prev['mixture']:.3f} (mixture of the "
        f"site's logits), {_fmt(prev['bbse'])} (BBSE), {prev['em']:.3f} (EM); validation prevalence {report['validation_prevalence']:.3f}\n"
        f"  out-of-distribution one by one: {_fmt(report['ood_fraction'])}\n"
        f"verdict: {report['verdict']}"
    )
    return _exit_status(report["skipped"])


def cmd_adapt(args) -> int:
    """``pneumoscope adapt``: print the shift before and after adaptation and where the new run is."""
    from ..adaptation.adapt import adapt_run

    out, desc = adapt_run(
        args.run,
        args.site,
        args.out,
        method=args.method,
        overwrite=args.overwrite,
        cache_dir=args.cache_dir,
        seed=args.seed,
        progress=args.progress,
    )
    a = desc.adaptation
    print(
        f"adapted to {a['n']} unlabelled images ({a['method']}): domain AUC {a['shift_before']['domain_auc']:.3f} -> "
        f"{a['shift_after']['domain_auc']:.3f}, estimated prevalence {_fmt(a['estimated_prevalence'])}, threshold {desc.threshold:.4f} "
        f"(was {a['previous_threshold']:.4f}); new run in {out}"
    )
    return _exit_status(a["skipped"])


def cmd_pack(args) -> int:
    """``pneumoscope pack``: print how many images went into the .zip and its size."""
    from ..data.pack import pack_dataset

    summary = pack_dataset(args.data, args.out, size=args.size, quality=args.quality, overwrite=args.overwrite)
    print(
        f"packed {summary['images']} images ({summary['resized']} resized to at most {args.size} px, {summary['stored_as_is']} stored as they "
        f"were) into {args.out}: {summary['bytes'] / 2**20:.1f} MiB; {len(summary['skipped'])} unreadable files left out"
    )
    return _exit_status(len(summary["skipped"]))


def cmd_compare(args) -> int:
    """``pneumoscope compare``: print the paired DeLong and McNemar comparison of two evaluations."""
    from ..evaluation.compare import compare_evaluations
    from ..outputs import write_json

    result = compare_evaluations(args.eval_a, args.eval_b)
    if args.out:
        write_json(args.out, result)
    d, mc = result["auc_delong"], result["mcnemar"]
    if "macro_auc" in result:  # N classes: the classes first, then the screening decision
        ma, top = result["macro_auc"], result["mcnemar_top1"]
        interval = f" [{ma['ci95'][0]:+.4f}, {ma['ci95'][1]:+.4f}]" if ma["ci95"] else ""
        print(
            f"{len(result['classes'])} classes, n={result['n']}: macro AUC A {_fmt(ma['macro_auc_a'])} vs B {_fmt(ma['macro_auc_b'])}, "
            f"difference {_fmt(ma['difference'])}{interval}, paired patient bootstrap p = {_fmt(ma['p_value'])}\n"
            f"most probable class: only A correct {top['only_a_correct']}, only B correct {top['only_b_correct']}, "
            f"McNemar p = {top['p_value']:.4g}\nscreening decision (normal vs not):"
        )
    print(
        f"n={result['n']}: AUC A {d['auc_a']:.4f} vs B {d['auc_b']:.4f}, difference {d['difference']:+.4f} "
        f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}], DeLong p = {d['p_value']:.4g}\n"
        f"decisions: only A correct {mc['only_a_correct']}, only B correct {mc['only_b_correct']}, McNemar p = {mc['p_value']:.4g}"
    )
    return 0


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _with_ci(value, interval) -> str:
    """A value and its 95% interval, as the evaluation tables print them."""
    return _fmt(value) + (f"  [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "")


def cmd_explain(args) -> int:
    """``pneumoscope explain``: write the overlays and print the checks' summary."""
    from ..explain.command import explain_images
    from ..inference.predictor import Predictor
    from ..outputs import check_output_dir

    check_output_dir(args.out, args.overwrite)  # before the model loads
    results = explain_images(
        Predictor.from_checkpoint(args.run),
        args.images,
        args.out,
        target=args.target,
        method=args.method,
        checks=args.checks,
        overwrite=args.overwrite,
        progress=args.progress,
    )
    print(f"{len(results)} explanations written to {args.out}")
    written = json.loads((Path(args.out) / "explanations.json").read_text())
    summary = written["checks"]
    if summary:
        print(
            f"faithfulness (ROAD, {summary['remove_percent']}% removed): change in confidence {summary['mean_road_most']:+.3f} for the most "
            f"relevant pixels, {summary['mean_road_least']:+.3f} for the least relevant, {summary['mean_road_random']:+.3f} for random maps "
            f"-> {summary['faithfulness_verdict']}\n"
            f"sanity (randomised top layers): mean Spearman {summary['mean_sanity_spearman']:.3f} (low is good)\n"
            f"shortcut audit: P(pneumonia) change with border masked {summary['mean_delta_border_masked']:+.3f}, "
            f"centre masked {summary['mean_delta_centre_masked']:+.3f}; CAM mass outside the centre {summary['mean_cam_outside_centre']:.3f}"
        )
    if written["skipped"]:
        print(f"{len(written['skipped'])} unreadable inputs skipped (listed in explanations.json)", file=sys.stderr)
    return _exit_status(len(written["skipped"]))


def cmd_predict(args) -> int:
    """``pneumoscope predict``: rows of predictions to stdout or ``--out``; exit status 1 when some inputs failed."""
    from ..errors import UsageError
    from ..inference.inputs import expand_items, read_list
    from ..inference.predictor import Predictor
    from ..inference.sinks import require_out_format
    from ..inference.stream import distributed_world, predict_distributed, predict_to

    inputs = [*args.inputs, *(read_list(args.from_list) if args.from_list else [])]
    if not inputs:
        raise UsageError("predict got no inputs. Fix: name image files, folders or .zip archives, or --from-list FILE with one path a line")
    if args.out:
        require_out_format(Path(args.out), resume=args.resume)
    predictor = Predictor.load(args.run)
    items = expand_items(inputs)
    kw = {"batch_size": args.batch_size, "workers": args.workers, "tta": args.tta, "resume": args.resume, "overwrite": args.overwrite}
    if distributed_world():
        summary = predict_distributed(predictor, items, args.out, progress=args.progress, **kw)
    else:
        summary = predict_to(predictor, items, args.out, stdout_format=args.format, progress=args.progress, **kw)
    if summary.failed == summary.rows:
        raise UsageError(f"none of the {summary.rows} inputs could be predicted; the error column says why for each")
    return _exit_status(summary.failed)


def cmd_demo(args) -> int:
    """train -> evaluate -> explain on the default (or given) dataset."""
    from ..data.download import fetch_pneumoniamnist
    from ..data.layouts import load_dataset
    from ..evaluation.evaluate import evaluate_run
    from ..evaluation.figures import pick_cases
    from ..explain.checks import MIN_FAITHFULNESS_IMAGES
    from ..explain.command import explain_images
    from ..inference.predictor import Predictor
    from ..training.pipeline import train_run

    data = args.data or os.environ.get("PNEUMOSCOPE_DATA") or fetch_pneumoniamnist()
    out = Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    config = _config(args)
    run = train_run(data, out / "run", config, overwrite=False, progress=args.progress)
    skipped = _skipped_in_run(run)
    _, result = evaluate_run(run, data, out / "eval", split="test", limit=config.limit, cache_dir=config.cache_dir, progress=args.progress)
    if load_dataset(data).layout != "npz":
        # the most confident of each outcome (true/false positive/negative), enough for the faithfulness check
        cases = pick_cases(result.y_true, result.y_prob, result.metrics["threshold"], per_kind=2, at_least=MIN_FAITHFULNESS_IMAGES)
        counts = collections.Counter(kind for kind, _ in cases)
        logger.info("explaining %d test images: %s", len(cases), ", ".join(f"{n} {kind}{'s' * (n > 1)}" for kind, n in counts.items()))
        explain_images(Predictor.from_checkpoint(run), [result.paths[i] for _, i in cases], out / "explain", progress=args.progress)
    m = result.metrics
    print(
        f"\ntest: n={m['n']} AUC={_fmt(m['roc_auc'])} accuracy={_fmt(m['accuracy'])} sensitivity={_fmt(m['sensitivity'])} "
        f"specificity={_fmt(m['specificity'])} (threshold {m['threshold']:.3f}, chosen on the training data, never on test)"
    )
    print(
        f"results in {out}/: run/ (checkpoint, history.png, samples.png), eval/ (report.html, metrics.json, confusion_matrix.png, roc_curve.png)"
        + (", explain/ (Grad-CAM overlays)" if (out / "explain").exists() else "")
    )
    return _exit_status(skipped + len(result.problems))


RUN = "run folder made by `pneumoscope train` (or its model.safetensors)"
RUN_OR_ONNX = RUN[:-1] + ", or an .onnx file made by `pneumoscope export`)"
DATA = "Kaggle chest_xray folder (train/ val/ test/), folder of NORMAL/ and PNEUMONIA/, a .zip of either, or a PneumoniaMNIST .npz"
OVERWRITE = "replace --out if it exists"
CACHE_DIR = "feature cache folder (default: $PNEUMOSCOPE_CACHE or the user cache folder)"


def _loudness(parser: argparse.ArgumentParser, default) -> None:
    """-q/-v on ``parser``. Each command takes them too (default SUPPRESS there, so one given before the command stays)."""
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("-q", "--quiet", action="store_true", default=default, help="warnings and errors only, no progress bars")
    loud.add_argument(
        "-v", "--verbose", action="store_true", default=default, help="debug messages, and other libraries' INFO messages too"
    )


def _command(sub, name: str, help: str, *examples: str) -> argparse.ArgumentParser:
    """A command's parser: its help, -q/-v, and its examples (real command lines) under its --help."""
    common = argparse.ArgumentParser(add_help=False)
    _loudness(common, argparse.SUPPRESS)
    epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples) if examples else None
    return sub.add_parser(
        name, help=help, description=help, epilog=epilog, parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter
    )


def _lists_commands(parser: argparse.ArgumentParser):
    """For a parser given no subcommand: its help (which lists them) on stderr, and exit status 2."""

    def run(args) -> int:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: a command is required; choose one of:\n{_subcommands(parser)}", file=sys.stderr)
        return EXIT_FAILED

    return run


def _subcommands(parser: argparse.ArgumentParser) -> str:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return "\n".join(f"  {c.dest:<10} {c.help}" for c in sub._choices_actions)


def build_parser() -> argparse.ArgumentParser:
    """The ``pneumoscope`` parser: global options, then one sub-parser per command (in the order ``--help`` lists them)."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="pneumoscope",
        description="Chest X-ray PNEUMONIA vs NORMAL: train, evaluate, explain, predict.",
        epilog="examples:\n  pneumoscope train ../shared/data/chest_xray --out runs/a\n  pneumoscope predict runs/a chest.jpeg\n"
        "run `pneumoscope COMMAND --help` for a command's options and examples",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pneumoscope {__version__}")
    _loudness(parser, False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.set_defaults(func=_lists_commands(parser))
    for add in (
        _add_data_parser,
        _add_train_parser,
        _add_evaluate_parser,
        _add_calibrate_parser,
        _add_shift_parser,
        _add_adapt_parser,
        _add_pack_parser,
        _add_export_parser,
        _add_serve_parser,
        _add_compare_parser,
        _add_explain_parser,
        _add_predict_parser,
        _add_demo_parser,
    ):
        add(sub)
    return parser


def _add_data_parser(sub) -> None:
    """``data`` and its sub-command ``data inspect``."""
    data_parser = _command(sub, "data", "dataset tools: data inspect", "pneumoscope data inspect ../shared/data/chest_xray")
    data = data_parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data_parser.set_defaults(func=_lists_commands(data_parser))
    p = _command(
        data,
        "inspect",
        "counts, patients, leakage check, unreadable files",
        "pneumoscope data inspect ../shared/data/chest_xray",
        "pneumoscope data inspect data.zip --json > summary.json",
    )
    p.add_argument("data", metavar="DATA", help=DATA)
    p.add_argument("--json", action="store_true", help="print the summary as JSON (every unreadable file listed)")
    p.add_argument(
        "--val-fraction", type=float, default=0.1, help="share of train patients held out for validation, as train cuts it (default 0.1)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of that cut, as train's --seed (default 0)")
    _add_task_args(p)
    p.set_defaults(func=cmd_inspect)


def _add_train_parser(sub) -> None:
    """``train``: the data, the run folder, and the training options."""
    p = _command(
        sub,
        "train",
        "train a model (frozen backbone, cached features, head with early stopping)",
        "pneumoscope train ../shared/data/chest_xray --out runs/a",
        "pneumoscope train data.zip --out runs/b --backbone resnet50 --target-sensitivity 0.95",
    )
    p.add_argument("data", metavar="DATA", help=DATA)
    p.add_argument("--out", required=True, help="run folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--resume", action="store_true", help="continue a fine-tuning run that was killed")
    p.add_argument("--seeds", type=int, nargs="+", help="train one run per seed into OUT/seed-N and report mean ± sd")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)


def _add_evaluate_parser(sub) -> None:
    """``evaluate``: a run on labelled data."""
    p = _command(
        sub,
        "evaluate",
        "metrics, predictions and figures on labelled data",
        "pneumoscope evaluate runs/a ../shared/data/chest_xray --out runs/a-eval",
    )
    p.add_argument("run", metavar="RUN", help=RUN)
    p.add_argument("data", metavar="DATA", help=DATA + " (labelled)")
    p.add_argument("--out", required=True, help="folder to write: report.html, metrics.json, predictions.csv, figures")
    p.add_argument("--split", default="test", help="split of a Kaggle root or npz (a folder of class folders is used whole)")
    p.add_argument("--limit", type=int, help="at most N images (quick runs)")
    p.add_argument("--bootstraps", type=int, default=2000, help="patient-level bootstrap resamples for AUC intervals")
    p.add_argument("--no-audit", dest="audit", action="store_false", help="skip the shortcut audit (border/centre masking, CAM mass)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation: average over shifted and zoomed copies")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE)
    p.add_argument("--cache-dir", help=CACHE_DIR)
    p.set_defaults(func=cmd_evaluate)


def _add_calibrate_parser(sub) -> None:
    """``calibrate``: temperature and threshold refitted on a labelled local sample."""
    p = _command(
        sub,
        "calibrate",
        "refit temperature and threshold on a labelled local sample; writes a new run",
        "pneumoscope calibrate runs/a site_labelled/ --out runs/a-site --target-sensitivity 0.95",
    )
    p.add_argument("run", metavar="RUN", help=RUN)
    p.add_argument("data", metavar="DATA", help="labelled local images (folder of class folders, Kaggle root, .zip or .npz)")
    p.add_argument("--out", required=True, help="new run folder")
    p.add_argument("--split", default="val", help="split of a Kaggle root or npz to calibrate on (a folder of class folders is used whole)")
    p.add_argument(
        "--refit-head",
        action="store_true",
        help="also refit the head on these images beside the run's training sample (temperature and threshold then cross-fitted)",
    )
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE)
    p.add_argument("--cache-dir", help=CACHE_DIR)
    _add_policy_args(p)
    p.set_defaults(func=cmd_calibrate)


def _site_command(sub, name: str, help: str, func, out_help: str, out_required: bool, example: str) -> argparse.ArgumentParser:
    """A command over a run and a site's unlabelled images (``shift``, ``adapt``): their shared arguments."""
    p = _command(sub, name, help, example)
    p.add_argument("run", metavar="RUN", help=RUN)
    p.add_argument(
        "site",
        metavar="SITE_IMAGES",
        help="folder or .zip of the site's images, searched recursively; folder names are not read as labels",
    )
    p.add_argument("--out", required=out_required, help=out_help)
    p.add_argument("--seed", type=int, default=0, help="for the permutation test and the domain classifier's folds")
    p.add_argument("--cache-dir", help=CACHE_DIR)
    p.set_defaults(func=func)
    return p


def _add_shift_parser(sub) -> None:
    """``shift``: how a site's images differ from the training split."""
    p = _site_command(
        sub,
        "shift",
        "does a site's set of images differ from the training split? two-sample test, prevalence, verdict",
        cmd_shift,
        "also write the report as JSON",
        False,
        "pneumoscope shift runs/a site_images/ --out shift.json",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _add_adapt_parser(sub) -> None:
    """``adapt``: a run adapted to a site's unlabelled images."""
    from ..choices import ADAPT_METHODS

    p = _site_command(
        sub,
        "adapt",
        "adapt a run to a site's unlabelled images; writes a new run",
        cmd_adapt,
        "new run folder",
        True,
        "pneumoscope adapt runs/a site_images/ --out runs/a-adapted",
    )
    p.add_argument(
        "--method",
        default=ADAPT_METHODS[0],
        choices=ADAPT_METHODS,
        help="center: feature means moved to the training split's; standardize: means and sds; +prior: probabilities moved "
        "to the site's estimated prevalence (default center+prior)",
    )
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE)


def _add_pack_parser(sub) -> None:
    """``pack``: a dataset written as one compact .zip."""
    p = _command(
        sub,
        "pack",
        "write a dataset as one compact .zip (images squashed to at most SIZE px) that train reads directly",
        "pneumoscope pack ../shared/data/chest_xray --out chest_xray.zip",
    )
    p.add_argument("data", metavar="DATA", help=DATA)
    p.add_argument("--out", required=True, help="the .zip to write")
    p.add_argument("--size", type=int, default=256, help="largest side kept (default 256); smaller images are stored byte for byte")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of resized images (default 90)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE)
    p.set_defaults(func=cmd_pack)


def _add_export_parser(sub) -> None:
    """``export``: a run as an ONNX file."""
    p = _command(
        sub,
        "export",
        "ONNX export (preprocessing, threshold, OOD guard in its metadata) with a parity check",
        "pneumoscope export runs/a --out model.onnx --check-images ../shared/data/chest_xray/val",
    )
    p.add_argument("run", metavar="RUN", help=RUN)
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--check-images", nargs="*", help="images or folders for the parity check (default: 4 generated images)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE)
    p.set_defaults(func=cmd_export)


def _add_serve_parser(sub) -> None:
    """``serve``: the web page and JSON API."""
    p = _command(
        sub,
        "serve",
        "web page and JSON API (POST /predict, POST /predict/batch, GET /health)",
        "pneumoscope serve runs/a",
        "pneumoscope serve model.onnx --port 8080",
    )
    p.add_argument("run", metavar="RUN_OR_ONNX", help=RUN_OR_ONNX[:-1] + "; no heatmaps with ONNX)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on, 1-65535 (default 8000)")
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a name clients may use in the Host header besides the bound address and localhost (repeatable)",
    )
    p.set_defaults(func=cmd_serve)


def _add_compare_parser(sub) -> None:
    """``compare``: two evaluations of the same images, paired."""
    p = _command(
        sub,
        "compare",
        "paired comparison of two evaluations of the same images (DeLong, McNemar)",
        "pneumoscope compare runs/a-eval runs/b-eval --out a-vs-b.json",
    )
    p.add_argument("eval_a", metavar="EVAL_A", help="evaluation folder made by `pneumoscope evaluate` (its predictions.csv is read)")
    p.add_argument("eval_b", metavar="EVAL_B", help="another, of the same images")
    p.add_argument("--out", help="write the result as JSON")
    p.set_defaults(func=cmd_compare)


def _add_explain_parser(sub) -> None:
    """``explain``: CAM overlays and their checks."""
    from ..choices import CAM_METHOD_CLASSES

    p = _command(sub, "explain", "Grad-CAM overlays", "pneumoscope explain runs/a chest.jpeg other_xrays/ --out cams")
    p.add_argument("run", metavar="RUN", help=RUN)
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders")
    p.add_argument("--out", required=True, help="folder to write: one overlay PNG per image and explanations.json")
    p.add_argument(
        "--target",
        default="predicted",
        metavar="predicted|CLASS",
        help="class to explain: predicted (default: the class decided at the model's threshold) or one of the run's classes "
        "(normal, pneumonia, or any class of an N-class run; any case)",
    )
    p.add_argument("--method", default="gradcam", choices=list(CAM_METHOD_CLASSES), help="CAM method (default gradcam)")
    p.add_argument("--no-checks", dest="checks", action="store_false", help="skip the faithfulness, sanity and shortcut checks")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE)
    p.set_defaults(func=cmd_explain)


def _add_predict_parser(sub) -> None:
    """``predict``: rows of decisions over images, folders and archives."""
    p = _command(
        sub,
        "predict",
        "probability, label, threshold and OOD flag per image",
        "pneumoscope predict runs/a chest.jpeg",
        "pneumoscope predict model.onnx xrays/ archive.zip --out rows.csv",
    )
    p.add_argument("run", metavar="RUN_OR_ONNX", help=RUN_OR_ONNX)
    p.add_argument("inputs", nargs="*", metavar="IMAGE_OR_DIR_OR_ZIP", help="image files, folders (searched recursively) or .zip archives")
    p.add_argument("--from-list", metavar="FILE", help="a text file of such paths, one a line (# comments and blank lines skipped)")
    p.add_argument("--out", help="write rows here as each batch finishes: .csv, .jsonl, or .parquet (needs pyarrow); default stdout")
    p.add_argument("--format", default="csv", choices=["csv", "json"], help="format on stdout (with --out, its suffix decides)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--workers", type=int, default=2, help="processes that decode images (default 2; 0: the main process)")
    p.add_argument("--resume", action="store_true", help="continue a killed run: rows already in --out are kept and not predicted again")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--tta", action="store_true", help="test-time augmentation: average over shifted and zoomed copies")
    p.set_defaults(func=cmd_predict)


def _add_demo_parser(sub) -> None:
    """``demo``: train, evaluate and explain in one go."""
    p = _command(
        sub,
        "demo",
        "train -> evaluate -> explain on DATA, $PNEUMOSCOPE_DATA, or downloaded PneumoniaMNIST",
        "pneumoscope demo --data ../shared/data/chest_xray",
        "pneumoscope demo --epochs 20",
    )
    p.add_argument("--data", help=DATA + " (default: $PNEUMOSCOPE_DATA, else PneumoniaMNIST, downloaded once)")
    p.add_argument("--out", help="results folder (default runs/demo-<time>)")
    _add_train_args(p)
    p.set_defaults(func=cmd_demo)


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    from ..runtime import configure_cpu_threads, configure_logging, die_with_parent, is_launched_rank, progress_wanted, tune_cpu_allocator

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quiet and args.verbose:  # one before the command and the other after it
        parser.error("-q/--quiet and -v/--verbose cannot be used together: choose one")
    args.progress = progress_wanted(quiet=args.quiet)
    if is_launched_rank():
        die_with_parent()  # a DDP rank started by this command (or by torchrun) ends with it, even after kill -9
    configure_cpu_threads()
    tune_cpu_allocator()
    configure_logging(quiet=args.quiet, verbose=args.verbose)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("pneumoscope: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `pneumoscope predict … | head`: the reader stopped reading; nothing to report
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python would otherwise fail flushing stdout at exit
        return EXIT_BROKEN_PIPE
    except Exception as err:
        print(f"pneumoscope: error: {error_line(err, getattr(args, 'run', None) or getattr(args, 'weights', None))}", file=sys.stderr)
        return EXIT_FAILED


def error_line(err: Exception, model_file: str | None = None) -> str:
    """One line for a failed command: where, what, and the fix. ``model_file``: the checkpoint or ONNX file the command loads.

    Expected failures (a :class:`~pneumoscope.errors.PneumoscopeError`: bad data, a bad path,
    flag or setting; a full or read-only disk; out of memory; a damaged model file) get one
    line. Anything else, a bare ValueError or RuntimeError included, is a bug, and its
    traceback is logged first.
    """
    from ..errors import PneumoscopeError
    from ..outputs import describe_os_error

    damaged = _damaged_model_file(err, model_file)
    if damaged:
        return damaged
    if isinstance(err, OSError):
        return describe_os_error(err)
    if isinstance(err, MemoryError) or _is_torch_out_of_memory(err):
        return (
            "out of memory. Fix: a smaller --batch-size or --limit; if a checkpoint was edited, check its "
            "preprocessing input_size (224 to 260 for the registered backbones)"
        )
    if isinstance(err, PneumoscopeError):
        return " ".join(str(err).split())
    logger.error("unexpected error (a bug: please report it with this traceback)", exc_info=err)
    return f"unexpected {type(err).__name__}: {' '.join(str(err).split())}"


def _is_torch_out_of_memory(err: Exception) -> bool:
    """PyTorch's out-of-memory error (a RuntimeError, not a MemoryError), without importing torch here."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(err, getattr(torch, "OutOfMemoryError", ()))


def _damaged_model_file(err: Exception, model_file: str | None) -> str | None:
    """Truncated or edited checkpoints and ONNX files, named, with the fix; None for other errors.

    The loaders raise whatever their libraries raise (safetensors' SafetensorError,
    PyTorch's RuntimeError from load_state_dict, ONNX Runtime's own classes); they are
    recognised here, at the command line's edge, so the library keeps its exceptions.
    """
    from safetensors import SafetensorError

    name = model_file or "the model file"
    if model_file and Path(model_file).is_dir():
        name = str(Path(model_file) / "model.safetensors")
    detail = " ".join(str(err).split())[:300]
    if isinstance(err, SafetensorError):
        return f"{name}: the checkpoint is damaged or truncated ({detail}). Fix: copy it again from where it was made, or train it again."
    if isinstance(err, RuntimeError) and "Error(s) in loading state_dict" in str(err):
        return f"{name}: the checkpoint's tensors do not match its description ({detail}). Fix: use the file as `pneumoscope train` wrote it, or train again."
    if type(err).__module__.startswith("onnxruntime"):
        name = model_file if str(model_file).endswith(".onnx") else "the exported model"
        return f"{name}: ONNX Runtime cannot load it ({detail}). Fix: export it again with `pneumoscope export`."
    return None


if __name__ == "__main__":
    sys.exit(main())
