"""Training logs (issue 14): --logger csv|tensorboard|mlflow for both stages, read back from what each backend wrote.
Experiment tracking that holds the run (issue 20, item 4): the MLflow run holds the run folder's files and its model,
evaluate logs beside it, TensorBoard gets the settings with the final metrics."""

import contextlib
import csv
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscope.cli.main import main
from pneumoscope.cli.parser import build_parser
from pneumoscope.models.classifier import Head
from pneumoscope.training.config import load_train_config
from pneumoscope.training.head import fit_head
from pneumoscope.training.tracking import LOGGERS, describe_logs, training_loggers
from tests.conftest import PROB_ATOL, make_kaggle_tree, synthetic_xray

COMMON = ["--pretrained", "none", "--epochs", "3", "--val-fraction", "0.3", "--accelerator", "cpu", "--workers", "0"]
HEAD_TAGS = {"head/train_loss": "loss", "head/train_accuracy": "accuracy", "head/val_loss": "val_loss", "head/val_accuracy": "val_accuracy"}
FINETUNE_TAGS = {"finetune/train_loss": "train_loss", "finetune/val_loss": "val_loss", "finetune/val_auc": "val_auc"}


@pytest.fixture(autouse=True)
def _own_mlflow_store(monkeypatch):
    """A user's MLflow settings never redirect what these tests write."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory):
    return make_kaggle_tree(tmp_path_factory.mktemp("data") / "data", n_patients=10)


def _history(path) -> list[dict]:
    return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(open(path))]


def _tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(s.step, s.value) for s in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _mlflow_runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("pneumoscope")
    runs = client.search_runs([experiment.experiment_id])
    return client, runs


def _tensorboard_hparams(folder) -> tuple[dict, list[str]]:
    """(the settings, the names of the metrics) that TensorBoard's HPARAMS tab shows for the event log in ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(folder))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in session.hparams.items()}, [m.name.tag for m in experiment.metric_infos]


@contextlib.contextmanager
def _logged_messages(name: str = "pneumoscope"):
    """The messages pneumoscope logs at INFO and above while the block runs (for module-scoped fixtures, which have no caplog)."""

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    messages, handler, lg = [], Keep(logging.INFO), logging.getLogger(name)
    level = lg.level
    lg.addHandler(handler)
    lg.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        lg.removeHandler(handler)
        lg.setLevel(level)


def _assert_logged(logged: dict[str, list[tuple[int, float]]], tags: dict[str, str], history: list[dict]) -> None:
    """Every epoch of ``history`` under each tag, step = epoch, values as the run's own history file has them."""
    for tag, key in tags.items():
        assert [step for step, _ in logged[tag]] == [int(h["epoch"]) for h in history], tag
        np.testing.assert_allclose([v for _, v in logged[tag]], [h[key] for h in history], rtol=1e-6, err_msg=tag)


def _blobs(n: int, seed: int):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    return (rng.standard_normal((n, 8)) + 1.5 * y[:, None]).astype(np.float32), y


@pytest.mark.parametrize("name", list(LOGGERS))
def test_fit_head_logs_every_epoch_through_lightning_loggers(name, tmp_path):
    (xt, yt), (xv, yv) = _blobs(64, 0), _blobs(32, 1)
    with training_loggers(name, tmp_path / "logs", run_name="unit") as logs:
        logs.log_hyperparams({"lr": 1e-2, "augment": {"hflip_p": 0.5}})
        history, _ = fit_head(Head(8, hidden=8), xt, yt, xv, yv, epochs=4, patience=10, lr=1e-2, progress=False, loggers=logs.head)
    rows = list(csv.DictReader(open(tmp_path / "logs" / "head" / "metrics.csv")))
    csv_logged = {tag: [(int(r["step"]), float(r[tag])) for r in rows] for tag in HEAD_TAGS}
    _assert_logged(csv_logged, HEAD_TAGS, history)
    if name == "tensorboard":
        _assert_logged(_tensorboard_scalars(tmp_path / "logs" / "tensorboard"), HEAD_TAGS, history)
    if name == "mlflow":
        client, runs = _mlflow_runs(f"sqlite:///{tmp_path}/logs/mlflow.db")
        (run,) = runs
        assert run.info.status == "FINISHED" and run.info.run_name == "unit"
        assert run.data.params["lr"] == "0.01" and run.data.params["augment/hflip_p"] == "0.5"
        _assert_logged(
            {t: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, t)] for t in HEAD_TAGS}, HEAD_TAGS, history
        )


