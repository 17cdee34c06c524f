"""Training logs: Lightning's CSV logger for every run, and TensorBoard or MLflow beside it (``--logger``).

Both stages log through Lightning's logger classes: stage 1 (``train.fit_head``, a plain
loop) calls ``log_metrics(..., step=epoch)`` on them directly; stage 2 hands them to
Lightning's Trainer. Metric names carry the stage: ``head/val_loss``, ``finetune/val_auc``.

While training, logs are written to ``.RUN.work/logs`` beside the run; the finished run
holds them in ``RUN/logs``::

    logs/head/metrics.csv       stage 1, always (hparams.yaml: the training settings)
    logs/finetune/metrics.csv   stage 2, always (read back as finetune_history.csv)
    logs/tensorboard/           --logger tensorboard: both stages in one event log
    logs/mlflow.db              --logger mlflow: one MLflow run for both stages (SQLite store),
                                unless $MLFLOW_TRACKING_URI names another store or server
    logs/mlartifacts/           --logger mlflow with its own store: the MLflow runs' artefacts

At the end of training both TensorBoard and MLflow get the validation metrics at the chosen
operating point (:meth:`TrainingLoggers.log_summary`; TensorBoard's HPARAMS tab shows them beside
the settings). Once the run folder is complete, :func:`log_training_run` logs its files and its
checkpoint, as an MLflow model, to the MLflow run, whose id the run's description keeps
(``training.mlflow``); ``evaluate`` of such a run logs an evaluation run beside it
(:func:`log_evaluation`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import StateError, UsageError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoggerSpec:
    """What a training logger needs installed, and the command that installs it."""

    modules: tuple[str, ...]  # what must be importable
    install: str  # the pip command that installs them


# the CSV log is always written; the others are added beside it
LOGGERS = {
    "csv": LoggerSpec((), ""),
    "tensorboard": LoggerSpec(("tensorboard",), "pip install tensorboard"),
    # mlflow-skinny is the tracking client without the server; SQLAlchemy and Alembic run its local SQLite store;
    # the logged model (mlflow_model) answers with a pandas DataFrame, as MLflow's pyfunc models do
    "mlflow": LoggerSpec(("mlflow", "sqlalchemy", "alembic", "pandas"), "pip install mlflow-skinny sqlalchemy alembic pandas"),
}

MLFLOW_EXPERIMENT = "pneumoscope"  # $MLFLOW_EXPERIMENT_NAME overrides it, as in MLflow itself
# Where a run's MLflow run is, as its description records it (training.mlflow.store): the run folder's own SQLite
# store, or the store $MLFLOW_TRACKING_URI named (the URI itself is not written: it may carry credentials).
OWN_STORE, ENV_STORE = "logs/mlflow.db", "$MLFLOW_TRACKING_URI"
# The evaluation metrics an evaluation run logs, as "<split>/<name>" (those that are numbers)
EVALUATION_METRICS = (
    "n",
    "n_positive",
    "prevalence",
    "threshold",
    "accuracy",
    "balanced_accuracy",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "f1",
    "roc_auc",
    "pr_auc",
    "brier",
    "ece",
)


def check_logger(name: str) -> None:
    """Fail before any work when ``name`` is unknown or its packages are not installed."""
    if name not in LOGGERS:
        raise UsageError(f"logger must be one of {list(LOGGERS)}, got {name!r}")
    spec = LOGGERS[name]
    missing = [m for m in spec.modules if importlib.util.find_spec(m) is None]
    if missing:
        raise StateError(
            f"--logger {name} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed. "
            f"Fix: {spec.install} (or pip install -e '.[{name}]' in a source checkout), or use --logger csv."
        )


def mlflow_tracking_uri(logs_dir: str | os.PathLike) -> str:
    """$MLFLOW_TRACKING_URI when set, else a SQLite store in the run's logs (MLflow's file store is in maintenance mode)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(logs_dir).absolute().as_posix()}/mlflow.db"


def create_logger(name: str, logs_dir: str | os.PathLike, *, run_name: str, final_dir: str | os.PathLike | None = None):
    """The chosen logger besides the CSV log (None for ``csv``), writing under ``logs_dir``.

    ``final_dir``: where ``logs_dir`` ends up once the run is complete (MLflow records its artifact folder there).
    """
    check_logger(name)
    logs_dir = Path(logs_dir)
    if name == "csv":
        return None
    if name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(logs_dir, name="", version="tensorboard", default_hp_metric=False)
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    logs_dir.mkdir(parents=True, exist_ok=True)
    uri, experiment = mlflow_tracking_uri(logs_dir), os.environ.get("MLFLOW_EXPERIMENT_NAME", MLFLOW_EXPERIMENT)
    client = MlflowClient(uri)
    if client.get_experiment_by_name(experiment) is None:  # created here (Lightning would warn that it had to)
        own_store = not os.environ.get("MLFLOW_TRACKING_URI")  # then artifacts, if any, stay with the run
        artifacts = (Path(final_dir or logs_dir).absolute() / "mlartifacts").as_uri() if own_store else None
        client.create_experiment(experiment, artifact_location=artifacts)
    return MLFlowLogger(experiment_name=experiment, run_name=run_name, tracking_uri=uri)


