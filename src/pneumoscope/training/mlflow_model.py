"""A run as an MLflow model: ``mlflow.pyfunc.load_model(URI).predict(pandas.DataFrame({"path": [...]}))``.

The model answers as ``pneumoscope predict`` and :func:`pneumoscope.load` do (the same
:class:`~pneumoscope.predict.Predictor`): one row per path with the fields of a
:class:`~pneumoscope.predict.Prediction`. It is saved as a model from code
(https://mlflow.org/docs/latest/ml/model/models-from-code/), not as a pickle: MLflow stores
``mlflow_model_code.py`` (which builds :class:`PneumoscopeModel` from the installed pneumoscope)
and the checkpoint (safetensors: tensors and JSON), so loading a logged model unpickles nothing.
Needs mlflow (or mlflow-skinny) and pandas.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from ..inference.prediction import Prediction

CODE = Path(__file__).with_name("mlflow_model_code.py")  # what MLflow stores and runs to build the model

# One row per path; prob, label, ood and ood_distance are empty where the image could not be read (error says why)
# or is not assessable (label: ood_reason says why).
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "path")]),
    outputs=Schema(
        [
            ColSpec("string", "path"),
            ColSpec("double", "prob", required=False),
            ColSpec("string", "label", required=False),
            ColSpec("double", "threshold"),
            ColSpec("boolean", "ood", required=False),
            ColSpec("double", "ood_distance", required=False),
            ColSpec("string", "error"),
            ColSpec("string", "ood_reason"),
        ]
    ),
)
FIELDS = [f.name for f in dataclasses.fields(Prediction)]


class PneumoscopeModel(mlflow.pyfunc.PythonModel):
    """The pyfunc flavour of a run: ``load_context`` loads the checkpoint logged with it, ``predict`` reads the paths."""

    def load_context(self, context) -> None:
        """Load the checkpoint logged with the model."""
        from ..api import load

        self.model_ = load(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """One row of predictions per image path in the input's ``path`` column."""
        if "path" not in model_input:
            raise ValueError(f"the model's input is a DataFrame with a 'path' column (image files), got {list(model_input.columns)}")
        predictions = self.model_.predict([str(p) for p in model_input["path"]])
        return pd.DataFrame([dataclasses.asdict(p) for p in predictions], columns=FIELDS)


def save_mlflow_model(run: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Save the run's checkpoint as an MLflow model in the new folder ``path`` (log it with ``MlflowClient.log_artifacts``)."""
    from .. import __version__
    from ..models.checkpoint import RunFolder

    checkpoint = RunFolder.of(run).checkpoint
    # given, not inferred: MLflow would import the model's packages and may ask an index for their versions
    requirements = [f"pneumoscope=={__version__}", f"mlflow-skinny=={mlflow.__version__}", f"pandas=={pd.__version__}"]
    with _quiet():
        mlflow.pyfunc.save_model(
            str(path), python_model=str(CODE), artifacts={"checkpoint": str(checkpoint)}, signature=SIGNATURE, pip_requirements=requirements
        )
    return Path(path)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Without MLflow's progress bar for copying the checkpoint, and its advice to give an input example: the signature
    is given, and an example would have to be an image file. Both restored after."""
    before = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*An input example was not provided", category=UserWarning)
            yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = before
