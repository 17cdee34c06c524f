"""Class activation maps through the ``grad-cam`` package, of the class the model decided.

Target: the model has one output, the logit of PNEUMONIA. Explaining PNEUMONIA
follows that logit; explaining NORMAL follows its negative. Taking "class 0" of
a one-output model, as a softmax-style target would, explains PNEUMONIA
whatever was asked (pytorch-grad-cam issues #325 and #428);
``BinaryClassifierOutputTarget`` does the sign flip.
"""

from __future__ import annotations

import logging

import numpy as np
import pytorch_grad_cam
import torch
from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget, ClassifierOutputTarget

from ..choices import CAM_METHOD_CLASSES
from ..errors import UsageError
from ..inference.predictor import Predictor

logger = logging.getLogger(__name__)


CAM_METHODS = {name: getattr(pytorch_grad_cam, cls) for name, cls in CAM_METHOD_CLASSES.items()}


GRADIENT_FREE = {"eigencam"}


def check_method(method: str) -> None:
    """Refuse a CAM method that is not in ``CAM_METHODS``."""
    if method not in CAM_METHODS:
        raise UsageError(f"unknown CAM method {method!r}; choose one of {sorted(CAM_METHODS)}")


def compute_cam(model, x: torch.Tensor, target_classes, method: str = "gradcam") -> np.ndarray:
    """CAMs (B, S, S) in [0, 1]; ``target_classes`` is one class index or one per image (two classes: 1 the logit's
    class, 0 the other, by its negative; N classes: the index of the class's logit).

    The hooks live only inside the ``with``: the model is left as it was.
    """
    check_method(method)
    k = max(2, model.n_outputs)
    targets = [target_classes] * len(x) if isinstance(target_classes, (int, np.integer)) else list(target_classes)
    if len(targets) != len(x) or any(t not in range(k) for t in targets):
        raise ValueError(f"target_class must be a class index in 0..{k - 1} per image, got {target_classes!r}")
    make = BinaryClassifierOutputTarget if model.n_outputs == 1 else ClassifierOutputTarget
    model.eval()
    with CAM_METHODS[method](model=model, target_layers=[model.cam_layer()]) as cam:
        maps = cam(input_tensor=x, targets=[make(int(t)) for t in targets])
    maps = np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0)
    return np.clip(maps, 0.0, 1.0)  # (B, S, S)


def target_classes(predictor: Predictor, probs, target: str = "predicted", class_probs=None) -> list[int]:
    """The class each map explains: the one decided (N classes: the label :meth:`Predictor.class_label` gives, from
    ``class_probs``), or the one named (any case)."""
    if target == "predicted":
        if predictor.multiclass:
            names = predictor.class_names
            return [names.index(predictor.class_label(p, cp)) for p, cp in zip(probs, class_probs, strict=True)]
        return predictor.decide(probs).tolist()
    names = [c.lower() for c in predictor.class_names]
    if target.lower() not in names:
        raise UsageError(f"target must be 'predicted' or one of {names}, got {target!r}")
    return [names.index(target.lower())] * len(probs)


def views_and_cams(
    predictor: Predictor, images: list[np.ndarray], *, probs=None, class_probs=None, target: str = "predicted", method: str = "gradcam"
) -> tuple[list[np.ndarray], np.ndarray, list[int]]:
    """Each decoded image as the model sees it, its CAM over that view, and the class each map explains.

    Returns views (S, S) in [0, 1] (:meth:`Predictor.preprocessing_view`), CAMs (B, S, S) in [0, 1]
    and the classes. The class is the one decided (:meth:`Predictor.decide`: calibrated probability
    at or above the threshold) on ``probs`` (the caller's, computed here when not given), unless
    ``target`` names one; an N-class model decides on ``class_probs`` too (each image's class probabilities, as its
    :class:`Prediction` holds them), computed here in one pass when not given.
    The one path from images to maps; draw them with ``plots.overlay_cam``.
    """
    if predictor.multiclass and (probs is None or class_probs is None):
        logits, _ = predictor.forward(images)
        probs, class_probs = predictor.probability(logits), predictor.class_probabilities(logits)
    elif probs is None:
        probs = predictor.predict_proba(images)
    classes = target_classes(predictor, probs, target, class_probs)
    cams = compute_cam(predictor.model, torch.cat([predictor.preprocess(im) for im in images]), classes, method)
    return [predictor.preprocessing_view(im) for im in images], cams, classes


class ProbabilityTarget:
    """Probability of the explained class: the sigmoid of the one logit (its negative for class 0), or the softmax
    over K logits."""

    def __init__(self, category: int):
        self.category = int(category)
        self.sign = 1.0 if category == 1 else -1.0

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        """The probability (one value, or one a row) of the explained class in the model's output."""
        if output.shape[-1] == 1:
            return torch.sigmoid(self.sign * output[..., 0])
        return torch.softmax(output, dim=-1)[..., self.category]
