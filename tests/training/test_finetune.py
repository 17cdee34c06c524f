"""Stage 2 (issue 3): image cache, augmentation, Lightning fine-tuning, DDP on CPU, resume after kill -9."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumoscope.data.augment import Augment, AugmentConfig, resolve_augment
from pneumoscope.data.imagecache import build_image_array
from pneumoscope.data.layouts import load_dataset
from pneumoscope.data.preprocessing import Preprocessing
from pneumoscope.data.readers import DirReader
from pneumoscope.data.records import Record
from pneumoscope.data.splits import scan
from pneumoscope.errors import UsageError
from pneumoscope.models.backbones import BACKBONES
from pneumoscope.models.classifier import create_model
from pneumoscope.training.config import load_train_config
from pneumoscope.training.finetune import frozen_modules
from pneumoscope.training.resume import AtomicCheckpointIO
from tests.conftest import make_kaggle_tree


def test_image_cache_is_built_once_and_memory_mapped(kaggle_tree, tmp_path):
    ds = scan(load_dataset(kaggle_tree))
    bad = Record("train/NORMAL/IM-8888-0001.jpeg", 0, "train", "train/IM-8888", "none", True, content_hash="f" * 64)
    (kaggle_tree / bad.ref).write_bytes(b"\xff\xd8\xff broken")
    records = ds.records[:10] + [bad]
    pre64 = Preprocessing(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    first = build_image_array(ds, records, pre64, tmp_path, num_workers=0, progress=False)
    assert isinstance(first.images, np.memmap) and first.images.shape == (10, 64, 64) and first.images.dtype == np.uint8
    assert [p for p, _ in first.problems] == [ds.display(bad)] and first.records == records[:10]
    again = build_image_array(ds, records, pre64, tmp_path, num_workers=0, progress=False)
    assert np.array_equal(np.asarray(first.images), np.asarray(again.images)) and again.records == first.records
    assert len(list((tmp_path / "images").glob("*.npy"))) == 1
    direct = DirReader(kaggle_tree).read_image(records[3].ref)
    from pneumoscope.data.decode import resize_image

    assert np.abs(first.images[3] / 255.0 - resize_image(direct, 64)).max() < 1 / 255 + 1e-6


def test_image_cache_takes_full_size_kaggle_jpegs(tmp_path):
    """The original Kaggle files are 1-2 MB JPEGs of about 2000 x 1700: decoded once, at reduced scale."""
    from PIL import Image

    from pneumoscope.data.decode import read_image, resize_image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:1700, 0:2000]
    for folder, name in (("NORMAL", "IM-0001-0001.jpeg"), ("PNEUMONIA", "person1_bacteria_1.jpeg")):
        img = 120 + 60 * np.sin(xx / 150.0) * np.cos(yy / 170.0) + rng.normal(0, 25, xx.shape)
        (tmp_path / "data" / folder).mkdir(parents=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(tmp_path / "data" / folder / name, quality=95)
    paths = sorted((tmp_path / "data").glob("*/*.jpeg"))
    assert all(p.stat().st_size > 1_000_000 for p in paths)
    ds = scan(load_dataset(tmp_path / "data"))
    arr = build_image_array(
        ds, ds.records, BACKBONES["efficientnet_lite0"].preprocessing, tmp_path / "cache", num_workers=0, progress=False
    )
    assert arr.images.shape == (2, 224, 224) and not arr.problems
    full = resize_image(read_image(ds.display(arr.records[0])), 224)  # full decode, then resize
    assert np.abs(arr.images[0] / 255.0 - full).mean() < 0.01


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_finetuning_tensors_are_the_preprocessing_contract_up_to_uint8_rounding(name, tmp_path):
    """Stage 2 feeds the network what ``Preprocessing.apply`` (features, predict, serve) would,
    except for the cache's uint8 rounding: at most half a grey level, in normalised units."""
    from PIL import Image

    from pneumoscope.training.finetune import ArrayDataset

    pre = BACKBONES[name].preprocessing
    root = make_kaggle_tree(tmp_path / "data", n_patients=2, test=False)
    yy, xx = np.mgrid[0:700, 0:560]
    big = 120 + 80 * np.sin(xx / 40.0) * np.cos(yy / 55.0)  # larger than any input size: decoded at reduced scale, then shrunk
    Image.fromarray(np.clip(big, 0, 255).astype(np.uint8)).save(root / "train" / "NORMAL" / "IM-0900-0001.jpeg", quality=90)
    ds = scan(load_dataset(root), progress=False)
    arr = build_image_array(ds, ds.records, pre, tmp_path / "cache", num_workers=0, progress=False)
    assert arr.records == ds.records and not arr.problems
    tensors = ArrayDataset(arr.images, np.array([r.label for r in arr.records]), pre, None)
    half_level = (0.5 / 255 + 1e-6) / np.asarray(pre.std, np.float32)[:, None, None]
    for i, record in enumerate(arr.records):
        x, _ = tensors[i]
        expected = pre.apply(ds.reader.read_image(record.ref, draft_size=pre.input_size))
        assert x.shape == expected.shape == (pre.in_chans, pre.input_size, pre.input_size) and x.dtype == torch.float32
        assert (np.abs(x.numpy() - expected) <= half_level).all(), ds.display(record)