def describe_logs(name: str, logs_dir: str | os.PathLike) -> str:
    """How to open a finished run's logs."""
    logs_dir = Path(logs_dir)
    if name == "tensorboard":
        return f"tensorboard --logdir {logs_dir / 'tensorboard'}"
    if name == "mlflow":
        return f"mlflow ui --backend-store-uri {mlflow_tracking_uri(logs_dir)}"
    return f"{logs_dir / 'head' / 'metrics.csv'} (and finetune/metrics.csv after a fine-tuning stage)"


@dataclass
class TrainingLoggers:
    """The Lightning loggers of both stages, and the MLflow store when there is one."""

    head: list = field(default_factory=list)  # stage 1: its CSV log and the chosen logger
    extra: list = field(default_factory=list)  # the chosen logger, for stage 2 (which keeps its own CSV log)
    mlflow_store: str | None = None  # OWN_STORE or ENV_STORE with --logger mlflow

    def log_hyperparams(self, params: dict) -> None:
        """Log the run's settings to the stage-1 loggers."""
        for lg in self.head:
            lg.log_hyperparams(params)

    def log_summary(self, params: dict, metrics: dict[str, float]) -> None:
        """The run's final metrics beside its settings: TensorBoard's HPARAMS tab, MLflow's metrics (the CSV log has metrics.json)."""
        from lightning.pytorch.loggers import TensorBoardLogger

        for lg in self.extra:
            if isinstance(lg, TensorBoardLogger):
                lg.log_hyperparams(params, metrics)  # the hparams summary names these metrics, logged at step 0
            else:
                lg.log_metrics(metrics)

    def mlflow_run(self) -> dict | None:
        """Where this training's MLflow run is (run_id, experiment_id, store), for the run's description; None without one."""
        from lightning.pytorch.loggers import MLFlowLogger

        for lg in self.extra:
            if isinstance(lg, MLFlowLogger):
                return {"run_id": lg.run_id, "experiment_id": lg.experiment_id, "store": self.mlflow_store}
        return None


@contextlib.contextmanager
def training_loggers(
    name: str, logs_dir: str | os.PathLike, *, run_name: str, final_dir: str | os.PathLike | None = None, enabled: bool = True
) -> Iterator[TrainingLoggers]:
    """The loggers of one training run, finalized on exit ("success", or "failed" when an exception leaves).

    ``enabled`` False (the extra processes of a distributed launch): nothing is logged, nothing created.
    """
    if not enabled:
        yield TrainingLoggers()
        return
    from lightning.pytorch.loggers import CSVLogger

    store = (ENV_STORE if os.environ.get("MLFLOW_TRACKING_URI") else OWN_STORE) if name == "mlflow" else None
    with _tracking_uri_kept(name):
        chosen = create_logger(name, logs_dir, run_name=run_name, final_dir=final_dir)
        extra = [chosen] if chosen else []
        loggers = TrainingLoggers([CSVLogger(logs_dir, name="", version="head"), *extra], extra, store)
        status = "failed"
        try:
            yield loggers
            status = "success"
        finally:
            for lg in loggers.head:
                lg.finalize(status)


