"""How long `pneumoscope --help`, `--version` and a command's `--help` take (issue 19: at most 0.5 s).

    python benchmarks/bench_startup.py [--repeats 10]

Each is run as a new process (the `pneumoscope` entry point of this environment) ``--repeats`` times; prints the
median and the slowest of each, as one JSON line with the date and the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_contention import _cpu_model  # noqa: E402

COMMANDS = (["--help"], ["--version"], ["train", "--help"], ["predict", "--help"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    exe = str(Path(sys.executable).with_name("pneumoscope"))
    out = {"date": time.strftime("%Y-%m-%d"), "cpu": _cpu_model(), "repeats": args.repeats}
    for argv in COMMANDS:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            subprocess.run([exe, *argv], check=True, stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - t0)
        out[" ".join(argv)] = {"median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
