"""Benchmark: ONNX Runtime vs PyTorch eager, the OOD guard on real radiographs, and a web app load test.

    python benchmarks/bench_deploy.py RUN [--data ../shared/data/chest_xray/test] [--requests 200] [--concurrency 8]
                                          [--rates-only] [--load-test-only]

RUN is a folder written by `pneumoscope train`. The load test starts `pneumoscope
serve` on a free loopback port, sends a bounded number of uploads and stops it.
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

REPO = Path(__file__).resolve().parents[1]


def rate(backend, batch: int, size: int, seconds: float = 6.0) -> float:
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    backend.run(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        backend.run(x)
        n += batch
    return n / (time.perf_counter() - t0)


def load_test(run: str, files: list[Path], n: int, concurrency: int) -> dict:
    from bench_serve import hammer, rss_mib, served

    payloads = [(f.name, f.read_bytes()) for f in files]
    with served(run) as (base, pid):
        url = f"{base}/predict?heatmap=true"  # each answer includes Grad-CAM and three PNGs, as when this was first measured
        hammer(url, payloads[:1], 1, 1)  # warm-up, then memory before
        before = rss_mib(pid)
        results, wall = hammer(url, payloads, n, concurrency)
        after = rss_mib(pid)
        second, _ = hammer(url, payloads, n, concurrency)  # a second round: does memory keep growing?
        after_second = rss_mib(pid)
    lat = np.array([r[0] for r in results]) * 1000
    return {
        "requests": n,
        "concurrency": concurrency,
        "errors": int(sum(r[1] != 200 for r in results)),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p95_ms": round(float(np.percentile(lat, 95)), 1),
        "throughput_rps": round(n / wall, 2),
        "rss_before_mib": round(before),
        "rss_after_mib": round(after),
        "rss_after_second_round_mib": round(after_second),
        "errors_second_round": int(sum(r[1] != 200 for r in second)),
    }


def main() -> None:
    from pneumoscope.data.decode import is_image_path
    from pneumoscope.inference.export import export_onnx
    from pneumoscope.inference.predictor import Predictor
    from pneumoscope.runtime import tune_cpu_allocator

    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "chest_xray" / "test"))
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--load-test-only", action="store_true")
    parser.add_argument(
        "--rates-only", action="store_true", help="the network's images/s on both backends only (no OOD count, no load test)"
    )
    args = parser.parse_args()
    tune_cpu_allocator()
    if args.load_test_only:
        files = sorted(f for f in Path(args.data).rglob("*") if f.is_file() and is_image_path(f))
        print(json.dumps(load_test(args.run, files, args.requests, args.concurrency), indent=2))
        return
    files = sorted(f for f in Path(args.data).rglob("*") if f.is_file() and is_image_path(f))
    record = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores", "run": args.run}

    onnx_path = Path(tempfile.mkdtemp()) / "model.onnx"
    torch_pred = Predictor.from_checkpoint(args.run)
    images = [torch_pred.read(f) for f in files]
    record["parity"] = export_onnx(args.run, onnx_path, check_images=images[:64])
    onnx_pred = Predictor.from_onnx(onnx_path, threads=os.cpu_count())
    size = torch_pred.preprocessing.input_size
    for name, pred in (("pytorch_eager", torch_pred), ("onnxruntime", onnx_pred)):
        record[name] = {f"batch{b}_images_per_s": round(rate(pred.backend, b, size), 1) for b in (1, 32)}
        print(json.dumps({name: record[name]}), flush=True)
    if args.rates_only:
        print(json.dumps(record, indent=2))
        return

    dists = onnx_pred.run(images)[1]
    flagged = int((dists > onnx_pred.ood_cutoff).sum())
    record["ood_on_real"] = {
        "n": len(images),
        "flagged": flagged,
        "fraction": round(flagged / len(images), 4),
        "cutoff": onnx_pred.ood_cutoff,
    }
    record["load_test"] = load_test(args.run, files, args.requests, args.concurrency)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
