"""Predictor: load a model once, preprocess exactly as in training, predict.

This is the only inference code: the ``predict``, ``explain`` and ``evaluate``
commands, the web app and the ONNX parity check all go through it. A backend
runs the network (PyTorch, or ONNX Runtime for an exported model); everything
around it (decoding, preprocessing, temperature, threshold, out-of-distribution
flag) is shared.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from ..data.decode import check_decoded, describe_input, read_image, read_many, screen_image, to_image
from ..data.preprocessing import Preprocessing
from ..data.records import Dataset, Record
from ..errors import DataError, UsageError
from ..metrics.classification import calibrated_probability, decide
from ..models.checkpoint import load_checkpoint
from ..models.description import RunDescription
from ..models.features import FeatureResult, extract_features
from .backends import OnnxBackend, TorchBackend
from .inputs import input_name
from .prediction import Prediction, prediction_fields
from .tta import tta_views

logger = logging.getLogger(__name__)


def require_decoded(image) -> np.ndarray:
    """The low-level methods take what the decoder returns: a float (H, W) array in [0, 1].

    A raw uint8 array read as if it were in [0, 1] is normalised to values in the
    hundreds and gives a confident, wrong probability without any error.
    """
    if not isinstance(image, np.ndarray) or image.dtype.kind != "f":
        given = f"a {image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else f"a {type(image).__name__}"
        raise UsageError(
            f"Predictor methods take decoded images, float (H, W) arrays in [0, 1]; got {given}. Convert it with "
            "pneumoscope.io.to_image(x), or call pneumoscope.load(...).predict(x), which accepts uint8, uint16, "
            "PIL images, paths and DICOM datasets."
        )
    return check_decoded(image, f"float array {image.shape}", given=True)


class Predictor:
    """A loaded model with its threshold, temperature and preprocessing contract."""

    def __init__(self, backend, description: RunDescription):
        self.backend = backend
        self.description = description

    @property
    def threshold(self) -> float:
        """The decision threshold on the calibrated probability."""
        return self.description.threshold

    @property
    def temperature(self) -> float:
        """The temperature that calibrates the logits."""
        return self.description.temperature

    @property
    def preprocessing(self) -> Preprocessing:
        """The preprocessing contract the model was trained with."""
        return self.description.preprocessing

    @property
    def class_names(self) -> tuple[str, ...]:
        """The class names, in the order of the model's outputs."""
        return self.description.class_names

    @property
    def ood_cutoff(self) -> float | None:
        """The OOD guard's cut-off distance, or None without a guard."""
        return self.description.ood_cutoff

    @property
    def multiclass(self) -> bool:
        """True for a model of more than two classes (softmax over its classes, a screening decision on top)."""
        return self.description.n_classes > 2

    @property
    def fields(self) -> tuple[str, ...]:
        """The columns of this model's prediction rows (see :func:`prediction_fields`)."""
        return prediction_fields(self.class_names)

    @property
    def model(self):
        """The PyTorch model (Grad-CAM and the feature cache need it)."""
        if not isinstance(self.backend, TorchBackend):
            raise TypeError(f"this predictor runs on {self.backend.name}; Grad-CAM and training need a PyTorch checkpoint")
        return self.backend.model

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> Predictor:
        """A PyTorch predictor from a run folder or its checkpoint."""
        model, description = load_checkpoint(path)
        return cls(TorchBackend(model), description)

    @classmethod
    def from_onnx(cls, path: str | os.PathLike, threads: int | None = None) -> Predictor:
        """An ONNX Runtime predictor from an exported .onnx file."""
        backend = OnnxBackend(path, threads)
        return cls(backend, backend.description)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Predictor:
        """A run folder or checkpoint (PyTorch), or an ``.onnx`` export (ONNX Runtime)."""
        return cls.from_onnx(path) if str(path).endswith(".onnx") else cls.from_checkpoint(path)

    def without_backend(self) -> Predictor:
        """A copy that reads and preprocesses only, for DataLoader worker processes: a backend
        need not pickle (an ONNX Runtime session cannot), and the workers never run it."""
        return Predictor(None, self.description)

    # -- preprocessing: the training contract
    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(H, W) float in [0, 1] -> (1, C, S, S)."""
        x = self.preprocessing.apply(require_decoded(image))
        if x.shape != (self.preprocessing.in_chans, self.preprocessing.input_size, self.preprocessing.input_size):
            raise ValueError(f"preprocessed image has shape {x.shape}, the model's contract is {self.preprocessing}")
        return torch.from_numpy(np.ascontiguousarray(x))[None]

    def preprocessing_view(self, image: np.ndarray) -> np.ndarray:
        """The image as the model sees it, before normalisation: (S, S) in [0, 1], for display."""
        return self.preprocessing.resize_image(require_decoded(image))

    def read(self, path: str | os.PathLike, data: bytes | None = None) -> np.ndarray:
        """The image at ``path`` (or ``data``, its bytes) decoded (H, W) in [0, 1], drafted near the input size."""
        return read_image(path, data, draft_size=self.preprocessing.input_size)

    def read_input(self, x, name: str = "input") -> np.ndarray:
        """A path, array, PIL image or DICOM dataset -> decoded (H, W) in [0, 1] (:func:`pneumoscope.io.to_image`)."""
        return to_image(x, name, draft_size=self.preprocessing.input_size)

    @property
    def normal_index(self) -> int | None:
        """N classes: the index of the class the screening decision is taken against; None for two classes."""
        return self.class_names.index(self.description.normal_class) if self.multiclass else None

    @property
    def prob_of(self) -> str:
        """What ``prob`` is the probability of: the positive class, or (N classes) "not <normal class>"."""
        return f"not {self.description.normal_class}" if self.multiclass else self.class_names[1]

    def load_labelled(self, data: str | os.PathLike) -> Dataset:
        """Labelled data loaded as this run's task (its classes, in order, or the label source it was trained with,
        e.g. ``pneumonia-type``) and checked against them."""
        from ..data.layouts import load_dataset
        from ..data.records import CLASS_NAMES

        labels = (self.description.training or {}).get("labels", "folders")
        if labels != "folders":
            task = {"labels": labels}
        else:
            task = {} if tuple(self.class_names) == tuple(CLASS_NAMES) else {"classes": list(self.class_names)}
        dataset = load_dataset(data, **task)
        self.check_dataset(dataset)
        return dataset

    def check_dataset(self, dataset: Dataset) -> None:
        """Refuse a dataset whose classes are not this checkpoint's classes (before any image is read)."""
        if [c.lower() for c in dataset.class_names] != [c.lower() for c in self.class_names]:
            raise DataError(
                f"{dataset.source}: its classes {list(dataset.class_names)} are not the checkpoint's {list(self.class_names)} "
                "(in this order). Fix: load the data with the run's classes (--classes "
                f"{','.join(self.class_names)}, or the --labels it was trained with)"
            )
        if dataset.unknown_classes:
            raise DataError(
                f"{dataset.source}: has image folders {dataset.unknown_classes} beside the class folders, but the checkpoint knows only "
                f"{list(self.class_names)}. Fix: evaluate a copy without those folders, or relabel them."
            )

    # -- prediction
    def class_probabilities(self, logits) -> np.ndarray:
        """Calibrated probability of each class (n, K): softmax of the logits over the temperature (two classes:
        1 - p and p of the one logit)."""
        z = np.asarray(logits, dtype=np.float64)
        if z.ndim == 1:
            p = calibrated_probability(z, self.temperature)
            return np.column_stack([1.0 - p, p])
        from ..metrics.multiclass import softmax

        return softmax(z, self.temperature)

    def probability(self, logits) -> np.ndarray:
        """Calibrated P(PNEUMONIA): temperature-scaled sigmoid of the logit. N classes: the screening probability
        P(not normal) = 1 - P(normal class) of the softmax."""
        z = np.asarray(logits, dtype=np.float64)
        if z.ndim == 1:
            return calibrated_probability(z, self.temperature)
        return 1.0 - self.class_probabilities(z)[:, self.normal_index]

    def class_label(self, prob: float, class_probs: np.ndarray) -> str:
        """N classes: the normal class when the screening probability is below the threshold, else the most
        probable other class."""
        normal = self.normal_index
        if not self.decide(prob):
            return self.class_names[normal]
        others = np.array(class_probs, dtype=np.float64)
        others[normal] = -np.inf
        return self.class_names[int(others.argmax())]

    def decide(self, probs) -> np.ndarray:
        """The decision rule (:func:`pneumoscope.metrics.decide`) at this model's threshold: 1 (PNEUMONIA) where
        the calibrated probability reaches it, else 0.

        A missing or NaN probability has no label (NaN >= t is False: it would read as NORMAL)."""
        p = np.asarray(probs, dtype=np.float64)
        if not np.isfinite(p).all():
            raise ValueError(
                f"cannot decide on a non-finite probability ({int((~np.isfinite(p)).sum())} of {p.size}); such an image has no label"
            )
        return decide(p, self.threshold)

    def label_of(self, prob: float) -> str:
        """The class name decided for one probability (two classes)."""
        return self.class_names[int(self.decide(prob))]

    def run(self, images: list[np.ndarray], *, batch_size: int = 32, tta: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities and OOD distances (or None) for decoded (H, W) images.

        ``tta``: average the logits over the image and small shifted and zoomed
        copies of it (test-time augmentation); the OOD distance is the original's.
        """
        if not tta:
            logits, dists = self.forward(images, batch_size)
            return self.probability(logits), dists
        logits, dists = self.tta_logits(images, batch_size)
        return self.probability(logits), dists

    def tta_logits(self, images: list[np.ndarray], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits averaged over each image and its :func:`tta_views`; the OOD distance is the original's."""
        views = [v for im in images for v in tta_views(self.preprocessing_view(im))]
        logits, dists = self.forward(views, batch_size)
        k = len(views) // max(1, len(images))  # views per image; the first is the image itself
        mean = logits.reshape(len(images), k, -1).mean(axis=1)
        return (mean[:, 0] if logits.ndim == 1 else mean), (None if dists is None else dists[::k])

    def forward(self, images: list[np.ndarray], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw logits (no temperature) and OOD distances, in batches."""
        logits, dists = [], []
        for start in range(0, len(images), batch_size):
            x = np.concatenate([self.preprocess(im).numpy() for im in images[start : start + batch_size]])
            z, d = self.backend.run(x)
            logits.append(z)
            dists.append(d)
        if not logits:
            return np.zeros(0), None
        return np.concatenate(logits), (None if dists[0] is None else np.concatenate(dists))

    def predict_proba(self, images: list[np.ndarray], *, batch_size: int = 32, tta: bool = False) -> np.ndarray:
        """The calibrated probabilities (:meth:`probability`) of decoded (H, W) images."""
        return self.run(images, batch_size=batch_size, tta=tta)[0]

    def predict_images(self, images: list[np.ndarray], names: list[str], *, batch_size: int = 32, tta: bool = False) -> list[Prediction]:
        """One :class:`Prediction` per decoded (H, W) image, named by ``names``."""
        logits, dists = self.tta_logits(images, batch_size) if tta else self.forward(images, batch_size)
        return self._predictions(names, logits, dists, [screen_image(im) for im in images])

    def predict_batch(self, x: np.ndarray, names: list[str], screened: list[str]) -> list[Prediction]:
        """Predictions for an already preprocessed batch (B, C, S, S), in one forward pass.

        The web app preprocesses each upload as it arrives and stacks those that
        arrive together; the result is the same as :meth:`predict_images` on them.
        ``screened``: :func:`~pneumoscope.io.screen_image` of each decoded image.
        """
        logits, dists = self.backend.run(np.ascontiguousarray(x, dtype=np.float32))
        return self._predictions(names, logits, dists, screened)

    def _predictions(self, names: list[str], logits: np.ndarray, dists: np.ndarray | None, screened: list[str]) -> list[Prediction]:
        probs = self.probability(logits)
        class_probs = self.class_probabilities(logits) if self.multiclass else None
        out = []
        for i, (name, prob, reason) in enumerate(zip(names, probs, screened, strict=True)):
            dist = None if dists is None or not np.isfinite(dists[i]) else float(dists[i])
            if not np.isfinite(prob):
                out.append(
                    Prediction(
                        name,
                        None,
                        None,
                        self.threshold,
                        error="the model's output is not a finite number; no label is given. Check the image and the model file.",
                    )
                )
                continue
            flag = None if dist is None or self.ood_cutoff is None else bool(dist > self.ood_cutoff)
            if not reason and flag:
                reason = (
                    f"unlike the radiographs the model was trained on: out-of-distribution score {dist:.1f} is over "
                    f"the cut-off {self.ood_cutoff:.1f}"
                )
            per_class = None if class_probs is None else dict(zip(self.class_names, map(float, class_probs[i]), strict=True))
            if reason:  # not assessable: no diagnosis, the probability for information only
                out.append(Prediction(name, float(prob), None, self.threshold, True, dist, ood_reason=reason, probs=per_class))
            else:
                label = self.class_label(prob, class_probs[i]) if self.multiclass else self.label_of(prob)
                out.append(Prediction(name, float(prob), label, self.threshold, flag, dist, probs=per_class))
        return out

    def predict_inputs(self, inputs: list, *, batch_size: int = 32, tta: bool = False) -> list[Prediction]:
        """One :class:`Prediction` per input: a path, or an array, PIL image or DICOM dataset (see :func:`pneumoscope.io.to_image`).

        A file that cannot be read carries its error, as ``pneumoscope predict`` reports it,
        and never raises; an in-memory input that breaks the contract (an int32 array, a
        float outside [0, 1], a NaN, a stack of images) raises ``ValueError``: that is a
        bug in the calling code, not a bad file among good ones.
        """
        names = [input_name(x, i) for i, x in enumerate(inputs)]
        decoded = read_many(
            range(len(inputs)),
            lambda i: self.read_input(inputs[i], names[i]),
            name=lambda i: names[i],
            skippable=lambda i: isinstance(inputs[i], (str, os.PathLike)),
            log=logger,
        )
        rows = [describe_input(inputs[i]) for i in decoded.index]  # as a result row names it (an array: without its place)
        predicted = dict(zip(decoded.index, self.predict_images(decoded.images, rows, batch_size=batch_size, tta=tta), strict=True))
        failed = iter(Prediction(name, None, None, self.threshold, error=why) for name, why in decoded.skipped)  # the gaps, in order
        return [predicted[i] if i in predicted else next(failed) for i in range(len(inputs))]

    def dataset_logits(
        self,
        dataset: Dataset,
        records: list[Record] | None = None,
        *,
        cache_dir=None,
        batch_size: int = 32,
        num_workers: int = 1,
        progress: bool = True,
    ) -> tuple[FeatureResult, np.ndarray]:
        """Pooled features (through the feature cache) and raw logits for a dataset's records (PyTorch backend).

        Returns the :class:`~pneumoscope.features.FeatureResult` (records that decoded,
        their features, (path, reason) for the rest) and those records' logits.
        """
        feats = extract_features(
            self.model, dataset, records, cache_dir=cache_dir, batch_size=batch_size, num_workers=num_workers, progress=progress
        )
        with torch.inference_mode():
            logits = self.model.head_logits(feats.features).double().numpy()
        return feats, logits
