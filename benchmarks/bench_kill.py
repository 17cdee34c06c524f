"""Benchmark: kill -9 at random points of train, evaluate, calibrate and export (issue 11).

    python benchmarks/bench_kill.py [--data DATA] [--trials 6] [--seed 0] [--work DIR] [--out FILE.json]
                                    [--commands train evaluate calibrate export] [--finetune-epochs 1]

For each command, ``--trials`` times: start it through the CLI as a user would, send
SIGKILL to its whole process group at a time drawn uniformly from [0, 1.1 x its
uninterrupted wall time], then check what the kill left and run the command again:

* the output path is either absent or complete and valid (a run loads through
  ``Predictor.load`` and its ``checkpoint.json`` is its description; an evaluation has
  ``metrics.json``, ``predictions.csv`` and ``report.html``; an ONNX file loads and carries
  its description), never half-written or unverified;
* the next run succeeds (exit 0) and its output is valid: the same command, with
  ``--overwrite`` where a complete output is already there (the commands refuse to replace
  one silently) and ``--resume`` where a killed fine-tuning left a checkpoint (train refuses
  to discard it silently);
* after that run, no staging leftovers (``.NAME.partial-*``, ``.NAME.old-*``, temporary
  files) remain beside the output.

The commands run on a small slice of the real data with a warm cache (``--limit 40``;
calibrate on ``test/``), so that one trial takes seconds and a kill lands in every phase:
start-up, feature extraction, fitting, the staging folder's rename.

Prints a JSON record and a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "chest_xray"
LEFTOVER_MARKERS = (".partial-", ".old-", ".tmp")


def commands(data: Path, base: Path, work: Path, finetune_epochs: int = 1) -> dict[str, tuple[list[str], Path]]:
    """Each command's arguments (after ``pneumoscope -q``) and its output path."""
    return {
        "train": (
            [
                "train",
                str(data),
                "--out",
                str(work / "train"),
                "--limit",
                "40",
                "--epochs",
                "5",
                "--finetune-epochs",
                str(finetune_epochs),
                "--set",
                "finetune.batch_size=16",
            ],
            work / "train",
        ),
        "evaluate": (
            ["evaluate", str(base), str(data), "--out", str(work / "eval"), "--limit", "40", "--bootstraps", "100", "--no-audit"],
            work / "eval",
        ),
        "calibrate": (["calibrate", str(base), str(data), "--split", "test", "--out", str(work / "cal")], work / "cal"),
        "export": (["export", str(base), "--out", str(work / "model.onnx")], work / "model.onnx"),
    }


