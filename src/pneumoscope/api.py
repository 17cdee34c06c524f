"""The Python API: ``model = pneumoscope.load(RUN_OR_ONNX)``, ``model.predict(x)``, ``model.explain(x)``.

A thin facade over :class:`~pneumoscope.predict.Predictor`, the one inference path.
It takes what imaging code holds (paths, uint8/uint16/float arrays, PIL images,
pydicom datasets, grayscale or RGB) and converts each exactly once through the
decoder's contract (:func:`pneumoscope.io.to_image`), so ``predict`` gives the
probability ``pneumoscope predict`` gives for the same file.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

import numpy as np

from .data.decode import describe_input
from .errors import MissingFileError, UsageError
from .inference.inputs import input_name
from .inference.prediction import Prediction
from .inference.predictor import Predictor


@dataclass(frozen=True)
class CamMap:
    """What :meth:`Model.explain` returns for one image: the prediction, the image as the model saw it, and its map.

    In a notebook a CamMap shows itself as its overlay (``_repr_png_``); its ``repr`` names
    the class, the method, the shape and the prediction, not the arrays.

    Attributes:
        prediction: the :class:`~pneumoscope.Prediction` for the image.
        view: (S, S) float in [0, 1]: the image as the model saw it (resized, before normalisation).
        cam: (S, S) float in [0, 1]: the class activation map over ``view``.
        target: the class the map explains ("NORMAL" or "PNEUMONIA").
        method: the CAM method ("gradcam", "gradcam++", "hirescam" or "eigencam").
    """

    prediction: Prediction
    view: np.ndarray = field(repr=False)
    cam: np.ndarray = field(repr=False)
    target: str
    method: str

    @property
    def shape(self) -> tuple[int, int]:
        """(S, S): the size of ``view`` and ``cam``, the model's input size."""
        return tuple(self.cam.shape)

    def __repr__(self) -> str:
        p = self.prediction
        prob = "None" if p.prob is None else f"{p.prob:.4f}"
        return (
            f"CamMap(target={self.target!r}, method={self.method!r}, shape={self.shape}, "
            f"prediction=(path={p.path!r}, prob={prob}, label={p.label!r}))"
        )

    def overlay(self, alpha: float = 0.45):
        """The map as a heatmap over the view, as the web page and ``pneumoscope explain`` draw it.

        Args:
            alpha: opacity of the heatmap, from 0 (the view alone) to 1 (the heatmap alone).

        Returns:
            A PIL RGB image of shape S x S.

        Raises:
            ValueError: ``alpha`` outside [0, 1].
        """
        from PIL import Image

        from .plots import overlay_cam

        if not 0.0 <= alpha <= 1.0:
            raise UsageError(f"alpha must be in [0, 1], got {alpha!r}. Fix: 0.45 draws as the web page does")
        rgb = overlay_cam(self.view, self.cam, alpha=alpha)  # (S, S, 3) in [0, 1]
        return Image.fromarray(np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8), "RGB")

    def _repr_png_(self) -> bytes:
        """The overlay as PNG bytes: what Jupyter shows for a CamMap."""
        buf = io.BytesIO()
        self.overlay().save(buf, format="PNG")
        return buf.getvalue()