def test_an_mlflow_run_that_fails_is_marked_failed(tmp_path):
    with pytest.raises(KeyboardInterrupt), training_loggers("mlflow", tmp_path / "logs", run_name="killed") as logs:
        logs.head[1].log_metrics({"head/val_loss": 1.0}, step=1)
        raise KeyboardInterrupt
    _, (run,) = _mlflow_runs(f"sqlite:///{tmp_path}/logs/mlflow.db")
    assert run.info.status == "FAILED"


def test_mlflow_tracking_uri_from_the_environment_is_used(tmp_path, monkeypatch):
    store = tmp_path / "elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    with training_loggers("mlflow", tmp_path / "logs", run_name="env") as logs:
        logs.head[1].log_metrics({"head/val_loss": 0.5}, step=1)
    _, (run,) = _mlflow_runs(f"sqlite:///{store}")
    assert run.data.metrics == {"head/val_loss": 0.5}
    assert not (tmp_path / "logs" / "mlflow.db").exists()


def test_train_logs_both_stages_to_tensorboard(small_tree, tmp_path):
    run = tmp_path / "run"
    assert main(["-q", "train", str(small_tree), "--out", str(run), *COMMON, "--finetune-epochs", "2", "--logger", "tensorboard"]) == 0
    head, finetune = _history(run / "history.csv"), _history(run / "finetune_history.csv")
    assert len(head) == 3 and len(finetune) == 2
    logged = _tensorboard_scalars(run / "logs" / "tensorboard")
    _assert_logged(logged, HEAD_TAGS, head)
    _assert_logged(logged, FINETUNE_TAGS, finetune)
    assert (run / "logs" / "head" / "metrics.csv").is_file() and (run / "logs" / "finetune" / "metrics.csv").is_file()  # the CSV log stays
    assert json.loads((run / "config.json").read_text())["logger"] == "tensorboard"
    assert not (tmp_path / ".run.work").exists()
    # the HPARAMS tab: the settings beside the final metrics, which are the run's own (at step 0, as Lightning logs them)
    hparams, metric_names = _tensorboard_hparams(run / "logs" / "tensorboard")
    assert hparams["epochs"] == 3 and hparams["finetune/epochs"] == 2 and hparams["logger"] == "tensorboard" and hparams["out"] == str(run)
    val, description = json.loads((run / "metrics.json").read_text()), json.loads((run / "checkpoint.json").read_text())
    final = {
        "val/roc_auc": val["roc_auc"],
        "val/sensitivity": val["sensitivity"],
        "val/specificity": val["specificity"],
        "val/threshold": description["threshold"],
        "val/temperature": description["temperature"],
        "head/best_epoch": description["training"]["best_epoch"],
        "head/best_val_loss": head[description["training"]["best_epoch"] - 1]["val_loss"],
        "finetune/best_val_auc": description["training"]["finetune"]["best_val_auc"],
    }
    assert set(final) <= set(metric_names)
    for tag, value in final.items():
        assert logged[tag] == [(0, pytest.approx(value, rel=1e-6))], tag


@pytest.fixture(scope="module")
def mlflow_trained(small_tree, tmp_path_factory):
    """A run trained (both stages) with --logger mlflow, and what train logged while writing it."""
    run = tmp_path_factory.mktemp("mlflow") / "run"
    with pytest.MonkeyPatch.context() as env, _logged_messages() as messages:
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        env.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        assert main(["train", str(small_tree), "--out", str(run), *COMMON, "--finetune-epochs", "2", "--logger", "mlflow"]) == 0
    return run, messages


def _training_run(run):
    """(client, the MLflow run) of a run trained with --logger mlflow, found by the id its description records."""
    record = json.loads((run / "checkpoint.json").read_text())["training"]["mlflow"]
    assert record["store"] == "logs/mlflow.db"
    client, runs = _mlflow_runs(f"sqlite:///{run}/logs/mlflow.db")  # moved with the run: readable where the run is
    (logged_run,) = [r for r in runs if r.info.run_id == record["run_id"]]
    return client, logged_run


