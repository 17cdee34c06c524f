"""Benchmark (issue 22): a three-class run (NORMAL / BACTERIA / VIRUS) meets the official test images as a new site.

    python benchmarks/bench_multiclass_site.py [--seeds 0 1 2] [--cache-dir DIR] [--out DIR]

Each seed: `pneumoscope train DATA --labels pneumonia-type --seed N`; then, on test/ as the site:
- `shift RUN test/ --json`: the site's class priors without labels (EM, BBSE, the argmax count) against the true
  shares of test/ (from its file names);
- `adapt --method center` and `adapt --method center+prior` on test/'s images (labels unused), and `evaluate` of
  the run and of each adapted run on test/: macro AUC, top-1 accuracy, mean per-class ECE, the mean negative log
  likelihood of the true class, and the screening decision's sensitivity and specificity.
Prints a JSON record and Markdown rows for BENCHMARKS.md.
"""

from __future__ import annotations

import csv
import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_multiclass import setup  # noqa: E402
from bench_pipeline import run  # noqa: E402

from pneumoscope.metrics.intervals import mean_sd  # noqa: E402

CLASSES = ("NORMAL", "BACTERIA", "VIRUS")  # the order pneumonia-type runs have


def true_priors(test: Path) -> list[float]:
    """The class shares of test/ by Kermany's file names (NORMAL folder; bacteria / virus in PNEUMONIA's names)."""
    names = [p.name.lower() for p in (test / "PNEUMONIA").iterdir()]
    counts = {"NORMAL": sum(1 for _ in (test / "NORMAL").iterdir()), "BACTERIA": sum("bacteria" in n for n in names)}
    counts["VIRUS"] = sum("virus" in n for n in names)
    total = sum(counts.values())
    return [counts[c] / total for c in CLASSES]


def judged(eval_dir: Path) -> dict:
    """The evaluation's figures, and the mean negative log likelihood of the true class from predictions.csv."""
    m = json.loads((eval_dir / "metrics.json").read_text())
    mc = m["multiclass"]
    rows = list(csv.DictReader(open(eval_dir / "predictions.csv")))
    nll = float(np.mean([-np.log(max(float(r[f"prob_{r['true_label']}"]), 1e-12)) for r in rows]))
    return {
        "macro_auc": mc["macro_auc"],
        "top1_accuracy": mc["accuracy"],
        "mean_class_ece": float(np.mean([v["ece"] for v in mc["per_class"].values()])),
        "nll": nll,
        "screening_sensitivity": m["sensitivity"],
        "screening_specificity": m["specificity"],
    }


def main() -> None:
    args, work, env, cli = setup("pneumoscope-multiclass-site-")
    test = Path(args.data) / "test"
    truth = true_priors(test)
    seeds = []
    for seed in args.seeds:
        out: dict = {"seed": seed}
        run_dir = work / f"seed{seed}"
        if not (run_dir / "checkpoint.json").is_file():
            run([*cli, "train", args.data, "--out", str(run_dir), "--seed", str(seed), "--labels", "pneumonia-type"], env)
        shift = json.loads(
            subprocess.run([*cli, "shift", str(run_dir), str(test), "--json"], env=env, capture_output=True, check=True).stdout
        )
        priors = shift["class_priors"]
        assert priors["classes"] == list(CLASSES), priors["classes"]
        for key in ("em", "bbse", "predicted_rate"):
            est = priors[key]
            out[f"priors_{key}"] = est
            out[f"priors_{key}_max_error"] = None if est is None else float(np.max(np.abs(np.array(est) - truth)))
        for method in ("none", "center", "center+prior"):
            target = run_dir if method == "none" else work / f"seed{seed}-{method}"
            if method != "none" and not (target / "checkpoint.json").is_file():
                run([*cli, "adapt", str(run_dir), str(test), "--out", str(target), "--method", method], env)
            eval_dir = work / f"seed{seed}-{method}.eval"
            if not (eval_dir / "metrics.json").is_file():
                run([*cli, "evaluate", str(target), args.data, "--out", str(eval_dir), "--no-audit", "--bootstraps", "200"], env)
            out[method] = judged(eval_dir)
        seeds.append(out)
        print(json.dumps(out), flush=True)
    summary = {f"priors_{k}_max_error": mean_sd([s[f"priors_{k}_max_error"] for s in seeds]) for k in ("em", "predicted_rate")}
    if all(s["priors_bbse_max_error"] is not None for s in seeds):
        summary["priors_bbse_max_error"] = mean_sd([s["priors_bbse_max_error"] for s in seeds])
    for method in ("none", "center", "center+prior"):
        for key in seeds[0][method]:
            summary[f"{method}/{key}"] = mean_sd([s[method][key] for s in seeds])
    record = {"cpu": platform.processor() or platform.machine(), "true_priors": dict(zip(CLASSES, truth, strict=True)), "seeds": seeds}
    record["summary"] = summary
    print(json.dumps(record, indent=2))
    for k, v in summary.items():
        print(f"| {k} | {v['mean']:.4f} ± {v['sd']:.4f} |")


if __name__ == "__main__":
    main()
