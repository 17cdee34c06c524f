"""Benchmark: every command and the server over the hostile corpus (issue 23's targets).

    python benchmarks/bench_hostile.py --work DIR [--out FILE.json] [--limit-s 120]

Builds, in ``DIR/inputs``, small synthetic radiographs (the good images) mixed with the
hostile corpus of tests/test_corpus.py (truncated, garbage, blank, bomb-sized headers,
float TIFFs, DICOMs with NaN windows and the six malformed headers), a FIFO, links to
/dev/zero and /dev/urandom named like images, a dangling link, a symlink loop, a
branching chain of folder links (d0..d24, each linking ``x`` and ``y`` to the next), a
zip holding a 2 GiB member of zeros beside good images, and files a user wrote where
``predict --resume`` or ``--out`` would write. Then runs, as a user would (one
``python -m pneumoscope`` process each, ``-q``): data inspect, train, evaluate,
explain, shift, adapt, calibrate, pack, predict (folder, zip, list, resume onto a
user's files, into a pipe closed early), export and predict through ONNX, and the
web server (/predict with each file, /predict/batch with the good and the bad
together, slow bodies beside a client that must still be served).

Per command: exit status, wall time, peak memory of the command's whole process tree
(sampled from /proc every 50 ms), whether a traceback was printed, and whether every
good image still got its result. At the end: whether any file under ``inputs`` (none
of which the tool wrote) changed, and whether any process outlived its command.
Prints a JSON record and a Markdown table for BENCHMARKS.md. Exits 1 when a target is
missed (a traceback, a good image lost, 3 GB, 30 s of hang, a changed file).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_serve import wait_healthy  # noqa: E402
from tests.conftest import make_kaggle_tree, synthetic_xray  # noqa: E402
from tests.test_corpus import corpus  # noqa: E402

BOMB_BYTES = 2 * 1024**3
MEMORY_TARGET_GB = 3.0
HANG_TARGET_S = 30.0


# --------------------------------------------------------------------------- the process tree's memory


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(tree.get(p, []))
    return out


def tree_memory_gb(pid: int) -> tuple[float, float]:
    """(RSS summed over the tree: pages shared by forked workers counted in each; PSS: shared pages split between them)."""
    rss = pss = 0
    for p in descendants(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            pass
    return rss / 1024**2, pss / 1024**2


class TreeSampler(threading.Thread):
    """The peak RSS of a process and all its descendants, sampled until stopped."""

    def __init__(self, pid: int, every: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak, self.peak_pss, self.seen, self._done = pid, every, 0.0, 0.0, set(), threading.Event()

    def run(self):
        while not self._done.wait(self.every):
            self.seen.update(descendants(self.pid))
            rss, pss = tree_memory_gb(self.pid)
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)

    def stop(self) -> float:
        self._done.set()
        self.join()
        return self.peak


def survivors(pids: set[int]) -> list[int]:
    """Those of ``pids`` still alive (zombies aside)."""
    alive = []
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(p)
    return alive


# --------------------------------------------------------------------------- the inputs


def _jpeg(path: Path, rng, label: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(synthetic_xray(rng, label)).save(path, quality=90)


def specials(folder: Path) -> None:
    """A FIFO, links to /dev/zero and /dev/urandom named like images, a dangling link."""
    folder.mkdir(parents=True, exist_ok=True)
    os.mkfifo(folder / "pipe.png")
    (folder / "zero.png").symlink_to("/dev/zero")
    (folder / "random.jpeg").symlink_to("/dev/urandom")
    (folder / "gone.png").symlink_to(folder / "no-such-file.png")


def branching_chain(folder: Path, depth: int = 25) -> None:
    """d0..d{depth-1}, each linking ``x`` and ``y`` to the next: 2^(depth-1) paths to the last."""
    for i in range(depth):
        (folder / f"d{i}").mkdir(parents=True)
    for i in range(depth - 1):
        for name in ("x", "y"):
            (folder / f"d{i}" / name).symlink_to(folder / f"d{i + 1}", target_is_directory=True)


def add_bad(folder: Path, bad: dict[str, bytes], which: range) -> None:
    names = sorted(bad)
    for i in which:
        (folder / f"bad_{names[i % len(names)]}").write_bytes(bad[names[i % len(names)]])


def build(work: Path) -> dict:
    """The inputs under ``work/inputs``; returns the good images' names by use."""
    inputs = work / "inputs"
    if inputs.exists():
        shutil.rmtree(inputs)
    inputs.mkdir(parents=True)
    bad = corpus(work / "scratch")
    rng = np.random.default_rng(7)

    # a Kaggle tree: every bad file in train/ and in test/, the specials, a loop and a branching chain in both
    tree = make_kaggle_tree(inputs / "chest_xray", n_patients=12)
    for i, (split, cls) in enumerate((s, c) for s in ("train", "test") for c in ("NORMAL", "PNEUMONIA")):
        folder = tree / split / cls
        add_bad(folder, bad, range(i % 2, len(bad), 2))
        specials(folder / "odd")
        (folder / "odd" / "loop").symlink_to(folder, target_is_directory=True)
        branching_chain(folder / "chain")

    # a labelled site (class folders), 12 good images a class, the bad ones and the specials among them
    site = inputs / "site"
    for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
        for k in range(12):
            _jpeg(site / cls / f"site{k:02d}_{cls.lower()}.jpeg", rng, label)
        add_bad(site / cls, bad, range(label, len(bad), 2))
        specials(site / cls / "odd")
    branching_chain(site / "NORMAL" / "chain")

    # 60 copies of one image as a site (adapt and shift must refuse it)
    copies = inputs / "copies"
    _jpeg(copies / "c00.jpeg", rng, 1)
    for k in range(1, 60):
        shutil.copyfile(copies / "c00.jpeg", copies / f"c{k:02d}.jpeg")

    # a zip of class folders with good images and a 2 GiB member of zeros (2 MB on disk)
    bomb = inputs / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
            for k in range(12):
                buf = work / "scratch" / "one.jpeg"
                _jpeg(buf, rng, label)
                zf.write(buf, f"{cls}/zip{k:02d}_{cls.lower()}.jpeg")
        with zf.open("NORMAL/zbomb.png", "w", force_zip64=True) as fh:
            chunk = bytes(16 * 1024**2)
            for _ in range(BOMB_BYTES // len(chunk)):
                fh.write(chunk)

    # images named one by one and in a list: good, bad, specials, a path with a newline
    loose = inputs / "loose"
    for k in range(4):
        _jpeg(loose / f"loose{k}.jpeg", rng, k % 2)
    add_bad(loose, bad, range(len(bad)))
    specials(loose / "odd")
    odd_name = loose / "new\nline.jpeg"
    _jpeg(odd_name, rng, 0)
    listing = inputs / "list.txt"
    listing.write_text(
        "\n".join([str(loose / "odd" / "pipe.png"), "/dev/urandom", "/dev/zero", *map(str, sorted(loose.glob("*.*")))]) + "\n"
    )

    # files a user wrote where outputs would go
    foreign = inputs / "foreign"
    foreign.mkdir()
    (foreign / "notes.jsonl").write_text('{"patient": "A", "note": "follow up"}\n{"patient": "B", "note": "done"}\n')
    (foreign / "headerless.csv").write_text("a,b,c")
    (foreign / "results").mkdir()
    (foreign / "results" / "mine.txt").write_text("my own results\n")

    good = {
        "train": sorted(p.name for p in (tree / "train").glob("*/*.jpeg") if p.name.startswith(("IM-", "person"))),
        "test": sorted(p.name for p in (tree / "test").glob("*/*.jpeg") if p.name.startswith(("IM-", "person"))),
        "site": sorted(p.name for p in site.rglob("site*.jpeg")),
        "zip": [f"zip{k:02d}_{c}.jpeg" for c in ("normal", "pneumonia") for k in range(12)],
        "loose": sorted(p.name for p in loose.glob("loose*.jpeg")),
    }
    return {"tree": tree, "site": site, "copies": copies, "bomb": bomb, "loose": loose, "list": listing, "foreign": foreign, "good": good}


def fingerprint(folder: Path) -> dict[str, str]:
    """SHA-256 of every regular file under ``folder`` (links, FIFOs and devices are not opened)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            if path.is_symlink() or not path.is_file():
                continue
            out[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


# --------------------------------------------------------------------------- running a command


def run(name: str, argv: list[str], limit_s: float, *, shell_tail: str = "") -> dict:
    """One command as its own process group; wall, peak tree RSS, exit status, output."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "pneumoscope", "-q", *argv]
    if shell_tail:
        cmd = ["bash", "-c", " ".join(f"'{a}'" for a in cmd) + " " + shell_tail]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=limit_s)
        hung = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        hung = True
    wall = time.perf_counter() - t0
    peak = sampler.stop()
    time.sleep(0.2)
    out_s, err_s = out.decode(errors="replace"), err.decode(errors="replace")
    return {
        "name": name,
        "argv": argv,
        "code": None if hung else proc.returncode,
        "wall_s": round(wall, 1),
        "peak_gb": round(peak, 2),
        "peak_pss_gb": round(sampler.peak_pss, 2),
        "traceback": "Traceback" in out_s + err_s,
        "hung": hung,
        "survivors": survivors(sampler.seen - {proc.pid}),
        "stdout": out_s,
        "stderr_tail": err_s[-600:],
    }


