"""The code MLflow stores with a logged pneumoscope model and runs to load it (a model from code: no pickle).

Not imported by pneumoscope: ``mlflow_model.save_mlflow_model`` hands this file to MLflow.
"""

import mlflow

from pneumoscope.training.mlflow_model import PneumoscopeModel

mlflow.models.set_model(PneumoscopeModel())
