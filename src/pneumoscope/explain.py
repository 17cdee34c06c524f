"""Grad-CAM through the ``grad-cam`` package, with the target that fits our head.

The model has one output, the logit of PNEUMONIA. Explaining PNEUMONIA follows
the gradient of that logit; explaining NORMAL follows its negative (the logit of
NORMAL relative to PNEUMONIA). Taking "class 0" of a one-output model, as a
softmax-style target would, explains PNEUMONIA whatever was asked: see
pytorch-grad-cam issues #325 and #428. ``BinaryClassifierOutputTarget`` does the
sign flip.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

from .io import ImageReadError
from .outputs import atomic_output_dir, write_json
from .plots import overlay_cam, plot_cam
from .predict import Predictor, expand_inputs

logger = logging.getLogger(__name__)


def compute_gradcam(model, x: torch.Tensor, target_class: int) -> np.ndarray:
    """Grad-CAM maps (B, S, S) in [0, 1] for ``target_class`` (1 PNEUMONIA, 0 NORMAL).

    The hooks live only inside the ``with``: the model is left as it was.
    """
    if target_class not in (0, 1):
        raise ValueError(f"target_class must be 0 (NORMAL) or 1 (PNEUMONIA), got {target_class!r}")
    model.eval()
    with GradCAM(model=model, target_layers=[model.cam_layer()]) as cam:
        maps = cam(input_tensor=x, targets=[BinaryClassifierOutputTarget(target_class)] * len(x))
    return np.asarray(maps, dtype=np.float32)  # (B, S, S)


@dataclass(frozen=True)
class Explanation:
    path: str
    prob: float
    label: str
    target: str
    figure: str


def explain_images(predictor: Predictor, paths: list[str | os.PathLike], out: str | os.PathLike, *, target: str = "predicted", overwrite: bool = False) -> list[Explanation]:
    """The ``pneumoscope explain`` command: one side-by-side PNG per image, and an index."""
    files = expand_inputs(paths)
    results, skipped = [], []
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        for i, path in enumerate(files):
            try:
                image = predictor.read(path)
            except ImageReadError as err:
                logger.warning("%s", err)
                skipped.append({"path": str(path), "reason": f"{err.reason}. {err.fix}"})
                continue
            x = predictor.preprocess(image)
            prob = float(predictor.predict_proba([image])[0])
            label = predictor.label_of(prob)
            cls = predictor.class_names.index(label) if target == "predicted" else predictor.class_names.index(target.upper())
            cam = compute_gradcam(predictor.model, x, cls)[0]
            shown = predictor.preprocessing_view(image)
            name = f"{i:04d}_{Path(path).stem}_gradcam.png"
            title = f"{Path(path).name}: P(pneumonia) = {prob:.3f} -> {label} (threshold {predictor.threshold:.3f}); CAM for {predictor.class_names[cls]}"
            plot_cam(shown, overlay_cam(shown, cam), tmp / name, title=title)
            results.append(Explanation(str(path), prob, label, predictor.class_names[cls], name))
        write_json(tmp / "explanations.json", {"method": "gradcam", "layer": predictor.model.cam_layer_name,
                                               "images": [e.__dict__ for e in results], "skipped": skipped})  # fmt: skip
    return results
