"""Predictor: load a checkpoint once, preprocess exactly as in training, predict.

Everything that turns images into probabilities goes through here: the
``predict`` and ``evaluate`` commands and Grad-CAM's input preparation.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_checkpoint
from .data import CLASS_NAMES, Dataset, Record
from .features import extract_features
from .io import ImageReadError, is_image_path, read_image, resize_image

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    path: str
    prob: float | None  # P(PNEUMONIA)
    label: str | None
    threshold: float
    error: str = ""

    def to_dict(self) -> dict:
        return {"path": self.path, "prob": self.prob, "label": self.label, "threshold": self.threshold, "error": self.error}


def expand_inputs(paths: list[str | os.PathLike]) -> list[Path]:
    """Image files named directly, and image files found (recursively) in folders."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and is_image_path(f))
            if not found:
                logger.warning("%s: no image files found", p)
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return out


class Predictor:
    """A loaded model with its threshold and preprocessing contract."""

    def __init__(self, model, description: dict):
        self.model = model.eval()
        self.description = description
        self.threshold = float(description["threshold"])
        self.temperature = float(description.get("temperature", 1.0))
        self.preprocessing = model.preprocessing
        self.class_names = tuple(description.get("class_names", CLASS_NAMES))

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> "Predictor":
        return cls(*load_checkpoint(path))

    def probability(self, logits: torch.Tensor) -> np.ndarray:
        """Calibrated P(PNEUMONIA): temperature-scaled sigmoid of the logit."""
        return torch.sigmoid(logits / self.temperature).numpy()

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(H, W) in [0, 1] -> (1, C, S, S)."""
        return torch.from_numpy(np.ascontiguousarray(self.preprocessing.apply(image)))[None]

    def preprocessing_view(self, image: np.ndarray) -> np.ndarray:
        """The image as the model sees it, before normalisation: (S, S) in [0, 1], for display."""
        return resize_image(image, self.preprocessing.input_size)

    def read(self, path: str | os.PathLike) -> np.ndarray:
        return read_image(path, draft_size=self.preprocessing.input_size)

    def label_of(self, prob: float) -> str:
        return self.class_names[int(prob >= self.threshold)]

    def predict_proba(self, images: list[np.ndarray], *, batch_size: int = 32) -> np.ndarray:
        """P(PNEUMONIA) for decoded (H, W) images."""
        probs = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                x = torch.cat([self.preprocess(im) for im in images[start : start + batch_size]])
                probs.append(self.probability(self.model(x)[:, 0]))
        return np.concatenate(probs) if probs else np.zeros(0)

    def predict_paths(self, paths: list[str | os.PathLike], *, batch_size: int = 32) -> list[Prediction]:
        """One :class:`Prediction` per file; unreadable files carry their error, never raise."""
        results: list[Prediction | None] = [None] * len(paths)
        good, images = [], []
        for i, p in enumerate(paths):
            try:
                images.append(self.read(p))
                good.append(i)
            except ImageReadError as err:
                logger.warning("%s", err)
                results[i] = Prediction(str(p), None, None, self.threshold, f"{err.reason}. {err.fix}")
        for i, prob in zip(good, self.predict_proba(images, batch_size=batch_size)):
            results[i] = Prediction(str(paths[i]), float(prob), self.label_of(prob), self.threshold)
        return results

    def dataset_logits(
        self, dataset: Dataset, records: list[Record] | None = None, *, cache_dir=None, batch_size: int = 32, num_workers: int = 1, progress: bool = True
    ) -> tuple[list[Record], torch.Tensor, list[tuple[str, str]]]:
        """Raw logits for a dataset's records through the feature cache.

        Returns (records that decoded, their logits, (path, reason) for the rest).
        """
        feats = extract_features(
            self.model, dataset, records, cache_dir=cache_dir, batch_size=batch_size, num_workers=num_workers, progress=progress
        )
        with torch.inference_mode():
            logits = self.model.head(torch.as_tensor(feats.features))[:, 0]
        return feats.records, logits, feats.problems

    def predict_dataset(self, dataset: Dataset, records: list[Record] | None = None, **kw) -> tuple[list[Record], np.ndarray, list[tuple[str, str]]]:
        """Like :meth:`dataset_logits`, with calibrated probabilities."""
        kept, logits, problems = self.dataset_logits(dataset, records, **kw)
        return kept, self.probability(logits), problems
