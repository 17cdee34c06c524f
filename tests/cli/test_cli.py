"""End to end through the command line on about 100 real images."""

import csv
import io
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscope.cli.main import main
from pneumoscope.models.checkpoint import RunFolder, read_description


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from tests.conftest import train_real_run

    return train_real_run(tmp_path_factory, "e2e", "--limit", "40", "--epochs", "30", "--patience", "5")


def test_train_writes_a_complete_run(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "checkpoint.json",
        "history.csv",
        "history.png",
        "splits.csv",
        "samples.png",
        "metrics.json",
        "skipped.csv",
        "data_summary.json",
    } <= names
    desc = json.loads((trained_run / "checkpoint.json").read_text())
    assert 0 < desc["threshold"] < 1 and "youden" in desc["threshold_policy"]
    run = RunFolder.of(trained_run)  # the names it knows are the names train writes
    assert all(
        p.exists()
        for p in (
            run.checkpoint,
            run.checkpoint_json,
            run.config,
            run.metrics,
            run.history_csv,
            run.history_png,
            run.splits,
            run.skipped,
            run.data_summary,
            run.samples,
            run.logs,
        )
    )
    assert read_description(run.checkpoint).to_dict() == desc  # checkpoint.json is the header's description
    rows = list(csv.DictReader(open(trained_run / "splits.csv")))
    splits_of = {}
    for r in rows:
        splits_of.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits_of.values())
    history = list(csv.DictReader(open(trained_run / "history.csv")))
    assert set(history[0]) == {"epoch", "loss", "accuracy", "val_loss", "val_accuracy"}