def cpu() -> str:
    """The CPU's model name and whether it has native bf16 (stage 2's precision depends on it)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), platform.machine())
    return f"{name}, {os.cpu_count()} CPUs, {'AVX512-BF16' if 'avx512_bf16' in info else 'no AVX512-BF16'}"


def run_cli(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pneumoscope", "-q", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def complete(name: str, out: Path) -> str | None:
    """None when ``out`` is a complete, valid output of ``name``; else what is wrong with it."""
    from pneumoscope.inference.predictor import Predictor

    try:
        if name in ("train", "calibrate"):
            predictor = Predictor.load(out)
            if json.loads((out / "checkpoint.json").read_text()) != predictor.description.to_dict():
                return "checkpoint.json is not the checkpoint's description"
        elif name == "evaluate":
            missing = [f for f in ("metrics.json", "predictions.csv", "report.html") if not (out / f).is_file()]
            if missing:
                return f"missing {missing}"
            json.loads((out / "metrics.json").read_text())
        else:
            Predictor.load(out)
    except Exception as err:  # any failure to load is the finding
        return f"{type(err).__name__}: {err}"
    return None


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.") and any(m in p.name for m in LEFTOVER_MARKERS))


def trial(name: str, args: list[str], out: Path, delay: float, env: dict) -> dict:
    work_state = out.parent / f".{out.name}.work"
    for p in (out, work_state):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    proc = run_cli(args, env)
    try:
        proc.wait(timeout=delay)
        exited = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        exited = None
    record = {"command": name, "kill_at_s": round(delay, 2), "finished_before_kill": exited is not None, "exit_before_kill": exited}
    if out.exists():
        record["left"] = "complete" if (problem := complete(name, out)) is None else f"INVALID: {problem}"
    else:
        record["left"] = "nothing"
    from pneumoscope.training.resume import resume_checkpoint

    resumable = work_state.exists() and resume_checkpoint(work_state).is_file()
    record["fine_tune_state_left"] = "checkpoint" if resumable else ("logs only" if work_state.exists() else "none")
    again = list(args) + (["--overwrite"] if out.exists() else []) + (["--resume"] if resumable else [])
    t0 = time.perf_counter()
    rerun = run_cli(again, env)
    _, err = rerun.communicate()
    record.update(
        rerun_flags=[a for a in again[len(args) :]],
        rerun_exit=rerun.returncode,
        rerun_s=round(time.perf_counter() - t0, 1),
        rerun_output=("valid" if (problem := complete(name, out)) is None else f"INVALID: {problem}")
        if rerun.returncode == 0
        else err.decode()[-500:],
        leftovers_after_rerun=leftovers(out),
    )
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--trials", type=int, default=6, help="kills per command")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-kill"))
    ap.add_argument("--commands", nargs="+", default=["train", "evaluate", "calibrate", "export"])
    ap.add_argument("--finetune-epochs", type=int, default=1, help="train's stage-2 epochs (more: more kills land in fine-tuning)")
    ap.add_argument("--out", type=Path, help="JSON record")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PNEUMOSCOPE_CACHE": str(a.work / "cache")}
    base = a.work / "base"
    cmds = {k: v for k, v in commands(a.data, base, a.work, a.finetune_epochs).items() if k in a.commands}
    if not (base / "model.safetensors").is_file():  # the run the other commands use; also warms the caches
        subprocess.run(
            [sys.executable, "-m", "pneumoscope", "-q", "train", str(a.data), "--out", str(base), "--limit", "40", "--epochs", "5"],
            env=env,
            check=True,
        )
    full = {}
    for name, (args, out) in cmds.items():  # uninterrupted wall time (caches warm after the first)
        for _ in range(2):
            shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
            t0 = time.perf_counter()
            proc = run_cli(args, env)
            _, err = proc.communicate()
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed uninterrupted: {err.decode()[-2000:]}")
            full[name] = round(time.perf_counter() - t0, 1)
    rng = random.Random(a.seed)
    records = []
    for name, (args, out) in cmds.items():
        for _ in range(a.trials):
            r = trial(name, args, out, rng.uniform(0, 1.1 * full[name]), env)
            records.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    ok = [
        r
        for r in records
        if not r["left"].startswith("INVALID") and r["rerun_exit"] == 0 and r["rerun_output"] == "valid" and not r["leftovers_after_rerun"]
    ]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu(),
        "uninterrupted_s": full,
        "trials": len(records),
        "passed": len(ok),
        "records": records,
    }
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "records"}, indent=2))
    print(
        "\n| command | trials | killed before the end | left nothing / complete / invalid | rerun exit 0 and valid | leftovers after rerun |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in cmds:
        rs = [r for r in records if r["command"] == name]
        left = [sum(r["left"] == k for r in rs) for k in ("nothing", "complete")] + [sum(r["left"].startswith("INVALID") for r in rs)]
        print(
            f"| {name} | {len(rs)} | {sum(not r['finished_before_kill'] for r in rs)} | {' / '.join(map(str, left))} | "
            f"{sum(r['rerun_exit'] == 0 and r['rerun_output'] == 'valid' for r in rs)} | {sum(bool(r['leftovers_after_rerun']) for r in rs)} |"
        )
    if len(ok) != len(records):
        sys.exit(1)


if __name__ == "__main__":
    main()