def test_augmentation_keeps_range_and_is_seeded():
    aug = Augment(AugmentConfig())
    img = torch.from_numpy((np.random.default_rng(0).uniform(size=(1, 96, 96)) * 255).astype(np.uint8))
    a = aug(img, torch.Generator().manual_seed(3))
    b = aug(img, torch.Generator().manual_seed(3))
    c = aug(img, torch.Generator().manual_seed(4))
    assert a.shape == (1, 96, 96) and a.dtype == torch.float32 and a.min() >= 0 and a.max() <= 1
    assert AugmentConfig().hflip_p == 0.0  # the heart's side is anatomy
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_augmentation_settings_resolve_to_configs():
    assert resolve_augment(True) == AugmentConfig() == resolve_augment("default")
    assert resolve_augment(False) is None and resolve_augment("none") is None
    geo = resolve_augment("geometric")
    assert geo.rotation_deg == AugmentConfig().rotation_deg and (geo.contrast, geo.jpeg_p, geo.gamma) == (0.0, 0.0, (1.0, 1.0))
    assert resolve_augment("intensity").translate == 0.0 and resolve_augment("default+hflip").hflip_p == 0.5
    assert resolve_augment({"hflip_p": 0.5, "scale": [0.8, 1.2]}) == AugmentConfig(hflip_p=0.5, scale=(0.8, 1.2))
    with pytest.raises(ValueError, match="one of"):
        resolve_augment("heavy")
    with pytest.raises(ValueError, match="unknown augmentation settings"):
        resolve_augment({"flip": 1})
    with pytest.raises(ValueError, match="one of"):  # a typo fails when the config is read, before any work
        load_train_config(None, {}, ["augment=geometrc"])
    assert load_train_config(None, {}, ["augment={hflip_p: 0.5}"]).finetune.augment == {"hflip_p": 0.5}


def test_auto_precision_uses_bf16_only_on_a_cpu_that_has_it(monkeypatch):
    from pneumoscope.training import finetune as F

    assert F.auto_precision(cuda=True) == "16-mixed"
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert F.auto_precision(cuda=False) == "32-true"
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert F.auto_precision(cuda=False) == "bf16-mixed"


def test_top_unfreezing_keeps_frozen_batchnorm_statistics():
    model = create_model("efficientnet_lite0", pretrained="none", hidden=8)
    frozen = {id(m) for m in frozen_modules(model, "top")}
    b = model.backbone
    assert id(b.conv_stem) in frozen and id(b.blocks[5][0].bn1) in frozen
    assert id(b.blocks[6][0].conv_pw) not in frozen and id(b.conv_head) not in frozen and id(b.bn2) not in frozen
    assert frozen_modules(model, "all") == []
    with pytest.raises(ValueError, match="'top' or 'all'"):
        frozen_modules(model, "some")