def _names_in(text: str) -> set[str]:
    return {Path(line).name for line in text.splitlines()}


def _csv_names(path: Path, column: str = "path") -> set[str]:
    if not path.is_file():
        return set()
    with open(path, newline="") as fh:
        return {Path(r[column]).name for r in csv.DictReader(fh)}


def _labelled(rows: list[dict]) -> set[str]:
    return {Path(r["path"]).name for r in rows if r.get("label") or r.get("ood")}


def commands(inp: dict, out: Path, limit_s: float) -> list[dict]:
    """Every command over the inputs, each with the check that its good images got their result."""
    tree, site, good = str(inp["tree"]), str(inp["site"]), inp["good"]
    run_dir, results = out / "run", []

    def do(name, argv, check, *, expect=(0, 1), shell_tail=""):
        r = run(name, argv, limit_s, shell_tail=shell_tail)
        r["expected_code"] = r["code"] in expect
        try:
            r["good_kept"] = bool(check(r))
        except Exception as exc:  # a missing output: the check failed
            r["good_kept"], r["check_error"] = False, f"{type(exc).__name__}: {exc}"
        results.append(r)
        print(f"{name:34s} exit {r['code']}  {r['wall_s']:6.1f} s  {r['peak_gb']:.2f} GB  good kept: {r['good_kept']}", flush=True)
        return r

    def inspect_check(r, names):
        unreadable = {Path(u["path"]).name for u in json.loads(r["stdout"])["unreadable"]}
        return not (unreadable & set(names))

    do("data inspect (tree)", ["data", "inspect", tree, "--json"], lambda r: inspect_check(r, good["train"] + good["test"]))
    do("data inspect (bomb zip)", ["data", "inspect", str(inp["bomb"]), "--json"], lambda r: inspect_check(r, good["zip"]))
    do(
        "train",
        ["train", tree, "--out", str(run_dir), "--pretrained", "none", "--epochs", "3", "--val-fraction", "0.3"],
        lambda r: (run_dir / "model.safetensors").is_file() and not (_csv_names(run_dir / "skipped.csv") & set(good["train"])),
    )
    do(
        "train onto a user's folder",
        ["train", tree, "--out", str(inp["foreign"] / "results"), "--pretrained", "none", "--epochs", "1"],
        lambda r: "pneumoscope: error:" in r["stderr_tail"],
        expect=(2,),
    )
    ev = out / "ev"
    do(
        "evaluate",
        ["evaluate", str(run_dir), tree, "--out", str(ev), "--bootstraps", "50"],
        lambda r: set(good["test"]) <= _csv_names(ev / "predictions.csv"),
    )
    do(
        "evaluate (bomb zip)",
        ["evaluate", str(run_dir), str(inp["bomb"]), "--out", str(out / "evz"), "--bootstraps", "50", "--no-audit"],
        lambda r: set(good["zip"]) <= _csv_names(out / "evz" / "predictions.csv"),
    )
    ex = out / "ex"
    do(
        "explain",
        ["explain", str(run_dir), site, "--out", str(ex)],
        lambda r: all(any(n.rsplit(".", 1)[0] in p.name for p in ex.glob("*.png")) for n in good["site"]),
    )
    do("shift", ["shift", str(run_dir), site, "--json"], lambda r: json.loads(r["stdout"])["n"] >= len(good["site"]))
    do("shift (60 copies)", ["shift", str(run_dir), str(inp["copies"]), "--json"], lambda r: True, expect=(0, 1, 2))
    do("adapt", ["adapt", str(run_dir), site, "--out", str(out / "adapted")], lambda r: (out / "adapted" / "model.safetensors").is_file())
    do(
        "adapt (60 copies)",
        ["adapt", str(run_dir), str(inp["copies"]), "--out", str(out / "adapted-copies")],
        lambda r: "pneumoscope: error:" in r["stderr_tail"],
        expect=(2,),
    )
    do("calibrate", ["calibrate", str(run_dir), site, "--out", str(out / "cal")], lambda r: (out / "cal" / "model.safetensors").is_file())
    do(
        "calibrate --refit-head",
        ["calibrate", str(run_dir), site, "--out", str(out / "cal-refit"), "--refit-head"],
        lambda r: (out / "cal-refit" / "model.safetensors").is_file(),
    )
    packed = out / "packed.zip"
    do(
        "pack",
        ["pack", tree, "--out", str(packed)],
        lambda r: set(good["train"] + good["test"]) <= {Path(n).name for n in zipfile.ZipFile(packed).namelist()},
    )
    do(
        "pack (bomb zip)",
        ["pack", str(inp["bomb"]), "--out", str(out / "packed-bomb.zip")],
        lambda r: set(good["zip"]) <= {Path(n).name for n in zipfile.ZipFile(out / "packed-bomb.zip").namelist()},
    )

    def rows_check(path, names):
        return lambda r: set(names) <= _labelled([json.loads(line) for line in Path(path).read_text().splitlines()])

    do(
        "predict (folder)",
        ["predict", str(run_dir), tree, "--out", str(out / "p-tree.jsonl")],
        rows_check(out / "p-tree.jsonl", good["train"] + good["test"]),
    )
    do(
        "predict (bomb zip)",
        ["predict", str(run_dir), str(inp["bomb"]), "--out", str(out / "p-zip.jsonl")],
        rows_check(out / "p-zip.jsonl", good["zip"]),
    )
    do(
        "predict --from-list",
        ["predict", str(run_dir), "--from-list", str(inp["list"]), "--out", str(out / "p-list.jsonl")],
        rows_check(out / "p-list.jsonl", good["loose"]),
    )
    loose = sorted(str(p) for p in inp["loose"].rglob("*") if not p.is_dir())
    do(
        "predict (files named)",
        ["predict", str(run_dir), *loose, "--out", str(out / "p-loose.jsonl")],
        rows_check(out / "p-loose.jsonl", good["loose"]),
    )
    for foreign in ("notes.jsonl", "headerless.csv"):
        do(
            f"predict --resume onto {foreign}",
            ["predict", str(run_dir), str(inp["loose"]), "--out", str(inp["foreign"] / foreign), "--resume"],
            lambda r: "pneumoscope: error:" in r["stderr_tail"],
            expect=(2,),
        )
    # an empty file is what a run killed before its header leaves: resumed from the start, nothing to lose
    empty = out / "empty.csv"
    empty.write_bytes(b"")
    do(
        "predict --resume onto an empty file",
        ["predict", str(run_dir), str(inp["loose"]), "--out", str(empty), "--resume"],
        lambda r: set(good["loose"]) <= _csv_names(empty),
    )
    do("predict | head -1", ["predict", str(run_dir), tree], lambda r: len(r["stdout"].splitlines()) == 1, shell_tail="| head -1")
    for name, argv in (
        ("predict --from-list /dev/zero", ["predict", str(run_dir), "--from-list", "/dev/zero"]),
        ("train --config /dev/zero", ["train", tree, "--out", str(out / "run-zero"), "--config", "/dev/zero"]),
        ("predict, a bit flipped in the threshold", ["predict", str(_flip_threshold(run_dir, out / "flipped")), str(inp["loose"])]),
    ):
        do(name, argv, lambda r: "pneumoscope: error:" in r["stderr_tail"], expect=(2,))
    onnx = out / "model.onnx"
    do("export", ["export", str(run_dir), "--out", str(onnx)], lambda r: onnx.is_file())
    do(
        "predict (ONNX, folder)",
        ["predict", str(onnx), tree, "--out", str(out / "p-onnx.jsonl")],
        rows_check(out / "p-onnx.jsonl", good["train"] + good["test"]),
    )
    return results


