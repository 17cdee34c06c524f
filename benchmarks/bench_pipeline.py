"""Benchmark: `pneumoscope train` and `evaluate` on a real dataset, from a cold feature cache.

    python benchmarks/bench_pipeline.py [--data ../shared/data/chest_xray] [--backbone efficientnet_lite0]

Prints a JSON record (wall times, peak RSS of each command, feature images/s,
test metrics) and a Markdown row for BENCHMARKS.md. Also measures the frozen
forward rate of the notebook's ResNet50 for the speed comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], env: dict) -> tuple[float, int]:
    """Wall seconds and peak RSS (MiB) of one command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-3000:]}")
    return wall, usage.ru_maxrss // 1024


def forward_rate(backbone: str, batch: int = 32, reps: int = 3) -> float:
    import torch

    from pneumoscope.models.classifier import create_model
    from pneumoscope.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    model = create_model(backbone, pretrained="none").eval()
    s = model.preprocessing.input_size
    x = torch.randn(batch, 3, s, s)
    with torch.inference_mode():
        model.pooled_features(x)
        t0 = time.perf_counter()
        for _ in range(reps):
            model.pooled_features(x)
    return batch * reps / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "chest_xray"))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pneumoscope-bench-"))
    env = {**os.environ, "PNEUMOSCOPE_CACHE": str(work / "cache")}
    cli = [sys.executable, "-m", "pneumoscope", "-q"]
    run_dir, eval_dir = work / "run", work / "eval"
    t_train, rss_train = run([*cli, "train", args.data, "--out", str(run_dir), "--backbone", args.backbone], env)
    t_eval, rss_eval = run([*cli, "evaluate", str(run_dir), args.data, "--out", str(eval_dir)], env)
    t_train_warm, _ = run([*cli, "train", args.data, "--out", str(work / "run-warm"), "--backbone", args.backbone], env)

    desc = json.loads((run_dir / "checkpoint.json").read_text())
    n_fit = desc["training"]["n_train"] + desc["training"]["n_val"]
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "data": args.data,
        "backbone": args.backbone,
        "train_wall_s": round(t_train, 1),
        "train_warm_cache_wall_s": round(t_train_warm, 1),
        "train_peak_rss_mib": rss_train,
        "evaluate_wall_s": round(t_eval, 1),
        "evaluate_peak_rss_mib": rss_eval,
        "train_images": n_fit,
        "epochs_run": desc["training"]["epochs_run"],
        "best_epoch": desc["training"]["best_epoch"],
        "train_images_per_s_end_to_end": round(n_fit / t_train, 1),
        "backbone_forward_images_per_s": round(forward_rate(args.backbone), 1),
        "resnet50_forward_images_per_s": round(forward_rate("resnet50"), 1),
        "val_roc_auc": desc["metrics"]["val"]["roc_auc"],
        "threshold": desc["threshold"],
        "test": {k: metrics[k] for k in ("n", "roc_auc", "accuracy", "sensitivity", "specificity")},
    }
    print(json.dumps(record, indent=2))
    t = record["test"]
    print(
        f"| {record['date']} | {args.backbone} | {t_train:.0f} s | {t_train_warm:.0f} s | {t_eval:.0f} s | "
        f"{record['train_images_per_s_end_to_end']} | {rss_train} MiB | {t['n']} | {t['roc_auc']:.3f} | {t['accuracy']:.3f} | "
        f"{t['sensitivity']:.3f} | {t['specificity']:.3f} |"
    )


if __name__ == "__main__":
    main()