def test_atomic_checkpoint_never_leaves_a_half_written_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)

    def crash(obj, f, *a, **kw):
        with open(f, "wb") as fh:
            fh.write(b"half")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.ckpt"]  # before issue 21 the half-written `.last.ckpt.tmp-PID` stayed


def test_atomic_checkpoint_is_staged_by_the_one_atomic_writer(tmp_path, monkeypatch):
    from pneumoscope.outputs import partial_name

    staged, save = [], torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **kw: staged.append(Path(f).name) or save(obj, f, *a, **kw))
    path = tmp_path / "last.ckpt"
    old = os.umask(0o027)
    try:
        AtomicCheckpointIO().save_checkpoint({"epoch": 1}, path)
    finally:
        os.umask(old)
    assert len(staged) == 1 and staged[0].startswith(partial_name(path))  # a killed save is an orphan the next run removes
    assert path.stat().st_mode & 0o777 == 0o640 and os.listdir(tmp_path) == ["last.ckpt"]


def test_yaml_config_then_flags_then_set(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("finetune_epochs: 3\nfinetune_lr: 1.0e-4\nseed: 5\n")
    c = load_train_config(cfg, {"seed": 7}, ["finetune_lr=3e-5", "augment=false", "unfreeze=all"])
    assert (c.finetune.epochs, c.seed, c.finetune.lr, c.finetune.augment, c.finetune.unfreeze) == (3, 7, 3e-5, False, "all")
    assert c.lr == 1e-3  # a bare name is the run's own (the head's learning rate) where it has one


def test_stage2_settings_nested_or_flat_are_one_setting(tmp_path):
    """finetune.lr, finetune_lr and a nested YAML mapping (as config.json writes it) set the same field."""
    import dataclasses

    from pneumoscope.training.config import TrainConfig

    nested = tmp_path / "nested.yaml"
    nested.write_text("finetune:\n  epochs: 2\n  lr: 3.0e-5\n  ema: 0.999\nlr: 0.01\n")
    a = load_train_config(nested)
    b = load_train_config(None, {"finetune_epochs": 2}, ["finetune.lr=3e-5", "finetune_ema=0.999", "lr=0.01"])
    assert a == b and (a.finetune.epochs, a.finetune.lr, a.finetune.ema, a.lr) == (2, 3e-5, 0.999, 0.01)
    saved = tmp_path / "config.yaml"  # a run's resolved settings read back as a config file give the same run
    saved.write_text(json.dumps(dataclasses.asdict(a)))
    assert load_train_config(saved) == a == TrainConfig(**json.loads(saved.read_text()))
    with pytest.raises(ValueError, match="unknown training settings"):
        load_train_config(None, {}, ["finetune.learning_rate=1"])
    with pytest.raises(ValueError, match="unknown training settings"):
        load_train_config(None, {}, ["learning_rate=1"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        load_train_config(None, {}, ["seed"])


def _cli(*args, env=None):
    return [sys.executable, "-m", "pneumoscope", "-q", *args]


@pytest.fixture
def small_tree(tmp_path):
    return make_kaggle_tree(tmp_path / "data", n_patients=10)


COMMON = ["--pretrained", "none", "--epochs", "3", "--val-fraction", "0.3", "--accelerator", "cpu", "--workers", "0"]


@pytest.mark.slow
def test_finetune_stage_writes_a_fine_tuned_run(small_tree, tmp_path):
    import json

    from pneumoscope.cli.main import main

    run = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert (
            main(
                [
                    "-q",
                    "train",
                    str(small_tree),
                    "--out",
                    str(run),
                    *COMMON,
                    "--finetune-epochs",
                    "2",
                    "--unfreeze",
                    "all",
                    "--augment",
                    "default+hflip",
                ]
            )
            == 0
        )
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]  # checkpoints have a folder of their own
    desc = json.loads((run / "checkpoint.json").read_text())
    assert "fine-tuned" in desc["training"]["stage"]
    assert desc["training"]["finetune"]["augmentation"]["hflip_p"] == 0.5  # the preset asked for, recorded
    assert desc["training"]["finetune"]["fit_seconds"] > 0 and desc["training"]["finetune"]["train_images_per_s"] > 0
    history = (run / "finetune_history.csv").read_text().splitlines()
    assert history[0] == "epoch,train_loss,val_loss,val_auc" and len(history) == 3
    assert not (tmp_path / ".run.work").exists()  # resumable state is removed once the run is complete


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(small_tree, tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    proc = subprocess.run(
        _cli("train", str(small_tree), "--out", str(run), *COMMON, "--finetune-epochs", "2", "--devices", "2", "--logger", "mlflow"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # -q: warnings and errors only; Lightning's INFO lines and its own deprecation notice are not for the user
    for chatter in ("GPU available", "Tip:", "Trainer.fit` stopped", "LeafSpec"):
        assert chatter not in proc.stderr, proc.stderr[-2000:]
    import json

    facts = json.loads((run / "checkpoint.json").read_text())["training"]["finetune"]
    assert facts["world_size"] == 2 and facts["num_nodes"] == 1
    assert (run / "model.safetensors").is_file() and len((run / "finetune_history.csv").read_text().splitlines()) == 3
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run}/logs/mlflow.db")
    (logged,) = client.search_runs([client.get_experiment_by_name("pneumoscope").experiment_id])  # rank 0 logs; the other rank does not
    assert [m.step for m in client.get_metric_history(logged.info.run_id, "finetune/val_auc")] == [1, 2]
    assert [m.step for m in client.get_metric_history(logged.info.run_id, "head/val_loss")] == [1, 2, 3]


@pytest.mark.slow
def test_resume_after_kill_9(small_tree, tmp_path):
    run, work = tmp_path / "run", tmp_path / ".run.work"
    args = ["train", str(small_tree), "--out", str(run), *COMMON, "--finetune-epochs", "6", "--set", "finetune_patience=100"]
    proc = subprocess.Popen(_cli(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    while not (work / "checkpoints" / "last.ckpt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert (work / "checkpoints" / "last.ckpt").exists(), (
        proc.stderr.read().decode()[-3000:] if proc.poll() is not None else "no checkpoint in time"
    )
    time.sleep(1.0)  # let it get into the next epoch
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not run.exists()  # nothing half-written where the run should be
    # without --resume the leftover state is not silently discarded
    refused = subprocess.run(_cli(*args), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    done = subprocess.run(_cli(*args, "--resume"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    facts = json.loads((run / "checkpoint.json").read_text())["training"]["finetune"]
    assert facts["resumed_after_epoch"] is not None and 1 <= facts["resumed_after_epoch"] < 6
    history = (run / "finetune_history.csv").read_text().splitlines()[1:]
    assert [int(line.split(",")[0]) for line in history] == [1, 2, 3, 4, 5, 6]  # the epochs before the kill too, each once
    assert all(len(line.split(",")) == 4 and "" not in line.split(",") for line in history)
    logged = list(csv.DictReader(open(run / "logs" / "finetune" / "metrics.csv")))
    assert sorted({int(r["step"]) for r in logged if r.get("finetune/val_auc")}) == [1, 2, 3, 4, 5, 6]
    assert not work.exists()
    assert (run / "logs" / "finetune" / "metrics.csv").is_file() and (run / "logs" / "head" / "metrics.csv").is_file()


@pytest.mark.slow
def test_seeds_train_several_runs_and_report_mean_and_sd(small_tree, tmp_path, capsys):
    import json

    from pneumoscope.cli.main import main

    out = tmp_path / "runs"
    assert (
        main(
            [
                "-q",
                "train",
                str(small_tree),
                "--out",
                str(out),
                "--pretrained",
                "none",
                "--epochs",
                "3",
                "--val-fraction",
                "0.3",
                "--seeds",
                "0",
                "1",
            ]
        )
        == 0
    )
    summary = json.loads((out / "seeds.json").read_text())
    assert summary["seeds"] == [0, 1] and {"mean", "sd"} <= set(summary["val"]["roc_auc"])
    assert (out / "seed-0" / "model.safetensors").is_file() and (out / "seed-1" / "model.safetensors").is_file()
    a = json.loads((out / "seed-0" / "config.json").read_text())["seed"]
    b = json.loads((out / "seed-1" / "config.json").read_text())["seed"]
    assert (a, b) == (0, 1) and "± " in capsys.readouterr().out


class _Planted:
    """A pickle that would create a marker file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_resume_refuses_a_planted_pickle(small_tree, tmp_path):
    from pneumoscope.cli.main import main
    from pneumoscope.training.resume import load_resume_state, resume_checkpoint

    marker, work = tmp_path / "code-ran", tmp_path / ".run.work"
    (work / "checkpoints").mkdir(parents=True)
    for planted in (work / "checkpoints" / "last.ckpt", work / "last.ckpt"):  # where --resume looks, and where it looked before
        torch.save({"epoch": 0, "state_dict": {}, "payload": _Planted(marker)}, planted)
        with pytest.raises(RuntimeError, match="refused to load"):
            load_resume_state(planted)
        assert resume_checkpoint(work) == planted
        assert main(["-q", "train", str(small_tree), "--out", str(tmp_path / "run"), *COMMON, "--finetune-epochs", "2", "--resume"]) == 2
        assert not marker.exists() and not (tmp_path / "run").exists()
        planted.unlink()  # the earlier layout is read only where the current one has nothing


def test_a_run_killed_before_its_first_checkpoint_starts_afresh(small_tree, tmp_path):
    """Stage 1's logs without a stage-2 checkpoint are nothing to resume: the next plain run goes ahead
    (it used to say "pass --resume", and --resume then said "nothing to resume, start without it")."""
    from pneumoscope.cli.main import main

    work = tmp_path / ".run.work"
    (work / "logs" / "head").mkdir(parents=True)  # what a kill during stage 1 leaves
    assert main(["-q", "train", str(small_tree), "--out", str(tmp_path / "run"), *COMMON, "--finetune-epochs", "1"]) == 0
    assert (tmp_path / "run" / "model.safetensors").is_file() and not work.exists()


def test_a_work_folder_in_use_by_a_running_train_is_never_taken(small_tree, tmp_path, capsys):
    """Two trains into one --out: the second refuses (even with --overwrite or --resume) while the first runs; not after."""
    from pneumoscope.cli.main import main

    work = tmp_path / ".run.work"
    (work / "logs").mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (work / "owner.pid").write_text(str(other.pid))
        for extra in ([], ["--overwrite"], ["--resume"]):
            assert main(["-q", "train", str(small_tree), "--out", str(tmp_path / "run"), *COMMON, "--finetune-epochs", "1", *extra]) == 2
            assert f"still running (process {other.pid})" in capsys.readouterr().err
        assert (work / "logs").is_dir()  # nothing of the running train's was touched
    finally:
        other.kill()
        other.wait()
    assert main(["-q", "train", str(small_tree), "--out", str(tmp_path / "run"), *COMMON, "--finetune-epochs", "1"]) == 0


@pytest.mark.parametrize("layout", ["checkpoints/", "earlier (in the work folder itself)"])
def test_resuming_after_the_last_epoch_finishes_the_run_with_its_whole_history(small_tree, tmp_path, monkeypatch, layout):
    """A kill after stage 2's last epoch (while features are recomputed, or the run written) leaves a checkpoint
    that holds every epoch: --resume fits nothing more and must still write the run and every epoch's history,
    with the best epoch's weights and score restored, wherever the checkpoints were kept."""
    from pneumoscope.cli.main import main
    from pneumoscope.training import pipeline as T

    args = ["-q", "train", str(small_tree), "--out", str(tmp_path / "run"), *COMMON, "--finetune-epochs", "2"]

    def killed(*_, **__):
        raise KeyboardInterrupt  # as far as the work folder is concerned, a kill here

    from pneumoscope.training import resume as R

    with monkeypatch.context() as m:
        m.setattr(T, "_fit_operating_point", killed)
        if layout.startswith("earlier"):  # checkpoints where runs killed before the checkpoints/ folder left them
            m.setattr(R, "CHECKPOINTS", "")
        assert main(args) != 0  # the CLI reports the interruption
    assert R.resume_checkpoint(tmp_path / ".run.work").is_file() and not (tmp_path / "run").exists()
    assert (tmp_path / ".run.work" / "last.ckpt").is_file() == layout.startswith("earlier")
    assert main([*args, "--resume"]) == 0
    history = (tmp_path / "run" / "finetune_history.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == ["1", "2"]
    desc = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert "2 epochs" in desc["training"]["stage"] and desc["training"]["finetune"]["resumed_after_epoch"] == 2
    best = max(float(line.split(",")[3]) for line in history[1:])
    assert desc["training"]["finetune"]["best_val_auc"] == pytest.approx(best)  # the best checkpoint was found, not forgotten


def test_earlier_stage2_log_rows_survive_any_number_of_kills(tmp_path):
    """Attempt 1 logs epochs 1-3 (checkpoint at 2), attempt 2 logs 3-4 (checkpoint at 4) and is killed before
    merging, attempt 3 resumes after the last epoch and logs nothing: the log holds 1-4, each once."""
    from pneumoscope.training.resume import EARLIER_LOG, merge_earlier_log, read_history, set_aside_earlier_log

    logs = tmp_path / "logs"

    def attempt_log(steps):
        (logs / "finetune").mkdir(parents=True, exist_ok=True)
        lines = ["epoch,step,finetune/train_loss,finetune/val_loss,finetune/val_auc"]
        for s in steps:
            lines += [f"{s - 1},{s},0.{s},,", f"{s - 1},{s},,0.{s},0.9{s}"]
        (logs / "finetune" / "metrics.csv").write_text("\n".join(lines) + "\n")

    attempt_log([1, 2, 3])  # killed in epoch 3's validation
    set_aside_earlier_log(logs, completed=2)
    assert not (logs / "finetune").exists() and (logs / EARLIER_LOG).is_file()
    attempt_log([3, 4])  # attempt 2, killed before its merge
    set_aside_earlier_log(logs, completed=4)
    merge_earlier_log(logs)  # attempt 3: no epoch left to fit, no log of its own
    history = read_history(logs / "finetune" / "metrics.csv")
    assert [h["epoch"] for h in history] == [1, 2, 3, 4] and history[2] == {"epoch": 3, "train_loss": 0.3, "val_loss": 0.3, "val_auc": 0.93}
    assert not (logs / EARLIER_LOG).exists()
    merge_earlier_log(logs)  # nothing set aside: nothing changes
    assert [h["epoch"] for h in read_history(logs / "finetune" / "metrics.csv")] == [1, 2, 3, 4]


def _tiny_finetune(tmp_path, **settings):
    """Fine-tune an untrained Lite0 for 2 epochs on 24 random 64-px images; returns (before, after) state dicts."""
    from pneumoscope.training.finetune import ArrayDataset, FinetuneConfig, finetune

    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", pretrained="none", hidden=8)
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (24, 64, 64), dtype=np.uint8), np.arange(24) % 2
    train = ArrayDataset(images[:16], labels[:16], model.preprocessing, None)
    val = ArrayDataset(images[16:], labels[16:], model.preprocessing, None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()  # as stage 1's feature extraction leaves it: fine-tuning must still train in train mode
    config = FinetuneConfig(epochs=2, unfreeze="all", lr=1e-2, batch_size=8, accelerator="cpu", precision="32-true", **settings)
    finetune(model, train, val, config, tmp_path / "work", num_workers=0, progress=False)
    return before, model.state_dict()


def test_regularised_finetuning_freezes_batchnorm_and_averages_weights(tmp_path):
    plain_before, plain = _tiny_finetune(tmp_path / "plain")
    before, after = _tiny_finetune(tmp_path / "reg", freeze_bn=True, ema=0.999999, mixup=0.4)
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)  # BatchNorm statistics never moved
    assert not all(torch.equal(plain_before[k], plain[k]) for k in stats)  # they do without freeze_bn
    # with a decay this close to 1 the average stays where it began: the weights after the first
    # step (AveragedModel starts from a copy), one Adam step of at most the head's lr (10 x 1e-2)
    # from the start, while the plain run walks on for 4 steps
    w = "head.fc1.weight"
    assert (after[w] - before[w]).abs().max() <= 0.1 + 1e-4 and (plain[w] - plain_before[w]).abs().max() > 0.15


def test_regularisation_settings_out_of_range_fail_before_any_work():
    with pytest.raises(ValueError, match="ema"):
        load_train_config(None, {}, ["finetune.epochs=1", "finetune.ema=1.0"])
    with pytest.raises(ValueError, match="mixup"):
        load_train_config(None, {}, ["finetune.epochs=1", "finetune_mixup=-0.1"])
    with pytest.raises(ValueError, match="mixup"):
        load_train_config(None, {}, ["finetune.epochs=1", "finetune_mixup=.nan"])  # NaN < 0 is False: it would reach Beta(nan, nan)
    with pytest.raises(ValueError, match="finetune patience must be at least 1"):
        load_train_config(None, {}, ["finetune.patience=0"])
    for empty in ("finetune.epochs=null", "finetune_patience=", "finetune.ema=~", "epochs=null"):  # a one-line error, not a TypeError
        with pytest.raises(UsageError, match="got null"):
            load_train_config(None, {}, [empty])
    assert load_train_config(None, {}, ["limit=null"]).limit is None  # where "none" is a value, null is it


def test_an_unknown_unfreeze_fails_before_any_work():
    from pneumoscope.training.config import FinetuneConfig, TrainConfig

    with pytest.raises(ValueError, match="unfreeze must be one of"):
        TrainConfig(finetune=FinetuneConfig(epochs=1, unfreeze="some"))
    with pytest.raises(ValueError, match="unfreeze must be one of"):
        load_train_config(None, {"unfreeze": "some"})


def test_a_launched_rank_is_any_process_but_the_first_on_any_node(monkeypatch):
    """Train and stage 2 ask one question: is this a process a launcher started beside the first? torchrun's
    first process on a second node has LOCAL_RANK 0 but RANK and GROUP_RANK above 0: it must not claim the output."""
    from pneumoscope.runtime import is_launched_rank

    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not is_launched_rank()
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "")
    assert not is_launched_rank()
    monkeypatch.setenv("GROUP_RANK", "1")
    assert is_launched_rank()
    monkeypatch.setenv("GROUP_RANK", "0")
    monkeypatch.setenv("NODE_RANK", "2")
    assert is_launched_rank()


@pytest.mark.parametrize("state", [{"state_dict": {}}, {"epoch": "3", "state_dict": {}}, {"epoch": 1}, [1, 2], b"truncated"])
def test_resume_refuses_a_state_it_did_not_write_in_one_line(state, tmp_path):
    """Issue 23 item 10: a resume file without `epoch` ended in a KeyError traceback; a truncated one in torch's."""
    from pneumoscope.errors import StateError
    from pneumoscope.training.resume import load_resume_state

    path = tmp_path / "last.ckpt"
    path.write_bytes(state) if isinstance(state, bytes) else torch.save(state, path)
    with pytest.raises(StateError, match=r"last.ckpt: not a .*--resume"):
        load_resume_state(path)


def test_stage2_loss_and_validation_auc_for_k_classes():
    """K classes: class-weighted cross-entropy over K logits (stage 1's weights), macro one-vs-rest AUC of the softmax."""
    from sklearn.metrics import roc_auc_score

    from pneumoscope.training.config import FinetuneConfig
    from pneumoscope.training.finetune import FineTuner, validation_auc
    from pneumoscope.training.head import class_weights

    y = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 1], dtype=np.float32)
    model = create_model(pretrained="none", class_names=("COVID", "NORMAL", "PNEUMONIA"))
    module = FineTuner(model, FinetuneConfig(epochs=1), class_weights(y, 3), total_steps=1)
    logits = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    want = torch.nn.functional.cross_entropy(
        logits, torch.as_tensor(y).long(), weight=torch.tensor(class_weights(y, 3), dtype=torch.float32)
    )
    assert float(module._loss(logits, torch.as_tensor(y))) == pytest.approx(float(want), rel=1e-6)
    assert float(module._loss(logits, torch.as_tensor(y), weighted=False)) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, torch.as_tensor(y).long())), rel=1e-6
    )
    z = logits.numpy().astype(np.float64)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    assert validation_auc(y.astype(int), z) == pytest.approx(roc_auc_score(y.astype(int), p, multi_class="ovr"), abs=1e-9)
    assert validation_auc(np.array([0, 0, 1, 1]), z[:4]) == 0.5  # a class absent: no AUC yet
    assert validation_auc(np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.2, 0.8])) == 1.0  # one logit, as before


@pytest.mark.slow
def test_a_three_class_task_fine_tunes_over_two_processes_and_resumes(tmp_path):
    """Issue 22: fine-tuning, DDP and resume work for N classes as for two (K logits through all_gather, the
    class weights in the resumed state)."""
    from pneumoscope.cli.main import main
    from pneumoscope.training import pipeline as T
    from tests.conftest import make_three_class_tree

    tree = make_three_class_tree(tmp_path / "cx", n_patients=6)
    run = tmp_path / "run"
    args = ["train", str(tree), "--out", str(run), "--classes", "auto", *COMMON, "--finetune-epochs", "2"]
    proc = subprocess.run(_cli(*args, "--devices", "2"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    desc = json.loads((run / "checkpoint.json").read_text())
    assert desc["head"]["outputs"] == 3 and desc["training"]["finetune"]["world_size"] == 2
    history = list(csv.DictReader(open(run / "finetune_history.csv")))
    assert [h["epoch"] for h in history] == ["1", "2"] and all(0 <= float(h["val_auc"]) <= 1 for h in history)
    assert desc["training"]["finetune"]["best_val_auc"] == pytest.approx(max(float(h["val_auc"]) for h in history))

    again = tmp_path / "again"
    args = ["-q", "train", str(tree), "--out", str(again), "--classes", "auto", *COMMON, "--finetune-epochs", "2"]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(T, "_fit_operating_point", lambda *_, **__: (_ for _ in ()).throw(KeyboardInterrupt))
        assert main(args) != 0  # killed after the last epoch
    assert main([*args, "--resume"]) == 0
    desc = json.loads((again / "checkpoint.json").read_text())
    assert desc["training"]["finetune"]["resumed_after_epoch"] == 2 and desc["head"]["outputs"] == 3
    import pneumoscope

    p = pneumoscope.load(again).predict(next((tree / "test" / "COVID").iterdir()))
    assert list(p.probs) == ["COVID", "NORMAL", "PNEUMONIA"] and sum(p.probs.values()) == pytest.approx(1, abs=1e-6)


def test_last_checkpoint_is_written_after_every_epoch_not_only_a_best_one(small_tree, tmp_path, monkeypatch):
    """Lightning 2.6 writes last.ckpt only at an epoch whose score is a new best: with a flat validation AUC a run
    killed after epoch 3 resumed from epoch 1 and trained epochs 2 and 3 again."""
    from pneumoscope.cli.main import main
    from pneumoscope.training import finetune as F
    from pneumoscope.training import pipeline as T

    monkeypatch.setattr(F, "validation_auc", lambda *_: 0.5)  # never a new best after the first epoch
    monkeypatch.setattr(T, "_fit_operating_point", lambda *_, **__: (_ for _ in ()).throw(KeyboardInterrupt))
    args = ["-q", "train", str(small_tree), "--out", str(tmp_path / "run"), *COMMON, "--finetune-epochs", "3"]
    assert main(args) != 0  # killed after the last epoch
    work = tmp_path / ".run.work" / "checkpoints"
    assert torch.load(work / "last.ckpt", weights_only=True)["epoch"] == 2  # 0-based: the third epoch
    assert torch.load(work / "best.ckpt", weights_only=True)["epoch"] == 0