def _flip_threshold(run_dir: Path, folder: Path) -> Path:
    """A copy of the run's weights file with one bit flipped in the first digit (1-8) of its stored threshold."""
    raw = bytearray((run_dir / "model.safetensors").read_bytes())
    at = raw.index(b"threshold") + len("threshold")
    while raw[at] not in b"12345678":
        at += 1
    raw[at] ^= 0x01 if raw[at] != ord("1") else 0x02  # '4' -> '5', '1' -> '3': still a number, a different one
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(bytes(raw))
    return folder


# --------------------------------------------------------------------------- the server


def serve_checks(inp: dict, run_dir: Path, bad: dict[str, bytes], limit_s: float) -> dict:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    cmd = [sys.executable, "-m", "pneumoscope", "-q", "serve", str(run_dir), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    base, rec = f"http://127.0.0.1:{port}", {"name": "serve"}
    good = sorted(p for p in inp["loose"].glob("loose*.jpeg"))
    try:
        if not wait_healthy(base):
            raise RuntimeError("server did not start")
        t0 = time.perf_counter()
        with httpx.Client(timeout=limit_s) as client:
            statuses, tracebacks, labelled_nothing = {}, 0, []
            for name, data in bad.items():
                r = client.post(f"{base}/predict", files={"file": (name, data)})
                statuses[name] = r.status_code
                tracebacks += "Traceback" in r.text
                if r.status_code == 200 and r.json()["label"] is not None and not np.isfinite(r.json()["prob"]):
                    labelled_nothing.append(name)
            files = [("files", (g.name, g.read_bytes())) for g in good] + [("files", (n, d)) for n, d in list(bad.items())[:12]]
            batch = client.post(f"{base}/predict/batch", files=files)
            rows = batch.json() if batch.status_code == 200 else []
            rows = rows.get("results", rows) if isinstance(rows, dict) else rows
            batch_good = {r.get("filename", r.get("path", "")) for r in rows if r.get("label") or r.get("ood")}
            rec.update(
                statuses=dict(sorted(statuses.items())),
                status_500=[n for n, s in statuses.items() if s >= 500],
                tracebacks=tracebacks,
                labelled_nothing=labelled_nothing,
                batch_status=batch.status_code,
                batch_good_kept={g.name for g in good} <= batch_good,
            )
            rec["slow_bodies"] = slow_bodies(base, port, client, good[0])
        rec["wall_s"] = round(time.perf_counter() - t0, 1)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        rec["peak_gb"], rec["peak_pss_gb"] = round(sampler.stop(), 2), round(sampler.peak_pss, 2)
        time.sleep(0.5)
        rec["survivors"] = survivors(sampler.seen)
        rec["stderr_traceback"] = "Traceback" in proc.stderr.read().decode(errors="replace")
    return rec


def slow_bodies(base: str, port: int, client, good: Path, n: int = 8, seconds: float = 25.0) -> dict:
    """``n`` connections sending a byte every 2 s; meanwhile a normal client must still be answered."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n")
        socks.append(s)
    served, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for s in socks:
            with contextlib.suppress(OSError):
                s.sendall(b"x")
        t1 = time.perf_counter()
        r = client.post(f"{base}/predict", files={"file": (good.name, good.read_bytes())})
        served.append((r.status_code, round(time.perf_counter() - t1, 2)))
        time.sleep(2)
    for s in socks:
        s.close()
    return {"connections": n, "answers": len(served), "ok": sum(c == 200 for c, _ in served), "max_latency_s": max(t for _, t in served)}


# --------------------------------------------------------------------------- the record


def verdict(results: list[dict], server: dict, changed: list[str]) -> dict:
    problems = []
    for r in results:
        for what, bad in (
            ("traceback", r["traceback"]),
            ("unexpected exit", not r["expected_code"]),
            ("good images lost", not r["good_kept"]),
            (f"over {MEMORY_TARGET_GB} GB", r["peak_gb"] >= MEMORY_TARGET_GB),
            ("hung", r["hung"]),
            ("processes left", bool(r["survivors"])),
        ):
            if bad:
                problems.append(f"{r['name']}: {what}")
    s = server
    for what, bad in (
        ("500", bool(s.get("status_500"))),
        ("traceback", bool(s.get("tracebacks")) or s.get("stderr_traceback")),
        ("label without a probability", bool(s.get("labelled_nothing"))),
        ("batch lost good images", not s.get("batch_good_kept")),
        ("slow bodies locked clients out", s.get("slow_bodies", {}).get("ok", 0) < s.get("slow_bodies", {}).get("answers", 1)),
        (f"over {MEMORY_TARGET_GB} GB", s.get("peak_gb", 0) >= MEMORY_TARGET_GB),
        ("processes left", bool(s.get("survivors"))),
    ):
        if bad:
            problems.append(f"serve: {what}")
    problems += [f"changed: {c}" for c in changed]
    return {"problems": problems, "ok": not problems}


def table(results: list[dict], server: dict) -> str:
    lines = [
        "| command | exit | wall s | peak GB (RSS summed; PSS) | traceback | good images kept |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| `{r['name'].replace('|', chr(92) + '|')}` | {r['code']} | {r['wall_s']} | {r['peak_gb']}; {r['peak_pss_gb']} | {'yes' if r['traceback'] else 'no'} | "
            f"{'yes' if r['good_kept'] else 'NO'} |"
        )
    sb = server.get("slow_bodies", {})
    lines.append(
        f"| `serve` ({len(server.get('statuses', {}))} files, batch, {sb.get('connections')} slow bodies) | "
        f"batch {server.get('batch_status')} | {server.get('wall_s')} | {server.get('peak_gb')}; {server.get('peak_pss_gb')} | "
        f"{'yes' if server.get('tracebacks') or server.get('stderr_traceback') else 'no'} | "
        f"{'yes' if server.get('batch_good_kept') else 'NO'}; {sb.get('ok')}/{sb.get('answers')} served beside slow bodies |"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (emptied)")
    parser.add_argument("--out", type=Path, help="also write the JSON record here")
    parser.add_argument("--limit-s", type=float, default=120.0, help="a command still running after this is a hang")
    args = parser.parse_args()

    if args.work.exists():
        shutil.rmtree(args.work)
    (args.work / "scratch").mkdir(parents=True)
    t0 = time.perf_counter()
    inp = build(args.work)
    print(f"inputs built in {time.perf_counter() - t0:.0f} s", flush=True)
    before = fingerprint(args.work / "inputs")
    outputs = args.work / "outputs"
    outputs.mkdir()
    results = commands(inp, outputs, args.limit_s)
    bad = corpus(args.work / "scratch")
    server = serve_checks(inp, outputs / "run", bad, args.limit_s)
    print(f"serve: {json.dumps({k: v for k, v in server.items() if k != 'statuses'})}", flush=True)
    after = fingerprint(args.work / "inputs")
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": platform.processor() or _cpu_model(),
        "cpus": os.cpu_count(),
        "results": [{k: v for k, v in r.items() if k != "stdout"} for r in results],
        "server": server,
        "inputs_changed": changed,
        **verdict(results, server, changed),
    }
    text = json.dumps(record, indent=1, default=str)
    if args.out:
        args.out.write_text(text)
    print(text)
    print(table(results, server))
    return 0 if record["ok"] else 1


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


if __name__ == "__main__":
    sys.exit(main())
