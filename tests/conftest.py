import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PNEUMOSCOPE_SHARED", REPO.parent / "shared"))
CHEST_XRAY = SHARED / "data" / "chest_xray"

# Probabilities of one image computed along two paths (a batch of one vs of two, PyTorch vs ONNX Runtime,
# the CLI vs the API) agree to this, never exactly: another batch shape or CPU takes other SIMD kernels,
# whose sums round differently (2e-8 between a batch of one and of two on a CPU without AVX-512).
PROB_ATOL = 1e-6


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Every test run gets its own feature cache, never the user's."""
    old = os.environ.get("PNEUMOSCOPE_CACHE")
    os.environ["PNEUMOSCOPE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("PNEUMOSCOPE_CACHE", None)
    else:
        os.environ["PNEUMOSCOPE_CACHE"] = old


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A checkpoint of an untrained model (random head): enough to load, predict and export."""
    import torch

    from pneumoscope.models.checkpoint import describe, save_checkpoint
    from pneumoscope.models.classifier import create_model

    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", pretrained="none", hidden=8).eval()
    run = tmp_path_factory.mktemp("tiny") / "run"
    save_checkpoint(run, model, describe(model, threshold=0.5, threshold_policy="test"))
    return run


@pytest.fixture
def real_data() -> Path:
    if not (CHEST_XRAY / "MANIFEST.csv").is_file():
        pytest.skip(f"real data not found at {CHEST_XRAY}")
    return CHEST_XRAY


def synthetic_xray(rng: np.random.Generator, label: int, size: int = 64) -> np.ndarray:
    """A rough chest-like picture; pneumonia ones get a bright blob in a lung."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.25 + 0.3 * np.exp(-((xx - 0.5) ** 2) / 0.02) + 0.05 * rng.standard_normal((size, size))
    if label:
        cy, cx = rng.uniform(0.35, 0.7), rng.choice([0.3, 0.7])
        img += 0.5 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.01)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_kaggle_tree(root: Path, *, n_patients: int = 12, per_patient: int = 2, seed: int = 0, test: bool = True) -> Path:
    """train/ val/ test/ x NORMAL/ PNEUMONIA/ with Kermany-style file names."""
    rng = np.random.default_rng(seed)
    splits = {"train": n_patients, "val": 2}
    if test:
        splits["test"] = 4
    for split, n in splits.items():
        for p in range(n):
            for label, cls in ((0, "NORMAL"), (1, "PNEUMONIA")):
                folder = root / split / cls
                folder.mkdir(parents=True, exist_ok=True)
                for k in range(per_patient):
                    pid = 100 * (split == "val") + p
                    name = f"IM-{pid:04d}-{k:04d}.jpeg" if label == 0 else f"person{pid}_{'bacteria' if k % 2 == 0 else 'virus'}_{k}.jpeg"
                    Image.fromarray(synthetic_xray(rng, label)).save(folder / name, quality=90)
    return root


def make_three_class_tree(root: Path, *, n_patients: int = 10, per_patient: int = 2, seed: int = 0) -> Path:
    """train/ val/ test/ x COVID/ NORMAL/ PNEUMONIA/: NORMAL plain, PNEUMONIA a blob in a lung, COVID a band across both."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64] / 64
    for split, n in {"train": n_patients, "val": 3, "test": 4}.items():
        for p in range(n):
            for cls in ("COVID", "NORMAL", "PNEUMONIA"):
                folder = root / split / cls
                folder.mkdir(parents=True, exist_ok=True)
                for k in range(per_patient):
                    img = synthetic_xray(rng, int(cls == "PNEUMONIA")).astype(np.float32)
                    if cls == "COVID":
                        img += 110 * np.exp(-((yy - rng.uniform(0.3, 0.7)) ** 2) / 0.004)
                    pid = 100 * (split == "val") + 200 * (split == "test") + p
                    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{cls.lower()}{pid}-{k}.png")
    return root


@pytest.fixture
def kaggle_tree(tmp_path) -> Path:
    return make_kaggle_tree(tmp_path / "chest_xray")


def make_npz(path: Path, counts=(("train", 24), ("val", 8), ("test", 8)), seed: int = 0) -> dict:
    """A PneumoniaMNIST-shaped .npz with alternating labels; returns its arrays."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in counts:
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(-1, 1).astype(np.uint8)
    np.savez(path, **arrays)
    return arrays


def train_real_run(tmp_path_factory, name: str, *args: str) -> Path:
    """A run trained through the CLI on a capped subset of the real data (skips where absent)."""
    from pneumoscope.cli.main import main

    if not (CHEST_XRAY / "MANIFEST.csv").is_file():
        pytest.skip(f"real data not found at {CHEST_XRAY}")
    run = tmp_path_factory.mktemp(name) / "run"
    assert main(["-q", "train", str(CHEST_XRAY), "--out", str(run), *args]) == 0
    return run


@pytest.fixture(scope="session")
def small_real_run(tmp_path_factory) -> Path:
    """One run trained on ~300 real images (enough for a meaningful OOD guard), shared by the
    deployment, API and site tests; none of them writes into it."""
    return train_real_run(tmp_path_factory, "small-real", "--limit", "150", "--epochs", "20", "--patience", "5")


def process_tree(pid: int) -> dict[int, str]:
    """The descendants of ``pid`` now (Linux /proc), each with its start time, so a reused pid is not mistaken for one of them."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        child = int(stat.parent.name)
        children.setdefault(int(fields[1]), []).append(child)  # fields[1]: the parent's pid
        starts[child] = fields[19]  # start time, in clock ticks after boot
    found, todo = {}, list(children.get(pid, []))
    while todo:
        p = todo.pop()
        found[p] = starts[p]
        todo += children.get(p, [])
    return found


def survivors(procs: dict[int, str], wait_s: float = 10.0) -> list[int]:
    """Which of ``procs`` (from :func:`process_tree`) still run after up to ``wait_s`` seconds (zombies count as ended).
    Those are then killed, so a failing test leaves nothing behind either."""
    import signal
    import time

    deadline = time.monotonic() + wait_s
    while True:
        alive = []
        for p, start in procs.items():
            try:
                fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[19] == start and fields[0] != "Z":
                alive.append(p)
        if not alive or time.monotonic() > deadline:
            for p in alive:
                os.kill(p, signal.SIGKILL)
            return alive
        time.sleep(0.1)


# What a skipped test needs, and the one command that makes it run: printed at the end of every run, so nothing is
# left untested without a word.
SKIP_FIXES = {
    "no Chromium installed": ("browser tests", "sudo apt-get install chromium  (Debian/Ubuntu; `make test` does it when run as root)"),
    "real data not found": ("tests on the real images", f"put the Kermany chest_xray set at {CHEST_XRAY} or set PNEUMOSCOPE_SHARED"),
}


def pytest_terminal_summary(terminalreporter):
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    for reason, n in sorted(reasons.items()):
        what, fix = next(((w, f) for key, (w, f) in SKIP_FIXES.items() if reason.startswith(key)), ("tests", None))
        line = f"NOT TESTED: {n} {what} skipped ({reason})" + (f"; to run them: {fix}" if fix else "")
        terminalreporter.write_line(line, yellow=True, bold=True)


def conforms(value: dict, kind) -> None:
    """``value`` holds every key the TypedDict ``kind`` requires, and no key it does not declare."""
    declared = kind.__required_keys__ | kind.__optional_keys__
    assert kind.__required_keys__ <= set(value), (kind.__name__, sorted(kind.__required_keys__ - set(value)))
    assert set(value) <= declared, (kind.__name__, sorted(set(value) - declared))