def test_train_logs_both_stages_to_one_mlflow_run(mlflow_trained):
    run, _ = mlflow_trained
    client, logged_run = _training_run(run)
    assert logged_run.info.status == "FINISHED" and logged_run.info.run_name == "run"
    assert logged_run.data.params["epochs"] == "3" and logged_run.data.params["finetune/epochs"] == "2"
    history = {t: [(m.step, m.value) for m in client.get_metric_history(logged_run.info.run_id, t)] for t in {**HEAD_TAGS, **FINETUNE_TAGS}}
    _assert_logged(history, HEAD_TAGS, _history(run / "history.csv"))
    _assert_logged(history, FINETUNE_TAGS, _history(run / "finetune_history.csv"))
    # the final metrics are the run's own
    val, description = json.loads((run / "metrics.json").read_text()), json.loads((run / "checkpoint.json").read_text())
    logged = logged_run.data.metrics
    assert logged["val/roc_auc"] == pytest.approx(val["roc_auc"]) and logged["val/specificity"] == pytest.approx(val["specificity"])
    assert logged["val/threshold"] == pytest.approx(description["threshold"])
    assert logged["head/best_epoch"] == description["training"]["best_epoch"]


def test_train_names_the_finished_runs_mlflow_store(mlflow_trained):
    """Not the work folder's, which is gone once the run is written (MLflow had set $MLFLOW_TRACKING_URI to it)."""
    run, messages = mlflow_trained
    assert f"training logs: mlflow ui --backend-store-uri sqlite:///{run}/logs/mlflow.db" in messages
    assert (run / "logs" / "mlflow.db").is_file() and not (run.parent / ".run.work").exists()
    _, logged_run = _training_run(run)
    assert logged_run.info.artifact_uri == (run / "logs" / "mlartifacts").as_uri() + f"/{logged_run.info.run_id}/artifacts"


def test_the_mlflow_run_holds_the_run_folders_files_and_its_model(mlflow_trained):
    run, _ = mlflow_trained
    client, logged_run = _training_run(run)
    run_id = logged_run.info.run_id
    files = sorted(p.name for p in run.iterdir() if p.is_file() and p.name != "model.safetensors")
    assert {"config.json", "checkpoint.json", "history.png", "history.csv", "finetune_history.csv", "splits.csv"} <= set(files)
    assert "samples.png" in files and "skipped.csv" in files
    assert sorted(a.path for a in client.list_artifacts(run_id)) == sorted([*files, "model"])
    held = client.download_artifacts(run_id, "config.json", str(run.parent / "downloaded"))
    assert Path(held).read_bytes() == (run / "config.json").read_bytes()
    model = sorted(a.path for a in client.list_artifacts(run_id, "model"))
    # a model from code: MLflow keeps our loader's code and the safetensors checkpoint, no pickle
    assert "model/MLmodel" in model and "model/mlflow_model_code.py" in model and not any(p.endswith(".pkl") for p in model)
    assert [a.path for a in client.list_artifacts(run_id, "model/artifacts")] == ["model/artifacts/model.safetensors"]


