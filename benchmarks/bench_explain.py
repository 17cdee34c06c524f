"""Benchmark: CAM latency per method, and the faithfulness / sanity / shortcut checks on real images.

    python benchmarks/bench_explain.py RUN [--data ../shared/data/chest_xray/test] [--limit 80]

RUN is a folder written by `pneumoscope train`. Grad-CAM's checks run on every image
under DATA; the other methods on the first --limit images per class (the checks cost
about a second an image on 2 cores: five ROAD imputations, a CAM of the randomised
model, two masked forwards).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def cam_latency_ms(predictor, image: np.ndarray, method: str, reps: int = 10) -> float:
    from pneumoscope.explain.cams import compute_cam

    x = predictor.preprocess(image)
    compute_cam(predictor.model, x, [1], method)  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        compute_cam(predictor.model, x, [1], method)
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def main() -> None:
    from pneumoscope.data.decode import is_image_path
    from pneumoscope.explain.cams import CAM_METHODS
    from pneumoscope.explain.command import explain_images
    from pneumoscope.inference.predictor import Predictor
    from pneumoscope.runtime import tune_cpu_allocator

    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "chest_xray" / "test"))
    parser.add_argument("--limit", type=int, default=40, help="images per class for methods other than Grad-CAM")
    args = parser.parse_args()
    tune_cpu_allocator()
    torch.manual_seed(0)
    predictor = Predictor.from_checkpoint(args.run)
    classes = sorted(p for p in Path(args.data).iterdir() if p.is_dir())
    files = {c.name: sorted(f for f in c.iterdir() if is_image_path(f)) for c in classes}
    everything = [f for fs in files.values() for f in fs]
    subset = [f for fs in files.values() for f in fs[: args.limit]]
    record = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores", "run": args.run, "methods": {}}
    image = predictor.read(everything[0])
    for method in CAM_METHODS:
        out = Path(tempfile.mkdtemp()) / method
        paths = everything if method == "gradcam" else subset
        t0 = time.perf_counter()
        explain_images(predictor, paths, out, method=method, progress=False)
        checks = json.loads((out / "explanations.json").read_text())["checks"]
        record["methods"][method] = {
            "latency_ms_one_image": round(cam_latency_ms(predictor, image, method), 1),
            "checks_wall_s": round(time.perf_counter() - t0, 1),
            **checks,
        }
        print(json.dumps({method: record["methods"][method]}), flush=True)
    print(json.dumps(record, indent=2))
    print(
        "| method | n | ms / CAM | ROAD top-20% | random maps | least-20% | p (vs random) | verdict | sanity ρ | Δ border | Δ centre | CAM outside centre |"
    )
    for method, m in record["methods"].items():
        print(
            f"| {method} | {m['n']} | {m['latency_ms_one_image']} | {m['mean_road_most']:+.3f} | {m['mean_road_random']:+.3f} | {m['mean_road_least']:+.3f} | "
            f"{m['road_vs_random_p']:.2g} | {m['faithfulness_verdict'].split(' (')[0]} | {m['mean_sanity_spearman']:.3f} | "
            f"{m['mean_delta_border_masked']:+.3f} | {m['mean_delta_centre_masked']:+.3f} | {m['mean_cam_outside_centre']:.3f} |"
        )


if __name__ == "__main__":
    main()
