"""One function per command: each calls into the package that does the work, prints what it did, returns the exit status."""

from __future__ import annotations

import collections
import csv
import json
import logging
import os
import sys
import time
from pathlib import Path

from .options import _config, _policy
from .render import _fmt, format_metrics, format_summary

logger = logging.getLogger("pneumoscope")

EXIT_OK, EXIT_SOME_INPUTS_SKIPPED, EXIT_FAILED = 0, 1, 2


def _exit_status(skipped: int) -> int:
    return EXIT_SOME_INPUTS_SKIPPED if skipped else EXIT_OK


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


def _checks_lines(summary: dict, prob_of: str) -> str:
    """explain's checks in three lines; a figure the checks could not compute (every map empty or constant) is n/a."""

    def f(key: str, sign: str = "") -> str:
        value = summary.get(key)
        return "n/a" if value is None else f"{value:{sign}.3f}"

    return (
        f"faithfulness (ROAD, {summary['remove_percent']}% removed): change in confidence {f('mean_road_most', '+')} for the most "
        f"relevant pixels, {f('mean_road_least', '+')} for the least relevant, {f('mean_road_random', '+')} for random maps "
        f"-> {summary['faithfulness_verdict']}\n"
        f"sanity (randomised top layers): mean Spearman {f('mean_sanity_spearman')} (low is good)\n"
        f"shortcut audit: P({prob_of}) change with border masked {f('mean_delta_border_masked', '+')}, "
        f"centre masked {f('mean_delta_centre_masked', '+')}; CAM mass outside the centre {f('mean_cam_outside_centre')}"
    )


def cmd_explain(args) -> int:
    """``pneumoscope explain``: write the overlays and print the checks' summary."""
    from ..explain.command import explain_images
    from ..inference.predictor import Predictor
    from ..outputs import check_output_dir

    check_output_dir(args.out, args.overwrite)  # before the model loads
    predictor = Predictor.from_checkpoint(args.run)
    results = explain_images(
        predictor,
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
        print(_checks_lines(summary, predictor.prob_of))
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
    from ..evaluation.figures import pick_diagnosed_cases
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
    dataset = load_dataset(data)
    if dataset.layout != "npz":
        # the most confident of each outcome (true/false positive/negative), enough for the faithfulness check
        predictor = Predictor.from_checkpoint(run)  # explain maps only what has a diagnosis: the cases are picked among those
        cases, _ = pick_diagnosed_cases(
            predictor, result, lambda i: dataset.reader.read_image(result.records[i].ref), per_kind=2, at_least=MIN_FAITHFULNESS_IMAGES
        )
        counts = collections.Counter(kind for kind, _ in cases)
        logger.info("explaining %d test images: %s", len(cases), ", ".join(f"{n} {kind}{'s' * (n > 1)}" for kind, n in counts.items()))
        explain_images(predictor, [result.paths[i] for _, i in cases], out / "explain", progress=args.progress)
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
