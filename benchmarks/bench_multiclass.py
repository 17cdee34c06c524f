"""Benchmark (issue 22): Kermany's second task, NORMAL / BACTERIA / VIRUS from the file names, over several seeds,
judged on the official test images in the data's test/ folder; beside it the two-class model of the same seeds.

    python benchmarks/bench_multiclass.py [--seeds 0 1 2] [--cache-dir DIR] [--out DIR]

Each seed: `pneumoscope train DATA --labels pneumonia-type --seed N` and `pneumoscope train DATA --seed N` (the
default two-class task), then `evaluate` of each on test/. Reports, mean +- sd over the seeds:
- the three-class model's macro and micro AUC, top-1 accuracy, per-class AUC;
- its screening AUC (normal vs not, from P(not normal)) beside the two-class model's AUC;
- bacterial vs viral on the pneumonia images only: AUC of P(virus) / (P(bacteria) + P(virus)), and accuracy of the
  more probable of the two (no threshold chosen on test).
Prints a JSON record and Markdown rows for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import REPO, run  # noqa: E402

from pneumoscope.metrics.intervals import mean_sd  # noqa: E402

PAPER = {"bacteria_vs_virus_auc": 0.940, "bacteria_vs_virus_accuracy": 0.907}


def bacteria_vs_virus(eval_dir: Path) -> dict:
    """AUC and accuracy of bacterial vs viral on the pneumonia images, from the three-class probabilities."""
    rows = [r for r in csv.DictReader(open(eval_dir / "predictions.csv")) if r["true_label"] in ("BACTERIA", "VIRUS")]
    y = np.array([r["true_label"] == "VIRUS" for r in rows], dtype=int)
    pb = np.array([float(r["prob_BACTERIA"]) for r in rows])
    pv = np.array([float(r["prob_VIRUS"]) for r in rows])
    score = pv / (pb + pv)
    return {"n": len(rows), "auc": float(roc_auc_score(y, score)), "accuracy": float(((score >= 0.5) == y).mean())}


def setup(prefix: str) -> tuple[argparse.Namespace, Path, dict, list[str]]:
    """The seeds benchmarks' options (--data, --seeds, --cache-dir, --out): (args, work folder, environment, CLI prefix)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "chest_xray"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cache-dir", help="feature cache (default: a new, cold one)")
    parser.add_argument("--out", help="keep the runs and evaluations here (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PNEUMOSCOPE_CACHE": str(args.cache_dir or work / "cache")}
    return args, work, env, [sys.executable, "-m", "pneumoscope", "-q"]


def main() -> None:
    args, work, env, cli = setup("pneumoscope-multiclass-")
    seeds = []
    for seed in args.seeds:
        out = {"seed": seed}
        for name, flags in (("three", ["--labels", "pneumonia-type"]), ("two", [])):
            run_dir, eval_dir = work / f"{name}-seed{seed}", work / f"{name}-seed{seed}.eval"
            out[f"{name}_train_s"], _ = run([*cli, "train", args.data, "--out", str(run_dir), "--seed", str(seed), *flags], env)
            run([*cli, "evaluate", str(run_dir), args.data, "--out", str(eval_dir), "--no-audit", "--bootstraps", "200"], env)
            m = json.loads((eval_dir / "metrics.json").read_text())
            out[f"{name}_screening_auc"] = m["roc_auc"]
            if name == "three":
                mc = m["multiclass"]
                out |= {
                    "macro_auc": mc["macro_auc"],
                    "micro_auc": mc["micro_auc"],
                    "top1_accuracy": mc["accuracy"],
                    "per_class_auc": {c: v["roc_auc"] for c, v in mc["per_class"].items()},
                    "n_test": mc["n"],
                }
                out["bacteria_vs_virus"] = bacteria_vs_virus(eval_dir)
        out["screening_gap"] = out["three_screening_auc"] - out["two_screening_auc"]
        seeds.append(out)
        print(json.dumps(out), flush=True)
    summary = {
        k: mean_sd([s[k] for s in seeds])
        for k in ("macro_auc", "micro_auc", "top1_accuracy", "three_screening_auc", "two_screening_auc", "screening_gap")
    }
    summary["bacteria_vs_virus_auc"] = mean_sd([s["bacteria_vs_virus"]["auc"] for s in seeds])
    summary["bacteria_vs_virus_accuracy"] = mean_sd([s["bacteria_vs_virus"]["accuracy"] for s in seeds])
    record = {"cpu": platform.processor() or platform.machine(), "seeds": seeds, "summary": summary, "paper": PAPER}
    print(json.dumps(record, indent=2))
    for k, v in summary.items():
        print(f"| {k} | {v['mean']:.4f} ± {v['sd']:.4f} |")


if __name__ == "__main__":
    main()
