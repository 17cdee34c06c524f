"""Benchmark: a trained run meets the official test images as a new site (issue 10).

    python benchmarks/bench_site.py --runs RUN [RUN ...] [--data DATA] [--draws 3] [--out FILE.json]

For each run (one per training seed, e.g. from `bench_recipe.py --out`):

* **no site data**: `test/` with the threshold chosen on validation;
* **shift**: `pneumoscope shift RUN test/` (MMD p-value, domain AUC, estimated
  prevalence against the true 0.625);
* **unlabelled adaptation**, judged as the held-back half will judge it: `test/` is cut
  by patient into two class-stratified halves A and B; the run is adapted on A's images
  without labels and evaluated on B, then the other way round (mean of the two);
* **a few labels**: k labelled images drawn from A (patient-disjoint from B, both
  classes), `pneumoscope calibrate` with and without `--refit-head`, evaluated on B;
  `--draws` draws for each k, both directions.

Prints a JSON record and Markdown rows for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
from pneumoscope.choices import ADAPT_METHODS  # noqa: E402

KEYS = ("roc_auc", "accuracy", "sensitivity", "specificity", "ece")


def _link_tree(root: Path, files: list[tuple[Path, str]], labelled: bool) -> Path:
    """A folder of symlinks: class folders when labelled, one flat folder when not."""
    for path, cls in files:
        folder = root / cls if labelled else root
        folder.mkdir(parents=True, exist_ok=True)
        (folder / path.name).symlink_to(path)
    return root


def _halves(test: Path, seed: int) -> tuple[list, list]:
    """Two class-stratified halves of test/, cut by patient."""
    from pneumoscope.data.records import parse_patient_id

    rng = np.random.default_rng(seed)
    a, b = [], []
    for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
        files = sorted((test / cls).iterdir())
        patients = sorted({parse_patient_id(f.name, label).patient_id for f in files})
        chosen = set(rng.permutation(patients)[: len(patients) // 2])
        for f in files:
            (a if parse_patient_id(f.name, label).patient_id in chosen else b).append((f, cls))
    return a, b


def _draw(files: list, k: int, rng: np.random.Generator) -> list:
    """k labelled images, half of each class (at least 10 each), whole patients not required."""
    per = max(10, k // 2)
    out = []
    for cls in ("NORMAL", "PNEUMONIA"):
        pool = [f for f in files if f[1] == cls]
        out += [pool[i] for i in rng.permutation(len(pool))[:per]]
    return out


def _metrics(run: Path, folder: Path, cache: str) -> dict:
    from pneumoscope.data.layouts import load_dataset
    from pneumoscope.evaluation.scoring import evaluate_dataset
    from pneumoscope.inference.predictor import Predictor

    result = evaluate_dataset(
        Predictor.from_checkpoint(run), load_dataset(folder), split="all", cache_dir=cache, n_boot=200, progress=False
    )
    return {k: result.metrics[k] for k in KEYS} | {"threshold": result.metrics["threshold"]}


def _mean(rows: list[dict]) -> dict:
    from pneumoscope.metrics.intervals import mean_sd

    return {k: mean_sd([r[k] for r in rows]) for k in rows[0] if isinstance(rows[0][k], (int, float))}


def bench_run(run: Path, data: Path, work: Path, cache: str, draws: int, ks: list[int]) -> dict:
    from pneumoscope.adaptation.adapt import adapt_run, shift_report
    from pneumoscope.adaptation.calibrate import calibrate_run

    test = data / "test"
    out = {"run": str(run), "no_site_data": _metrics(run, test, cache)}
    t0 = time.perf_counter()
    shift = shift_report(run, test, cache_dir=cache, progress=False)
    out["shift"] = {
        "seconds": round(time.perf_counter() - t0, 1),
        "mmd_p": shift["mmd"]["p_value"],
        "domain_auc": shift["domain_auc"],
        "prevalence": shift["prevalence"],
        "true_prevalence": 0.625,
        "verdict": shift["verdict"],
    }
    a, b = _halves(test, seed=0)
    adapted, base_halves, kcurve = [], [], {}
    for i, (src, dst) in enumerate(((a, b), (b, a))):
        site = _link_tree(work / f"{run.name}-site{i}", src, labelled=False)
        judge = _link_tree(work / f"{run.name}-judge{i}", dst, labelled=True)
        base_halves.append(_metrics(run, judge, cache))
        for method in ADAPT_METHODS:
            new, desc = adapt_run(run, site, work / f"{run.name}-adapted{i}-{method}", method=method, cache_dir=cache, progress=False)
            adapted.append(
                {"method": method, **_metrics(new, judge, cache), "estimated_prevalence": desc.adaptation["estimated_prevalence"]}
            )
        rng = np.random.default_rng(i)
        for k in ks:
            for d in range(draws):
                sample = _link_tree(work / f"{run.name}-k{k}-{i}-{d}", _draw(src, k, rng), labelled=True)
                for refit in (False, True):
                    new, _ = calibrate_run(
                        run, sample, work / f"{run.name}-cal{k}-{i}-{d}-{refit}", refit=refit, cache_dir=cache, progress=False
                    )
                    kcurve.setdefault(f"k={k} {'refit head' if refit else 'temperature+threshold'}", []).append(_metrics(new, judge, cache))
    out["halves_no_adaptation"] = _mean(base_halves)
    out["unlabelled"] = {m: _mean([r for r in adapted if r["method"] == m]) for m in ADAPT_METHODS}
    out["few_labels"] = {name: _mean(rows) for name, rows in kcurve.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", nargs="+", required=True, type=Path)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "chest_xray"), type=Path)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--k", type=int, nargs="+", default=[20, 40, 80])
    parser.add_argument("--cache-dir", default=os.environ.get("PNEUMOSCOPE_CACHE"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pneumoscope-site-"))
    t0 = time.perf_counter()
    runs = []
    for run in args.runs:
        runs.append(bench_run(run, args.data, work, args.cache_dir, args.draws, args.k))
        print(json.dumps(runs[-1]), flush=True)
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "command": " ".join(sys.argv),
        "wall_s": round(time.perf_counter() - t0, 1),
        "runs": runs,
    }
    if args.out:
        args.out.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))

    def row(name, cells):
        print(
            f"| {name} | "
            + " | ".join(f"{np.mean([c[k]['mean'] if isinstance(c[k], dict) else c[k] for c in cells]):.3f}" for k in KEYS)
            + " |"
        )

    print("| setting | " + " | ".join(KEYS) + " |")
    row("test/, validation threshold", [r["no_site_data"] for r in runs])
    row("half B, validation threshold", [r["halves_no_adaptation"] for r in runs])
    for m in ADAPT_METHODS:
        row(f"half B, adapted on half A ({m})", [r["unlabelled"][m] for r in runs])
    for name in runs[0]["few_labels"]:
        row(f"half B, {name} from half A", [r["few_labels"][name] for r in runs])


if __name__ == "__main__":
    main()
