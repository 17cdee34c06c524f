"""A command's wall time alone and beside busy processes: does it slow only in proportion to the CPU it gets?

    python benchmarks/bench_contention.py --busy 2 -- pneumoscope -q demo --data ../shared/data/chest_xray --out /tmp/x

Runs the command once idle and once with ``--busy`` pure-Python spinning processes on the same CPUs (each wants one
CPU), removing the ``--out`` folder before each run, and prints both times, their ratio and the ratio a fair share
of the CPU explains ((cpus + busy) / cpus when the command can use every CPU). Run the command once before, so that
both timed runs find the same caches. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _timed(cmd: list[str], out: str | None, env: dict) -> float:
    if out:
        shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--busy", type=int, default=2, help="competing CPU-bound processes")
    ap.add_argument("--env", action="append", default=[], metavar="K=V", help="extra environment for the command")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    out = cmd[cmd.index("--out") + 1] if "--out" in cmd else None
    env = dict(os.environ, **dict(kv.split("=", 1) for kv in args.env))
    idle = _timed(cmd, out, env)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        busy = _timed(cmd, out, env)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    cpus = len(os.sched_getaffinity(0))
    print(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "cpu": _cpu_model(),
                "cpus": cpus,
                "command": " ".join(cmd),
                "env": args.env,
                "busy": args.busy,
                "idle_s": round(idle, 1),
                "busy_s": round(busy, 1),
                "slowdown": round(busy / idle, 2),
                "fair_share_slowdown": round((cpus + args.busy) / cpus, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