class Model:
    """A loaded run or ONNX export: its threshold, classes and input contract, and ``predict``/``explain``.

    Build it with :func:`load`. Its ``repr`` names the backbone, backend, classes, threshold,
    input size and the file it was loaded from.

    Args:
        predictor: the :class:`~pneumoscope.predict.Predictor` underneath.
        source: where it was loaded from (for its ``repr``).
    """

    def __init__(self, predictor: Predictor, source: str | os.PathLike | None = None):
        self.predictor = predictor
        self.source = None if source is None else str(source)

    def __repr__(self) -> str:
        d = self.predictor.description
        where = f", source={self.source!r}" if self.source else ""
        return (
            f"Model(backbone={d.backbone!r}, backend={self.predictor.backend.name!r}, classes={self.class_names}, "
            f"threshold={self.threshold:.4f}, input_size={self.input_size}{where})"
        )

    @property
    def threshold(self) -> float:
        """The operating point: a label is PNEUMONIA where the calibrated probability is at or above it."""
        return self.predictor.threshold

    @property
    def class_names(self) -> tuple[str, ...]:
        """The classes, negative first: ("NORMAL", "PNEUMONIA")."""
        return self.predictor.class_names

    @property
    def input_size(self) -> int:
        """The side in pixels of the square image the network takes (every input is resized to it)."""
        return self.predictor.preprocessing.input_size

    def predict(self, x, *, tta: bool = False) -> Prediction | list[Prediction]:
        """The model's answer for one input, or for each of a list.

        Args:
            x: one input, or a list (or tuple) of them: a path, a PIL image, a pydicom ``Dataset``,
                or a NumPy array (uint8, uint16, or float in [0, 1]; (H, W) or (H, W, 3|4)).
            tta: average over the image and four shifted or zoomed copies of it.

        Returns:
            One :class:`~pneumoscope.Prediction` for one input; a list, in order, for a list. Each has the
            CLI's fields: ``prob`` (calibrated P(PNEUMONIA)), ``label``, ``threshold``, ``ood``,
            ``ood_distance``, ``ood_reason``, ``path`` and ``error``. In a list, a file that cannot be read
            (missing ones included) gives a record with ``error`` set and no ``prob``, and the rest are predicted.

        Raises:
            FileNotFoundError: ``x`` is one path that does not exist (a :class:`~pneumoscope.PneumoscopeError`).
            ValueError: an in-memory input breaks the contract (a float outside [0, 1], a NaN, an int32 array, ...).
        """
        items, one = _as_list(x)
        if one:
            _require_exists(items)
        preds = self.predictor.predict_inputs(items, tta=tta)
        return preds[0] if one else preds

    def explain(self, x, *, target: str = "predicted", method: str = "gradcam") -> CamMap | list[CamMap]:
        """Class activation maps (PyTorch runs only, not an ONNX export).

        Args:
            x: one input or a list of them, as for :meth:`predict`.
            target: the class to explain: "predicted" (the one decided at the threshold), "pneumonia" or "normal".
            method: "gradcam", "gradcam++", "hirescam" or "eigencam".

        Returns:
            One :class:`CamMap` for one input; a list, in order, for a list.

        Raises:
            FileNotFoundError: a path that does not exist.
            ValueError: an input that cannot be read or breaks the contract, or an unknown ``target``/``method``.
            TypeError: the model is an ONNX export.
        """
        from .explain.cams import views_and_cams

        items, one = _as_list(x)
        _require_exists(items)
        images = [self.predictor.read_input(item, input_name(item, i)) for i, item in enumerate(items)]
        preds = self.predictor.predict_images(images, [describe_input(item) for item in items])
        known = [list(p.probs.values()) for p in preds] if self.predictor.multiclass else None  # N classes: computed above
        views, cams, classes = views_and_cams(
            self.predictor, images, probs=[p.prob for p in preds], class_probs=known, target=target, method=method
        )
        maps = [CamMap(p, view, cam, self.class_names[c], method) for p, view, cam, c in zip(preds, views, cams, classes, strict=True)]
        return maps[0] if one else maps


def load(path: str | os.PathLike) -> Model:
    """Load a model once, to predict and explain with it.

    Args:
        path: a run folder or its ``model.safetensors`` (PyTorch), or an ``.onnx`` export
            (ONNX Runtime: ``predict`` only, no ``explain``).

    Returns:
        A :class:`Model`.

    Raises:
        PneumoscopeError: the path is missing, or the file is damaged or not a pneumoscope model
            (also a ``FileNotFoundError`` or ``ValueError`` as the case is).
    """
    return Model(Predictor.load(path), source=path)


def _as_list(x) -> tuple[list, bool]:
    """(inputs, whether one input was given): a list or tuple is several inputs, anything else is one."""
    return (list(x), False) if isinstance(x, (list, tuple)) else ([x], True)


def _require_exists(items: list) -> None:
    """Raise :class:`MissingFileError` for the first path among ``items`` that does not exist."""
    for item in items:
        if isinstance(item, (str, os.PathLike)) and not os.path.lexists(item):
            raise MissingFileError(f"{os.fspath(item)}: no such file. Fix: check the path (relative paths start at {os.getcwd()})")