def test_the_logged_mlflow_model_predicts_like_the_run(mlflow_trained, tmp_path, monkeypatch):
    import mlflow
    import pandas as pd

    import pneumoscope

    run, _ = mlflow_trained
    _, logged_run = _training_run(run)
    rng = np.random.default_rng(7)
    paths = []
    for i in range(4):
        paths.append(str(tmp_path / f"x{i}.png"))
        Image.fromarray(synthetic_xray(rng, i % 2)).save(paths[-1])
    paths.append(str(tmp_path / "missing.png"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{run}/logs/mlflow.db")
    model = mlflow.pyfunc.load_model(f"runs:/{logged_run.info.run_id}/model")
    got = model.predict(pd.DataFrame({"path": paths}))
    want = pneumoscope.load(run).predict(paths)
    assert list(got["path"]) == paths
    np.testing.assert_allclose(got["prob"][:4].to_numpy(float), [p.prob for p in want[:4]], rtol=0, atol=PROB_ATOL)
    assert list(got["label"][:4]) == [p.label for p in want[:4]] and list(got["ood"][:4]) == [p.ood for p in want[:4]]
    assert (got["threshold"] == want[0].threshold).all()
    assert pd.isna(got["prob"][4]) and "cannot be read" in got["error"][4] and got["error"][4] == want[4].error


def _evaluate(run, data, out) -> None:
    assert main(["-q", "evaluate", str(run), str(data), "--out", str(out), "--bootstraps", "20", "--no-audit"]) == 0


def test_evaluate_of_a_tracked_run_logs_an_evaluation_run_beside_it(mlflow_trained, small_tree, tmp_path):
    run, _ = mlflow_trained
    client, training = _training_run(run)
    _evaluate(run, small_tree, tmp_path / "eval")
    _, runs = _mlflow_runs(f"sqlite:///{run}/logs/mlflow.db")
    (evaluation,) = [r for r in runs if r.data.tags.get("pneumoscope.training_run_id") == training.info.run_id]
    assert evaluation.info.status == "FINISHED" and evaluation.info.experiment_id == training.info.experiment_id
    assert evaluation.data.tags["mlflow.parentRunId"] == training.info.run_id  # MLflow's UI shows it under the training run
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for key in ("roc_auc", "sensitivity", "specificity", "accuracy", "threshold", "n"):
        assert evaluation.data.metrics[f"test/{key}"] == pytest.approx(m[key]), key
    assert evaluation.data.params["split"] == "test" and evaluation.data.params["run"] == str(run)
    assert {a.path for a in client.list_artifacts(evaluation.info.run_id)} == {"report.html", "metrics.json", "classification_report.txt"}
    held = client.download_artifacts(evaluation.info.run_id, "metrics.json", str(tmp_path / "downloaded"))
    assert Path(held).read_bytes() == (tmp_path / "eval" / "metrics.json").read_bytes()


def test_evaluate_of_a_tracked_run_copied_without_its_store_works_and_warns_once(mlflow_trained, small_tree, tmp_path, caplog):
    run, _ = mlflow_trained
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("logs"))
    with caplog.at_level(logging.WARNING, logger="pneumoscope"):
        _evaluate(copy, small_tree, tmp_path / "eval")
    assert (tmp_path / "eval" / "report.html").is_file() and not (copy / "logs").exists()
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "MLflow" in r.getMessage()]
    assert "this evaluation is not logged to MLflow" in warning and f"{copy / 'logs' / 'mlflow.db'} is not there" in warning
    assert "\n" not in warning


def test_a_moved_run_logs_nothing_where_it_was_trained(mlflow_trained, tmp_path, caplog):
    """Its own store names the artefact folder by the path the run was trained at: MLflow would write into whatever is
    there now (here the original run). Nothing is logged, with one warning; the evaluation itself is written all the same."""
    from pneumoscope.training.tracking import log_evaluation, log_training_run

    run, _ = mlflow_trained
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    record = json.loads((moved / "checkpoint.json").read_text())["training"]["mlflow"]
    _, before = _mlflow_runs(f"sqlite:///{moved}/logs/mlflow.db")
    artefacts = sorted(p.name for p in (run / "logs" / "mlartifacts").iterdir())
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text('{"roc_auc": 0.5}')
    with caplog.at_level(logging.WARNING, logger="pneumoscope"):
        assert log_training_run(moved, record) is False
        assert log_evaluation(moved, record, tmp_path / "eval", {"roc_auc": 0.5}, split="test", params={}) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2 and all("(the run folder was moved since training)" in w for w in warnings)
    assert "not logged to MLflow" in warnings[0] and "this evaluation is not logged to MLflow" in warnings[1]
    assert len(_mlflow_runs(f"sqlite:///{moved}/logs/mlflow.db")[1]) == len(before)
    assert sorted(p.name for p in (run / "logs" / "mlartifacts").iterdir()) == artefacts


def test_evaluating_a_tracked_run_without_mlflow_installed_warns_and_goes_on(tmp_path, monkeypatch, caplog):
    import importlib.util

    from pneumoscope.training.tracking import log_evaluation

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == "mlflow" else real(m, *a))
    with caplog.at_level(logging.WARNING, logger="pneumoscope"):
        assert log_evaluation(tmp_path, {"run_id": "abc", "store": "logs/mlflow.db"}, tmp_path, {}, split="test", params={}) is None
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "trained under MLflow run abc" in warning and "mlflow not installed (Fix: pip install mlflow-skinny" in warning


