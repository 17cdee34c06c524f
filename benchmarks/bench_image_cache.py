"""Benchmark: the uint8 image cache keeps memory flat on a large generated dataset.

    python benchmarks/bench_image_cache.py [--n 100000] [--size 224] [--work DIR]

Generates N small grayscale PNGs (64 x 64) in class folders, scans them, builds the
memory-mapped (N, S, S) uint8 cache, then reads every row once through the
fine-tuning Dataset and DataLoader, sampling this process's anonymous (heap) and
file-backed resident memory. Anonymous memory is what a 100,000-image dataset
held in RAM would fill; file-backed pages are the page cache, which the kernel
reclaims under pressure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def rss() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("RssAnon", "RssFile", "VmRSS"):
            out[key] = int(line.split()[1]) / 1024
    return out


def main() -> None:
    from torch.utils.data import DataLoader

    from pneumoscope.data.imagecache import build_image_array
    from pneumoscope.data.layouts import load_dataset
    from pneumoscope.data.splits import scan
    from pneumoscope.models.backbones import BACKBONES
    from pneumoscope.training.finetune import ArrayDataset

    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="pneumoscope-cache-bench-"))
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    base = (rng.uniform(size=(64, 64)) * 200).astype(np.uint8)
    for i in range(args.n):
        cls = "PNEUMONIA" if i % 2 else "NORMAL"
        folder = work / "data" / cls
        if i < 2:
            folder.mkdir(parents=True, exist_ok=True)
        img = np.roll(base, i % 64, axis=i % 2) + (i % 50)
        Image.fromarray(img).save(folder / f"img{i:06d}.png", compress_level=1)
    t_gen = time.perf_counter() - t0
    record = {"n": args.n, "size": args.size, "generate_s": round(t_gen, 1), "rss_start_mib": rss()}

    t0 = time.perf_counter()
    ds = scan(load_dataset(work / "data"), check_decode=False)
    record["scan_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    arr = build_image_array(ds, ds.records, args.size, work / "cache", num_workers=2, progress=False)
    record["build_s"] = round(time.perf_counter() - t0, 1)
    record["cache_gib_on_disk"] = round(arr.images.size / 2**30, 2)
    record["rss_after_build_mib"] = rss()

    labels = np.array([r.label for r in arr.records])
    loader = DataLoader(ArrayDataset(arr.images, labels, BACKBONES["efficientnet_lite0"].preprocessing, None), batch_size=64, num_workers=0)
    peak_anon, samples, t0 = 0.0, [], time.perf_counter()
    for i, (_x, _) in enumerate(loader):
        if i % 200 == 0:
            m = rss()
            samples.append(m)
            peak_anon = max(peak_anon, m["RssAnon"])
    record["epoch_s"] = round(time.perf_counter() - t0, 1)
    record["peak_rss_anon_during_epoch_mib"] = round(peak_anon)
    record["rss_samples_mib"] = [{k: round(v) for k, v in s.items()} for s in samples[:: max(1, len(samples) // 8)]]
    record["rss_end_mib"] = rss()
    print(json.dumps(record, indent=2))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
