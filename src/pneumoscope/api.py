"""The Python API: ``model = pneumoscope.load(RUN_OR_ONNX)``, ``model.predict(x)``, ``model.explain(x)``.

A thin facade over :class:`~pneumoscope.predict.Predictor`, the one inference path.
It takes what imaging code holds (paths, uint8/uint16/float arrays, PIL images,
pydicom datasets, grayscale or RGB) and converts each exactly once through the
decoder's contract (:func:`pneumoscope.io.to_image`), so ``predict`` gives the
probability ``pneumoscope predict`` gives for the same file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .io import describe_input
from .predict import Prediction, Predictor, input_name


@dataclass(frozen=True)
class CamMap:
    """What ``Model.explain`` returns for one image."""

    prediction: Prediction
    view: np.ndarray  # (S, S) in [0, 1]: the image as the model saw it, before normalisation
    cam: np.ndarray  # (S, S) in [0, 1]: the class activation map over ``view``
    target: str  # the class the map explains
    method: str


class Model:
    """A loaded run or ONNX export. Build it with :func:`load`."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor

    @property
    def threshold(self) -> float:
        return self.predictor.threshold

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.predictor.class_names

    def predict(self, x, *, tta: bool = False) -> Prediction | list[Prediction]:
        """One input -> one :class:`Prediction`; a list (or tuple) -> a list of them.

        Each has the CLI's fields: ``prob`` (calibrated P(PNEUMONIA)), ``label``,
        ``threshold``, ``ood``, ``ood_distance``, ``ood_reason``, ``path`` and ``error``.
        A file that cannot be read gives a record with ``error`` set and no ``prob``;
        an array that breaks the contract raises ``ValueError``.
        """
        items, one = _as_list(x)
        preds = self.predictor.predict_inputs(items, tta=tta)
        return preds[0] if one else preds

    def explain(self, x, *, target: str = "predicted", method: str = "gradcam") -> CamMap | list[CamMap]:
        """Class activation maps (PyTorch runs only): one input -> one :class:`CamMap`; a list -> a list.

        ``target``: "predicted" (default), "pneumonia" or "normal"; ``method``: gradcam,
        gradcam++, hirescam or eigencam. Any input that cannot be read raises.
        """
        from .explain import views_and_cams

        items, one = _as_list(x)
        images = [self.predictor.read_input(item, input_name(item, i)) for i, item in enumerate(items)]
        preds = self.predictor.predict_images(images, [describe_input(item) for item in items])
        views, cams, classes = views_and_cams(self.predictor, images, probs=[p.prob for p in preds], target=target, method=method)
        maps = [CamMap(p, view, cam, self.class_names[c], method) for p, view, cam, c in zip(preds, views, cams, classes)]
        return maps[0] if one else maps


def load(path: str | os.PathLike) -> Model:
    """A run folder or checkpoint (PyTorch), or an ``.onnx`` export (ONNX Runtime; no ``explain``)."""
    return Model(Predictor.load(path))


def _as_list(x) -> tuple[list, bool]:
    """(inputs, whether one input was given): a list or tuple is several inputs, anything else is one."""
    return (list(x), False) if isinstance(x, (list, tuple)) else ([x], True)
