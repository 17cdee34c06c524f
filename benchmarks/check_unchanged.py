"""Behaviour check for refactors (issue 21): run the whole chain on a slice of the real data and fingerprint every
output, so that a refactor can show its outputs are byte-identical to the commit before it.

    python benchmarks/check_unchanged.py --out /tmp/before   # on the old commit
    python benchmarks/check_unchanged.py --out /tmp/after    # on the new one
    python benchmarks/check_unchanged.py --compare /tmp/before/manifest.json /tmp/after/manifest.json

The chain, two-class and three-class (`--labels pneumonia-type`): train (with one epoch of fine-tuning for the
two-class run) -> evaluate on test/ -> calibrate on test/ -> adapt to test/'s images -> explain -> predict ->
export -> predict through the ONNX file. The slice: `--limit` images per split (default 120), the same on every run.
The manifest holds each output file's SHA-256; in JSON and CSV files, fields that say when or how long
(timestamps, durations, versions, paths of the work folder) are dropped before hashing, and listed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VOLATILE = re.compile(r"(time|seconds|duration|created|date|elapsed|version|commit|host|python|torch|platform|_s$|path|cpu)", re.I)


def _scrub(value, root: str):
    """``value`` without the fields that change from run to run (by name), and with the work folder's path replaced."""
    if isinstance(value, dict):
        return {k: _scrub(v, root) for k, v in value.items() if not VOLATILE.search(k)}
    if isinstance(value, list):
        return [_scrub(v, root) for v in value]
    if isinstance(value, str):
        return value.replace(root, "<out>")
    return value


def _scrub_text(text: str, root: str) -> str:
    """A metadata value: JSON scrubbed as a JSON file is, other text with the work folder's path replaced."""
    try:
        return json.dumps(_scrub(json.loads(text), root), sort_keys=True)
    except ValueError:
        return text.replace(root, "<out>")


def _model_bytes(path: Path, data: bytes, root: str) -> bytes:
    """A safetensors or ONNX file as bytes to hash: its tensors and graph as they are, its metadata (the run's
    description, which names the work folder and the date) scrubbed."""
    if path.suffix == ".safetensors":
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + size])
        meta = {k: _scrub_text(v, root) for k, v in header.pop("__metadata__", {}).items()}
        return json.dumps([header, meta], sort_keys=True).encode() + data[8 + size :]
    import onnx

    model = onnx.load_from_string(data)
    for prop in model.metadata_props:
        prop.value = _scrub_text(prop.value, root)
    for node in model.graph.node:  # the exporter's debug notes: stack traces name the source files and their lines
        del node.metadata_props[:]
    return model.SerializeToString(deterministic=True)


def fingerprint(path: Path, root: Path) -> str:
    """The SHA-256 of a file's content, JSON scrubbed of volatile fields and text of the work folder's path."""
    data = path.read_bytes()
    if path.suffix in (".safetensors", ".onnx"):
        data = _model_bytes(path, data, str(root))
    elif path.suffix == ".json":
        data = _scrub_text(data.decode(), str(root)).encode()
    elif path.suffix in (".csv", ".html", ".md", ".txt", ".yaml", ".log"):
        data = data.replace(str(root).encode(), b"<out>")
    return hashlib.sha256(data).hexdigest()


def chain(out: Path, data: str, limit: int) -> None:
    """Run the commands of the chain into ``out``, one after the other; stop at the first that fails."""
    cli = [sys.executable, "-m", "pneumoscope", "-q"]
    test = f"{data}/test"
    images = (
        sorted(str(p) for p in Path(test, "PNEUMONIA").glob("*.jpeg"))[:3] + sorted(str(p) for p in Path(test, "NORMAL").glob("*.jpeg"))[:3]
    )
    common = ["--limit", str(limit), "--seed", "0"]
    steps = []
    for name, extra in (("binary", ["--finetune-epochs", "1"]), ("three", ["--labels", "pneumonia-type"])):
        run = out / name
        steps += [
            ["train", data, "--out", f"{run}/run", *common, *extra],
            ["evaluate", f"{run}/run", test, "--out", f"{run}/eval", "--limit", str(limit), "--bootstraps", "200"],
            ["adapt", f"{run}/run", test, "--out", f"{run}/adapted", "--method", "center"],
            ["explain", f"{run}/run", *images, "--out", f"{run}/explain"],
            ["predict", f"{run}/run", *images, "--out", f"{run}/predictions.csv"],
            ["export", f"{run}/run", "--out", f"{run}/model.onnx"],
            ["predict", f"{run}/model.onnx", *images, "--out", f"{run}/predictions-onnx.csv"],
        ]
        if name == "binary":
            steps.insert(len(steps) - 5, ["calibrate", f"{run}/run", test, "--out", f"{run}/calibrated"])
    for i, step in enumerate(steps, 1):
        started = time.monotonic()
        print(f"[{i}/{len(steps)}] pneumoscope {' '.join(step[:1])} ...", flush=True)
        subprocess.run([*cli, *step], check=True)
        print(f"        {time.monotonic() - started:.0f} s", flush=True)


def manifest(out: Path) -> dict[str, str]:
    """Every output file's fingerprint, by its path under ``out``."""
    return {str(p.relative_to(out)): fingerprint(p, out) for p in sorted(out.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def compare(a: Path, b: Path) -> int:
    """Print the files that differ or exist on one side only; 0 when none do."""
    before, after = json.loads(a.read_text()), json.loads(b.read_text())
    differ = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    only = sorted(before.keys() ^ after.keys())
    print(f"{len(before.keys() & after.keys()) - len(differ)} files identical, {len(differ)} differ, {len(only)} on one side only")
    for k in differ:
        print("  differs:", k)
    for k in only:
        print("  one side only:", k, "(before)" if k in before else "(after)")
    return 1 if differ or only else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "chest_xray"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--limit", type=int, default=120)
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    if args.out is None or (args.out.exists() and any(args.out.iterdir())):
        parser.error("--out: a new or empty folder")
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PNEUMOSCOPE_CACHE", str(args.out.parent / "check-unchanged-cache"))
    chain(args.out.resolve(), args.data, args.limit)
    (args.out / "manifest.json").write_text(json.dumps(manifest(args.out.resolve()), indent=1))
    print(f"manifest: {args.out / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
