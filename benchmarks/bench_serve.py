"""Benchmark: the web app under load, and under concurrent uploads of the largest accepted DICOM.

    python benchmarks/bench_serve.py RUN --mode load  [--requests 400] [--concurrency 16] [--heatmap] [--src SRC]
    python benchmarks/bench_serve.py RUN --mode dicom [--concurrency 16] [--src SRC]

Starts `python -m pneumoscope serve RUN` on a free loopback port (with ``--src`` first
on PYTHONPATH, to measure another version of the code on the same machine), sends
the uploads from threads in this process, samples the server's RSS every 20 ms,
and prints one JSON record. ``load``: real `test/` JPEGs; ``dicom``: one
7,936 x 8,000 (63.5-megapixel) RLE Lossless DICOM of about 2 MB, sent
``--concurrency`` times at once.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextmanager
def served(run: str, src: str | None = None):
    """(base URL, pid) of `pneumoscope serve RUN` on a free loopback port, stopped on exit."""

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "pneumoscope", "-q", "serve", run, "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        if not wait_healthy(base):
            raise RuntimeError("server did not start: " + proc.stderr.read().decode()[-2000:])
        yield base, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def wait_healthy(base: str, tries: int = 600) -> bool:
    """Whether ``base``/health answered 200 within ``tries`` attempts (a server starting up)."""
    import httpx

    for _ in range(tries):
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            time.sleep(0.2)
    return False


class RssSampler(threading.Thread):
    """The peak RSS of a process, sampled every ``every`` seconds until stopped."""

    def __init__(self, pid: int, every: float = 0.02):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak, self._done = pid, every, 0.0, threading.Event()

    def run(self):
        while not self._done.wait(self.every):
            self.peak = max(self.peak, rss_mib(self.pid))

    def stop(self) -> float:
        self._done.set()
        self.join()
        return self.peak


def hammer(url: str, payloads: list[tuple[str, bytes]], n: int, concurrency: int, timeout: float = 300) -> tuple[list, float]:
    """(latency s, status) of ``n`` uploads, ``concurrency`` at a time; status 0 for a transport error."""
    import httpx

    def one(i: int):
        name, data = payloads[i % len(payloads)]
        t0 = time.perf_counter()
        try:
            status = client.post(url, files={"file": (name, data)}).status_code
        except httpx.HTTPError:
            status = 0
        return time.perf_counter() - t0, status

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(timeout=timeout, limits=limits) as client, ThreadPoolExecutor(concurrency) as pool:
        t0 = time.perf_counter()
        results = list(pool.map(one, range(n)))
        return results, time.perf_counter() - t0


def summary(results: list, wall: float) -> dict:
    lat = np.array([r[0] for r in results]) * 1000
    ok = np.array([r[1] == 200 for r in results])
    return {
        "requests": len(results),
        "status_counts": dict(Counter(str(r[1]) for r in results)),
        "errors_other_than_503": int(sum(r[1] not in (200, 503) for r in results)),
        "p50_ms": round(float(np.percentile(lat[ok], 50)), 1) if ok.any() else None,
        "p95_ms": round(float(np.percentile(lat[ok], 95)), 1) if ok.any() else None,
        "throughput_rps": round(len(results) / wall, 2),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    from pneumoscope.data.decode import is_image_path

    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("--mode", choices=["load", "dicom"], default="load")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "chest_xray" / "test"))
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--heatmap", action="store_true", help="ask for the Grad-CAM heatmap (?heatmap=true)")
    parser.add_argument("--src", help="a source tree to serve from (its `src` folder), e.g. an older version")
    args = parser.parse_args()

    if args.mode == "load":
        files = sorted(f for f in Path(args.data).rglob("*") if f.is_file() and is_image_path(f))
        payloads = [(f.name, f.read_bytes()) for f in files]
        n = args.requests
    else:
        sys.path.insert(0, str(REPO))
        from tests.dicom_util import write_rle_dicom

        path = write_rle_dicom(Path(tempfile.mkdtemp()) / "largest.dcm", 7936, 8000)
        payloads, n = [(path.name, path.read_bytes())], args.concurrency
    record = {
        "mode": args.mode,
        "src": args.src or "this checkout",
        "heatmap": args.heatmap,
        "concurrency": args.concurrency,
        "upload_bytes": len(payloads[0][1]),
    }
    with served(args.run, args.src) as (base, pid):
        url = f"{base}/predict" + ("?heatmap=true" if args.heatmap else "")
        hammer(url, payloads[:1], 2, 1)  # warm-up
        record["rss_before_mib"] = round(rss_mib(pid))
        sampler = RssSampler(pid)
        sampler.start()
        results, wall = hammer(url, payloads, n, args.concurrency)
        record["rss_peak_mib"] = round(max(sampler.stop(), rss_mib(pid, "VmHWM")))
        record["rss_after_mib"] = round(rss_mib(pid))
    record.update(summary(results, wall))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