@contextlib.contextmanager
def _tracking_uri_kept(name: str) -> Iterator[None]:
    """MLflow's tracking URI as it was before: Lightning's MLFlowLogger sets MLflow's global one, and with it
    $MLFLOW_TRACKING_URI, to the store in the work folder, which is moved into the run and deleted; left set, it
    would name that store to everything after it (the next --seeds run, `mlflow ui` printed, evaluate)."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        yield
    finally:
        if name == "mlflow":
            import mlflow

            mlflow.set_tracking_uri(before)  # None unsets both, as they were


def mlflow_store_uri(run: str | os.PathLike, record: dict) -> str:
    """The tracking URI of the store that holds a run's MLflow run (``record``: its description's ``training.mlflow``).

    Raises StateError, saying why, when that store cannot be reached from here.
    """
    if record.get("store") == OWN_STORE:
        db = Path(run) / OWN_STORE
        if not db.is_file():
            raise StateError(f"the MLflow store {db} is not there (a copy of the run without logs/, or a run derived from it)")
        return mlflow_tracking_uri(db.parent)
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        raise StateError("the training was logged to the MLflow store that $MLFLOW_TRACKING_URI named, and it is not set now")
    return os.environ["MLFLOW_TRACKING_URI"]


def log_training_run(run: str | os.PathLike, record: dict) -> bool:
    """Log a finished run folder to its MLflow run: its files as artefacts, its checkpoint as an MLflow model (``model/``).

    The weights are logged once, as the model's (``model/artifacts/model.safetensors``); every other file of the
    run folder (config.json, checkpoint.json, history.png, ...) at the top of the run's artefacts. A failure is
    logged as a warning: the run folder is complete whatever the tracking store does. Returns whether it was logged.
    """
    from mlflow.exceptions import MlflowException

    run = Path(run)
    try:
        _log_training_run(run, record)
    except (MlflowException, StateError, OSError) as err:
        logger.warning(
            "%s: the run folder's files were not logged to MLflow run %s: %s", run, record.get("run_id"), " ".join(str(err).split())
        )
        return False
    return True


def _log_training_run(run: Path, record: dict) -> None:
    from mlflow.tracking import MlflowClient

    from ..models.checkpoint import RunFolder
    from .mlflow_model import save_mlflow_model

    folder = RunFolder(run)
    client = MlflowClient(mlflow_store_uri(run, record))
    _check_artifacts_here(client, run, record)
    for path in sorted(folder.path.iterdir()):
        if path.is_file() and path.name != folder.checkpoint_name:
            client.log_artifact(record["run_id"], str(path))
    with tempfile.TemporaryDirectory(prefix="pneumoscope-mlflow-") as tmp:
        client.log_artifacts(record["run_id"], str(save_mlflow_model(run, Path(tmp) / "model")), "model")


def _check_artifacts_here(client, run: Path, record: dict) -> None:
    """A run's own store keeps artefacts in the run's logs/mlartifacts at the absolute path the run was trained at: once the
    folder is moved, MLflow would write them there, into whatever is now at that path. Refuse that."""
    if record.get("store") != OWN_STORE:
        return
    uri = client.get_run(record["run_id"]).info.artifact_uri
    parsed = urllib.parse.urlparse(uri)
    here = (run / OWN_STORE).parent.resolve()
    if parsed.scheme != "file" or not Path(urllib.request.url2pathname(parsed.path)).resolve().is_relative_to(here):
        raise StateError(f"the MLflow run keeps its artefacts at {uri}, outside {here} (the run folder was moved since training)")


def log_evaluation(
    run: str | os.PathLike, record: dict, evaluation: str | os.PathLike, metrics: dict, *, split: str, params: dict
) -> str | None:
    """Log an evaluation of a tracked run as a new MLflow run beside its training run, in the same store and experiment.

    The new run is tagged ``mlflow.parentRunId`` (MLflow's UI shows it under the training run) and
    ``pneumoscope.training_run_id`` with the training run's id; it holds the headline metrics as ``<split>/<name>``,
    ``params`` and, as artefacts, ``report.html``, ``metrics.json`` and ``classification_report.txt`` of the
    ``evaluation`` folder. A store that cannot be reached, or a failure, is one warning: the evaluation is
    written all the same. Returns the new MLflow run's id, or None.
    """
    run, evaluation = Path(run), Path(evaluation)
    missing = [m for m in LOGGERS["mlflow"].modules if importlib.util.find_spec(m) is None]
    if missing:
        return _not_logged(run, record, f"{', '.join(missing)} not installed (Fix: {LOGGERS['mlflow'].install})")
    from mlflow.exceptions import MlflowException

    try:
        return _log_evaluation(run, record, evaluation, metrics, split=split, params=params)
    except (MlflowException, StateError, OSError) as err:
        return _not_logged(run, record, err)


def _not_logged(run: Path, record: dict, why) -> None:
    logger.warning(
        "%s was trained under MLflow run %s, but this evaluation is not logged to MLflow: %s",
        run,
        record.get("run_id"),
        " ".join(str(why).split()),
    )


def _log_evaluation(run: Path, record: dict, evaluation: Path, metrics: dict, *, split: str, params: dict) -> str:
    import time

    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    client = MlflowClient(mlflow_store_uri(run, record))
    _check_artifacts_here(client, run, record)  # also: the training run is in this store
    training_id = record["run_id"]
    tags = {MLFLOW_PARENT_RUN_ID: training_id, "pneumoscope.training_run_id": training_id, "pneumoscope.command": "evaluate"}
    created = client.create_run(client.get_run(training_id).info.experiment_id, run_name=f"{evaluation.name} ({split})", tags=tags)
    run_id, status = created.info.run_id, "FAILED"
    try:
        now = int(time.time() * 1000)
        numbers = {f"{split}/{k}": float(metrics[k]) for k in EVALUATION_METRICS if isinstance(metrics.get(k), (int, float))}
        client.log_batch(
            run_id, metrics=[Metric(k, v, now, 0) for k, v in numbers.items()], params=[Param(k, str(v)) for k, v in params.items()]
        )
        for name in ("report.html", "metrics.json", "classification_report.txt"):
            if (evaluation / name).is_file():
                client.log_artifact(run_id, str(evaluation / name))
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
    logger.info("evaluation logged to MLflow run %s (under training run %s)", run_id, training_id)
    return run_id
