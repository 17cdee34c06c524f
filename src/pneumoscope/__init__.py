"""pneumoscope: chest X-ray PNEUMONIA vs NORMAL classifiers. Research software, not a medical device.

import pneumoscope
model = pneumoscope.load("runs/demo/run")   # a run folder, checkpoint or .onnx export
model.predict("chest.jpeg").prob            # also uint8/uint16/float arrays, PIL images, pydicom datasets, lists
"""

from .errors import PneumoscopeError  # light: no torch, nothing heavy

__version__ = "0.1.0"

__all__ = ["CamMap", "Model", "PneumoscopeError", "Prediction", "__version__", "load"]


def __getattr__(name: str):
    # The API imports torch; importing it lazily keeps `pneumoscope --version` and the CLI's start fast.
    if name in ("CamMap", "Model", "load"):
        from . import api

        return getattr(api, name)
    if name == "Prediction":
        from .inference.prediction import Prediction

        return Prediction
    raise AttributeError(f"module 'pneumoscope' has no attribute {name!r}")