def test_existing_run_is_not_overwritten(trained_run, capsys):
    from tests.conftest import CHEST_XRAY

    before = (trained_run / "model.safetensors").read_bytes()
    assert main(["train", str(CHEST_XRAY), "--out", str(trained_run), "--limit", "40"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (trained_run / "model.safetensors").read_bytes() == before


def test_second_training_hits_the_feature_cache(trained_run, tmp_path, caplog):
    from tests.conftest import CHEST_XRAY

    with caplog.at_level(logging.INFO, logger="pneumoscope"):
        assert main(["-q", "train", str(CHEST_XRAY), "--out", str(tmp_path / "again"), "--limit", "40", "--epochs", "3"]) == 0
    assert any("0 to compute" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_evaluate_predict_explain(trained_run, tmp_path, capsys):
    from tests.conftest import CHEST_XRAY

    ev = tmp_path / "eval"
    assert main(["-q", "evaluate", str(trained_run), str(CHEST_XRAY), "--out", str(ev), "--limit", "30"]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    flat = ["n", "n_positive", "threshold", "accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc", "confusion_matrix"]
    assert list(metrics)[: len(flat)] == flat
    added = {"balanced_accuracy", "ppv", "npv", "pr_auc", "brier", "ece", "ci95"}
    assert added <= set(metrics)
    for key in ("sensitivity", "specificity", "ppv", "npv", "accuracy", "balanced_accuracy", "f1", "roc_auc", "pr_auc"):
        lo, hi = metrics["ci95"][key]
        assert lo <= metrics[key] <= hi, key
    assert metrics["n"] == 30 and sum(metrics["confusion_matrix"].values()) == 30
    assert metrics["roc_auc"] > 0.6  # a frozen ImageNet backbone separates the classes even from 80 images
    for name in ("predictions.csv", "classification_report.txt", "confusion_matrix.png", "roc_curve.png"):
        assert (ev / name).is_file()
    preds = list(csv.DictReader(open(ev / "predictions.csv")))
    assert len(preds) == 30 and all(p["patient_id"].startswith("test/") for p in preds)
    capsys.readouterr()

    # issue 20: the count not assessable is what inference would leave without a label (guard from the cached features,
    # screen on the images the audit decoded); the metrics themselves are over every image
    na = metrics["not_assessable"]
    assert set(na) == {"n", "guard", "screen", "note"} and na["note"] == "" and max(na["guard"], na["screen"]) <= na["n"] <= 30
    html = (ev / "report.html").read_text()
    assert html.index("<section class='summary'") < html.index("<nav") and "<th>validation</th>" in html and "Not assessable:" in html
    assert main(["-q", "predict", str(trained_run), *[p["path"] for p in preds], "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sum(row["label"] is None for row in out) == na["n"]
    images = [p["path"] for p in preds[:3]]
    for row, pred in zip(out[:3], preds[:3], strict=True):
        assert abs(row["prob"] - float(pred["prob"])) < 1e-4  # the same model through both paths
        assert row["label"] == pred["pred_label"] or row["label"] is None

    ex = tmp_path / "explain"
    assert main(["-q", "explain", str(trained_run), *images[:2], "--out", str(ex)]) == 0
    printed = capsys.readouterr().out
    assert "too few images to test faithfulness: n=2, need ≥ 5" in printed and "NOT better" not in printed  # no verdict without a p-value
    index = json.loads((ex / "explanations.json").read_text())
    assert len(index["images"]) == 2
    assert len(list((ex / "cams").glob("*.npy"))) == 2
    scores = list(csv.DictReader(open(ex / "scores.csv")))
    assert len(scores) == 2 and all(-1 <= float(s["road_most"]) <= 1 and -1 <= float(s["sanity_spearman"]) <= 1 for s in scores)
    assert index["checks"]["n"] == 2 and index["checks"]["road_vs_random_p"] is None
    from pneumoscope.explain.checks import ChecksSummary
    from tests.conftest import conforms

    conforms(index["checks"], ChecksSummary)
    assert index["checks"]["faithfulness_verdict"] == "too few images to test faithfulness: n=2, need ≥ 5"
    figure = Image.open(ex / index["images"][0]["figure"])
    assert figure.size[0] > figure.size[1] > 100


def test_predict_reports_a_bad_file_and_goes_on(trained_run, tmp_path, capsys):
    from tests.conftest import CHEST_XRAY

    good = tmp_path / "ok.jpeg"
    good.write_bytes(sorted((CHEST_XRAY / "train" / "NORMAL").iterdir())[0].read_bytes())  # a radiograph: assessable (noise is not)
    bad = tmp_path / "bad.jpeg"
    bad.write_bytes(b"")
    assert main(["-q", "predict", str(trained_run), str(tmp_path)]) == 1
    rows = {r["path"]: r for r in csv.DictReader(capsys.readouterr().out.splitlines())}
    assert rows[str(good)]["label"] in ("NORMAL", "PNEUMONIA") and rows[str(bad)]["error"]


def test_explain_exits_1_when_inputs_are_unreadable(trained_run, tmp_path, capsys):
    """Exit codes as for predict: 0 all explained, 1 some inputs unreadable (here all of them), 2 the command failed."""
    (bad := tmp_path / "bad.jpeg").write_bytes(b"not a jpeg")
    (empty := tmp_path / "empty.png").write_bytes(b"")
    assert main(["-q", "explain", str(trained_run), str(bad), str(empty), "--out", str(tmp_path / "ex")]) == 1
    captured = capsys.readouterr()
    assert "0 explanations written" in captured.out and "2 unreadable inputs skipped" in captured.err
    assert len(json.loads((tmp_path / "ex" / "explanations.json").read_text())["skipped"]) == 2


def test_data_inspect_json(kaggle_tree, capsys):
    (kaggle_tree / "train" / "NORMAL" / "IM-7777-0001.jpeg").write_bytes(b"\xff\xd8\xff garbage")
    assert main(["data", "inspect", str(kaggle_tree), "--json"]) == 1  # done, but one input was unreadable
    s = json.loads(capsys.readouterr().out)
    assert s["layout"] == "kaggle" and s["leakage"]["ok"]
    assert [u["path"].endswith("IM-7777-0001.jpeg") for u in s["unreadable"]] == [True]
    assert s["splits"]["test"]["images"] == 16


def test_train_on_synthetic_tree_skips_corrupt_images(kaggle_tree, tmp_path):
    bad = kaggle_tree / "train" / "PNEUMONIA" / "person55_virus_1.jpeg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    run = tmp_path / "run"
    assert main(["-q", "train", str(kaggle_tree), "--out", str(run), "--epochs", "3", "--val-fraction", "0.3", "--pretrained", "none"]) == 1
    skipped = list(csv.DictReader(open(run / "skipped.csv")))
    assert [s["path"] for s in skipped] == [str(bad)]


@pytest.mark.slow
def test_train_on_a_zip_and_an_npz(kaggle_tree, tmp_path):
    import zipfile

    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in kaggle_tree.rglob("*.jpeg"):
            zf.write(f, f.relative_to(kaggle_tree).as_posix())
    common = ["--epochs", "2", "--pretrained", "none", "--val-fraction", "0.3"]
    assert main(["-q", "train", str(archive), "--out", str(tmp_path / "zrun"), *common]) == 0
    from tests.conftest import make_npz

    make_npz(tmp_path / "p.npz")
    run = tmp_path / "nrun"
    assert main(["-q", "train", str(tmp_path / "p.npz"), "--out", str(run), *common]) == 0
    assert main(["-q", "evaluate", str(run), str(tmp_path / "p.npz"), "--out", str(tmp_path / "neval")]) == 0
    assert json.loads((tmp_path / "neval" / "metrics.json").read_text())["n"] == 8


def test_train_without_normal_images_names_the_fix(kaggle_tree, tmp_path, capsys):
    import shutil

    for split in ("train", "val"):
        shutil.rmtree(kaggle_tree / split / "NORMAL")
    assert main(["-q", "train", str(kaggle_tree), "--out", str(tmp_path / "r"), "--pretrained", "none"]) == 2
    assert "no NORMAL images to train on" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_train_evaluate_explain(kaggle_tree, tmp_path, capsys):
    out = tmp_path / "demo"
    assert (
        main(
            ["-q", "demo", "--data", str(kaggle_tree), "--out", str(out), "--epochs", "2", "--pretrained", "none", "--val-fraction", "0.3"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "test: n=16" in printed and str(out) in printed
    assert (out / "run" / "model.safetensors").is_file() and (out / "eval" / "metrics.json").is_file()
    from pneumoscope.explain.checks import MIN_FAITHFULNESS_IMAGES

    explained = json.loads((out / "explain" / "explanations.json").read_text())
    assert len(explained["images"]) >= MIN_FAITHFULNESS_IMAGES and "too few" not in explained["checks"]["faithfulness_verdict"]
    assert {Path(e["path"]).parent.name for e in explained["images"]} == {"NORMAL", "PNEUMONIA"}  # both classes, not the first folder's
    assert len(list((out / "explain").glob("*_gradcam.png"))) == len(explained["images"])


# --------------------------------------------------------------------------- issue 4: calibrate, compare, report, contract


def _real_sample(tmp_path, n_per_class=12):
    """A 'local site' folder of class folders holding real test images (symlinks)."""
    from tests.conftest import CHEST_XRAY

    site = tmp_path / "site"
    for cls in ("NORMAL", "PNEUMONIA"):
        (site / cls).mkdir(parents=True)
        for f in sorted((CHEST_XRAY / "test" / cls).iterdir())[-n_per_class:]:
            (site / cls / f.name).symlink_to(f)
    return site


@pytest.mark.slow
def test_calibrate_writes_a_new_run_and_evaluation_leaves_its_images_out(trained_run, tmp_path, capsys):
    from tests.conftest import CHEST_XRAY

    site = _real_sample(tmp_path)
    new = tmp_path / "calibrated"
    assert main(["-q", "calibrate", str(trained_run), str(site), "--out", str(new), "--target-sensitivity", "0.9"]) == 0
    desc = json.loads((new / "checkpoint.json").read_text())
    old = json.loads((trained_run / "checkpoint.json").read_text())
    assert desc["calibration"]["n"] == 24 and len(desc["calibration"]["image_sha256"]) == 24
    assert desc["calibration"]["previous_threshold"] == old["threshold"]
    assert "local calibration sample" in desc["threshold_policy"] and desc["temperature"] > 0
    capsys.readouterr()
    # the whole test split holds the 24 calibration images: they must be left out
    ev = tmp_path / "ev"
    assert main(["-q", "evaluate", str(new), str(CHEST_XRAY), "--out", str(ev), "--bootstraps", "200", "--no-audit"]) == 0
    m = json.loads((ev / "metrics.json").read_text())
    assert m["n"] == 312 - 24
    preds = {Path(r["path"]).name for r in csv.DictReader(open(ev / "predictions.csv"))}
    assert not preds & {f.name for f in (site / "NORMAL").iterdir()}


def test_calibrate_refuses_a_tiny_sample(trained_run, tmp_path, capsys):
    site = _real_sample(tmp_path, n_per_class=3)
    assert main(["-q", "calibrate", str(trained_run), str(site), "--out", str(tmp_path / "c")]) == 2
    assert "at least 10 distinct images of each class" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_two_runs_on_the_same_images(trained_run, tmp_path, capsys):
    from tests.conftest import CHEST_XRAY

    other = tmp_path / "other"
    assert main(["-q", "train", str(CHEST_XRAY), "--out", str(other), "--limit", "40", "--epochs", "3", "--seed", "1"]) == 0
    for name, run in (("a", trained_run), ("b", other)):
        assert (
            main(["-q", "evaluate", str(run), str(CHEST_XRAY), "--out", str(tmp_path / name), "--limit", "30", "--bootstraps", "100"]) == 0
        )
    capsys.readouterr()
    assert main(["-q", "compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp.json")]) == 0
    assert "DeLong p" in capsys.readouterr().out
    result = json.loads((tmp_path / "cmp.json").read_text())
    assert result["n"] == 30 and 0 <= result["auc_delong"]["p_value"] <= 1
    assert result["mcnemar"]["only_a_correct"] >= 0
    ma = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert result["auc_delong"]["auc_a"] == pytest.approx(ma["roc_auc"], abs=1e-5)


def test_compare_refuses_different_images(tmp_path):
    for name, rows in (("a", [("x.png", "NORMAL")]), ("b", [("y.png", "NORMAL")])):
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "predictions.csv", "w") as fh:
            fh.write("path,patient_id,label,prob,pred\n" + "".join(f"{p},p,{lab},0.1,NORMAL\n" for p, lab in rows))
    assert main(["-q", "compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 2


@pytest.mark.slow
def test_evaluate_single_class_explains_missing_auc(trained_run, tmp_path, capsys):
    site = _real_sample(tmp_path, n_per_class=4)
    import shutil

    shutil.rmtree(site / "NORMAL")
    ev = tmp_path / "ev1"
    assert main(["-q", "evaluate", str(trained_run), str(site), "--out", str(ev), "--bootstraps", "50"]) == 0
    m = json.loads((ev / "metrics.json").read_text())
    assert m["roc_auc"] is None and m["specificity"] is None and m["sensitivity"] is not None
    assert "cannot be computed" in m["note"] and "cannot be computed" in capsys.readouterr().out
    assert "cannot be computed" in (ev / "report.html").read_text()


def test_evaluate_refuses_classes_the_checkpoint_does_not_know(trained_run, tmp_path, capsys):
    site = _real_sample(tmp_path, n_per_class=2)
    (site / "COVID19").mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(site / "COVID19" / "c1.png")
    assert main(["-q", "evaluate", str(trained_run), str(site), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "COVID19" in err and "checkpoint knows only" in err


@pytest.mark.slow
def test_report_is_self_contained(trained_run, tmp_path):
    from tests.conftest import CHEST_XRAY

    ev = tmp_path / "ev"
    assert main(["-q", "evaluate", str(trained_run), str(CHEST_XRAY), "--out", str(ev), "--limit", "40", "--bootstraps", "100"]) == 0
    html = (ev / "report.html").read_text()
    for section in (
        "Data",
        "Training history",
        "Operating point",
        "Metrics (95% intervals)",
        "Subgroups",
        "Shortcut audit",
        "Gallery",
        "Model card",
        "Intended use",
        "Out-of-scope uses",
        "Not a medical device",
    ):
        assert section in html, section
    assert "http://" not in html and "https://" not in html  # nothing to fetch
    assert html.count("data:image/png;base64,") >= 5


def test_threshold_policy_flags_reach_the_training_config():
    from pneumoscope.cli.options import _config, _policy
    from pneumoscope.cli.parser import build_parser

    parser = build_parser()
    args = parser.parse_args(["train", "DATA", "--out", "RUN", "--target-specificity", "0.9"])
    config = _config(args)
    assert (config.threshold_policy, config.threshold_target) == ("specificity", 0.9)
    assert _config(parser.parse_args(["train", "DATA", "--out", "RUN"])).threshold_policy == "youden-smooth"  # the default (issue 20)
    assert _policy(parser.parse_args(["calibrate", "RUN", "DATA", "--out", "NEW", "--target-sensitivity", "0.95"])) == ("sensitivity", 0.95)
    with pytest.raises(SystemExit):  # one policy at a time
        parser.parse_args(["train", "DATA", "--out", "RUN", "--target-sensitivity", "0.9", "--target-specificity", "0.9"])


@pytest.mark.slow
def test_export_log_has_no_third_party_info_and_no_progress_frames(trained_run, tmp_path):
    """Issue 14: `export` printed 78 lines of onnx_ir INFO (logging was configured on the root logger). stderr is a pipe here."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "pneumoscope", "export", str(trained_run), "--out", str(tmp_path / "m.onnx")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr
    records = [line for line in proc.stderr.splitlines() if line.split(" ", 1)[0] in ("DEBUG", "INFO")]
    assert records and all(line.split(" ", 2)[1].startswith("pneumoscope") for line in records), records[:5]
    assert any(line.startswith("INFO pneumoscope.inference.export: exporting") for line in records)  # our own INFO still shows
    assert "exported" not in proc.stderr and "parity with PyTorch" in proc.stdout  # the result once, on stdout (issue 20)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_only_on_a_terminal_and_never_with_q(trained_run, tmp_path, monkeypatch, capsys):
    from tests.conftest import CHEST_XRAY

    image = str(sorted((CHEST_XRAY / "test" / "NORMAL").iterdir())[0])
    explain = ["explain", str(trained_run), image, "--no-checks", "--out"]
    assert main([*explain, str(tmp_path / "piped")]) == 0  # capsys's stderr is not a terminal
    assert "\r" not in capsys.readouterr().err
    for flags, bar in (([], True), (["-q"], False)):
        monkeypatch.setattr(sys, "stderr", terminal := _Terminal())
        assert main([*flags, *explain, str(tmp_path / f"tty{flags}")]) == 0
        assert ("\r" in terminal.getvalue()) is bar, (flags, terminal.getvalue()[-300:])


def test_verbose_shows_other_libraries_info_and_default_does_not(capsys):
    from pneumoscope.runtime import configure_logging

    root_level = logging.getLogger().level
    try:
        for verbose in (False, True):
            configure_logging(verbose=verbose)
            logging.getLogger("onnx_ir.passes").info("deduplicated %d", 1)
            logging.getLogger("pneumoscope.inference.export").info("exported")
            err = capsys.readouterr().err
            assert ("INFO onnx_ir.passes: deduplicated 1" in err) is verbose and err.count(
                "INFO pneumoscope.inference.export: exported"
            ) == 1
    finally:
        configure_logging()
        logging.getLogger().setLevel(root_level)


def test_version_prints_the_package_version(capsys):
    from pneumoscope import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"pneumoscope {__version__}\n"


def test_evaluate_with_tta_skips_an_unreadable_image_and_says_so(trained_run, kaggle_tree, tmp_path, caplog):
    """The TTA path decodes images itself (no feature cache): a bad file is skipped, listed and warned about, as without TTA."""
    import logging

    (kaggle_tree / "test" / "NORMAL" / "IM-9999-0001.jpeg").write_bytes(b"\xff\xd8\xff garbage")
    ev = tmp_path / "ev"
    with caplog.at_level(logging.WARNING, logger="pneumoscope"):
        assert main(["evaluate", str(trained_run), str(kaggle_tree), "--out", str(ev), "--tta", "--no-audit", "--bootstraps", "50"]) == 1
    assert "IM-9999-0001.jpeg" in caplog.text
    assert "IM-9999-0001.jpeg" in (ev / "skipped.csv").read_text()
    na = json.loads((ev / "metrics.json").read_text())["not_assessable"]
    assert na["screen"] is not None and na["guard"] is not None and na["note"] == ""  # TTA decodes every image: both counted


@pytest.mark.parametrize(
    "argv",
    [
        ["predict", "RUN", "x.png", "-q"],
        ["-q", "predict", "RUN", "x.png"],
        ["data", "inspect", "DATA", "--quiet"],
        ["train", "DATA", "--out", "o", "-v"],
        ["-v", "serve", "RUN"],
    ],
)
def test_q_and_v_are_taken_before_the_command_and_after_it(argv):
    """Issue 20: `predict … -q` was refused; only `pneumoscope -q predict …` worked."""
    from pneumoscope.cli.parser import build_parser

    args = build_parser().parse_args(argv)
    assert (args.quiet, args.verbose) == (("-q" in argv or "--quiet" in argv), "-v" in argv)


def test_q_after_the_command_runs_it_quietly_and_q_with_v_is_refused(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "no-run"), "x.png", "-q"]) == 2  # the command ran: its own one-line failure
    err = capsys.readouterr().err
    assert err.startswith("pneumoscope: error: ") and "no-run" in err and "unrecognized" not in err
    with pytest.raises(SystemExit) as done:
        main(["-q", "predict", str(tmp_path / "no-run"), "x.png", "-v"])
    assert done.value.code == 2 and "cannot be used together" in capsys.readouterr().err


def _commands(parser, prog="pneumoscope"):
    """(name, parser) of every command and subcommand."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prog} {name}", sub
                yield from _commands(sub, f"{prog} {name}")


def test_every_argument_of_every_command_has_help_and_every_command_an_example():
    """Issue 20: positional arguments had no help and no command showed an example."""
    import argparse

    from pneumoscope.cli.parser import build_parser

    commands = dict(_commands(build_parser()))
    assert len(commands) >= 14
    for name, parser in commands.items():
        missing = [a.option_strings or a.dest for a in parser._actions if not a.help and not isinstance(a, argparse._SubParsersAction)]
        assert not missing, f"{name}: arguments without help: {missing}"
        text = parser.format_help()
        examples = text.split("examples:\n", 1)[-1].splitlines() if "examples:\n" in text else []
        assert examples and examples[0].startswith(f"  {name}"), f"{name} --help shows no example:\n{text}"


def test_a_command_that_needs_a_subcommand_lists_them(capsys):
    """Issue 20: `pneumoscope data` alone said "the following arguments are required: data_command"."""
    assert main(["data"]) == 2
    err = capsys.readouterr().err
    assert "data_command" not in err and "inspect" in err and "counts, patients, leakage check" in err, err
    assert main([]) == 2
    err = capsys.readouterr().err
    assert all(f"  {name} " in err for name in ("train", "predict", "serve", "data")), err


@pytest.mark.slow
def test_train_and_evaluate_say_each_thing_once_with_numbers_formatted(kaggle_tree, tmp_path, capsys):
    """Issue 20: "run written to X" was printed twice (train printed it and the library logged it), and evaluate
    logged `AUC 0.955818540433925`."""
    import re

    run, ev = tmp_path / "run", tmp_path / "ev"
    assert main(["train", str(kaggle_tree), "--out", str(run), "--epochs", "3", "--pretrained", "none", "--val-fraction", "0.3"]) == 0
    assert main(["evaluate", str(run), str(kaggle_tree), "--out", str(ev), "--bootstraps", "50", "--no-audit"]) == 0
    assert json.loads((ev / "metrics.json").read_text())["seen_in_training"] == 0  # its test images are not its training images
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    assert sum(f"written to {run}" in line for line in lines) == 1, lines
    assert sum(f"written to {ev}" in line for line in lines) == 1, lines
    repeated = [line for line in set(lines) if lines.count(line) > 1]
    assert not repeated, repeated
    long_numbers = [line for line in lines if re.search(r"\d\.\d{6,}", line)]
    assert not long_numbers, long_numbers


def test_evaluate_finds_test_images_byte_identical_to_the_runs_training_images(tmp_path):
    """Issue 23 item 11: evaluate did not warn when the images it scored were ones the run was fitted on."""
    from pneumoscope.data.records import Record
    from pneumoscope.evaluation.evaluate import seen_in_training
    from pneumoscope.models.checkpoint import RunFolder

    (tmp_path / "splits.csv").write_text(
        "path,split,label,patient_id,pneumonia_type,sha256,status\n"
        f"train/NORMAL/a.jpeg,train,NORMAL,a,none,{'a' * 64},used\n"
        f"train/NORMAL/b.jpeg,val,NORMAL,b,none,{'b' * 64},used\n"
        f"train/NORMAL/c.jpeg,train,NORMAL,c,none,{'c' * 64},skipped\n"  # unreadable at training: not fitted on
        f"test/NORMAL/d.jpeg,test,NORMAL,d,none,{'d' * 64},used\n"
    )
    records = [Record(f"test/NORMAL/{h}.jpeg", 0, "test", h, "none", True, content_hash=h * 64) for h in "abcde"]
    assert [r.ref for r in seen_in_training(RunFolder(tmp_path), records)] == ["test/NORMAL/a.jpeg", "test/NORMAL/b.jpeg"]
    assert seen_in_training(RunFolder(tmp_path / "none"), records) == []  # a run without splits.csv (an older one)


def test_compare_of_a_two_class_task_under_other_names_finds_its_positive_class(tmp_path):
    """Every image below the threshold: the most probable one was decided NORMAL, which is not the class prob is of
    (the earlier guess took it as the positive class and inverted the AUC)."""
    from pneumoscope.errors import UsageError
    from pneumoscope.evaluation.compare import compare_evaluations

    rows = [("a.png", "NORMAL", 0.10), ("b.png", "TB", 0.40), ("c.png", "NORMAL", 0.20), ("d.png", "TB", 0.30)]
    for name, shift in (("a", 0.0), ("b", 0.01)):
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "predictions.csv", "w") as fh:
            fh.write("path,patient_id,true_label,prob,pred_label\n")
            fh.writelines(f"{p},{p},{label},{prob + shift:.2f},NORMAL\n" for p, label, prob in rows)
        (tmp_path / name / "metrics.json").write_text(json.dumps({"threshold": 0.5}))
    result = compare_evaluations(tmp_path / "a", tmp_path / "b", n_boot=20)
    assert result["auc_delong"]["auc_a"] == 1.0  # TB is the positive class: its images have the higher probabilities
    (tmp_path / "a" / "metrics.json").unlink()
    with pytest.raises(UsageError, match="cannot be told"):
        compare_evaluations(tmp_path / "a", tmp_path / "b", n_boot=20)