def test_an_mlflow_run_leaves_the_tracking_uri_as_it_was(tmp_path, monkeypatch):
    """MLflow sets $MLFLOW_TRACKING_URI (and its global URI) to the work folder's store; it must not outlive the training."""
    import mlflow

    work_store = f"sqlite:///{tmp_path}/.run.work/logs/mlflow.db"
    with training_loggers("mlflow", tmp_path / ".run.work" / "logs", run_name="unit") as logs:
        logs.head[1].log_metrics({"head/val_loss": 1.0}, step=1)
    assert "MLFLOW_TRACKING_URI" not in os.environ and mlflow.get_tracking_uri() != work_store
    assert describe_logs("mlflow", tmp_path / "run" / "logs") == f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/run/logs/mlflow.db"
    elsewhere = f"sqlite:///{tmp_path}/elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    with training_loggers("mlflow", tmp_path / ".run.work" / "logs", run_name="unit"):
        pass
    assert os.environ["MLFLOW_TRACKING_URI"] == elsewhere and mlflow.get_tracking_uri() == elsewhere


@pytest.mark.slow
def test_each_seed_logs_to_its_own_runs_store(small_tree, tmp_path):
    """--seeds trains one run after another in one process: each run's MLflow run is in its own logs/mlflow.db."""
    out = tmp_path / "seeds"
    seeds = ["--seeds", "0", "1"]
    assert main(["-q", "train", str(small_tree), "--out", str(out), *COMMON, "--epochs", "2", *seeds, "--logger", "mlflow"]) == 0
    for seed in (0, 1):
        _, (logged_run,) = _mlflow_runs(f"sqlite:///{out}/seed-{seed}/logs/mlflow.db")
        assert logged_run.info.run_name == f"seed-{seed}" and logged_run.data.params["seed"] == str(seed)
        assert json.loads((out / f"seed-{seed}" / "checkpoint.json").read_text())["training"]["mlflow"]["run_id"] == logged_run.info.run_id


def test_csv_is_the_default_and_writes_no_other_logs(small_tree, tmp_path):
    run = tmp_path / "run"
    assert main(["-q", "train", str(small_tree), "--out", str(run), *COMMON]) == 0
    assert sorted(p.name for p in (run / "logs").iterdir()) == ["head"]
    _assert_logged(
        {t: [(int(r["step"]), float(r[t])) for r in csv.DictReader(open(run / "logs" / "head" / "metrics.csv"))] for t in HEAD_TAGS},
        HEAD_TAGS,
        _history(run / "history.csv"),
    )


def test_logger_setting_is_checked_in_the_config_and_the_command_line(tmp_path):
    with pytest.raises(ValueError, match=r"logger must be one of \['csv', 'tensorboard', 'mlflow'\], got 'wandb'"):
        load_train_config(None, {}, ["logger=wandb"])
    config = tmp_path / "c.yaml"
    config.write_text("logger: tensorboard\n")
    assert load_train_config(config).logger == "tensorboard"
    parser = build_parser()
    assert parser.parse_args(["train", "D", "--out", "R", "--logger", "mlflow"]).logger == "mlflow"
    assert parser.parse_args(["demo", "--logger", "tensorboard"]).logger == "tensorboard"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "D", "--out", "R", "--logger", "wandb"])


@pytest.mark.parametrize("name", ["tensorboard", "mlflow"])
def test_a_missing_logger_package_fails_before_any_work_naming_the_pip_command(name, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == LOGGERS[name].modules[0] else real(m, *a))
    # the data does not exist: an error about it would mean work had started before the check
    assert main(["-q", "train", str(tmp_path / "no-such-data"), "--out", str(tmp_path / "run"), "--logger", name]) == 2
    err = capsys.readouterr().err
    assert f"--logger {name} needs {LOGGERS[name].modules[0]}" in err and LOGGERS[name].install in err and "no-such-data" not in err
    assert not (tmp_path / "run").exists()
