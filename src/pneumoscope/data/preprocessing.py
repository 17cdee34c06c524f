"""The input contract: how a decoded image becomes a model input, stored in every checkpoint.

Importable without PyTorch (the command line's parser reads the backbone registry, which names a
``Preprocessing`` for each backbone).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import UsageError
from .decode import resize_image

# How an image is brought to ``input_size`` x ``input_size``: what a checkpoint's
# ``preprocessing.resize`` may name -> fn(image (H, W), size) -> (size, size) float32.
RESIZE_METHODS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "bilinear-squash": resize_image,  # aspect ratio not kept, as the Kaggle 224 x 224 copies and Keras' loader
}


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes a model input; stored in every checkpoint.

    Grayscale in [0, 1] -> :meth:`resize_image` to ``input_size`` x ``input_size`` (by the
    method the ``resize`` field names, see ``RESIZE_METHODS``) -> :meth:`normalize`:
    ``(x - mean) / std``, repeated to ``in_chans`` channels. :meth:`apply` is both; the fine-tuning image cache and its dataset call the
    two halves, with uint8 storage and augmentation between them.
    """

    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_chans: int = 3
    resize: str = "bilinear-squash"

    def __post_init__(self):
        if self.input_size < 16:
            raise UsageError(f"input_size must be at least 16, got {self.input_size!r}")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise UsageError(f"mean and std need {self.in_chans} values, got {self.mean!r} and {self.std!r}")
        if self.resize not in RESIZE_METHODS:
            raise UsageError(
                f"resize must be one of {list(RESIZE_METHODS)}, got {self.resize!r}. Fix: use one of those (a newer version may know more)"
            )

    def apply(self, image: np.ndarray) -> np.ndarray:
        """(H, W) float32 in [0, 1] -> (C, S, S) float32, normalised."""
        return self.normalize(self.resize_image(image)[None])  # (1, S, S) -> (C, S, S)

    def resize_image(self, image: np.ndarray) -> np.ndarray:
        """(H, W) float32 in [0, 1] -> (S, S) float32 in [0, 1], by the ``resize`` method.

        (Not named ``resize``: that is the field naming the method, stored in checkpoints.)
        """
        return RESIZE_METHODS[self.resize](image, self.input_size)

    def normalize(self, x):
        """(1 or C, S, S) float32 in [0, 1] -> (C, S, S) float32 ``(x - mean) / std``; numpy in, numpy out, torch in, torch out."""
        if x.ndim != 3 or x.shape[0] not in (1, self.in_chans):
            raise ValueError(f"normalize takes a (1 or {self.in_chans}, S, S) image, got shape {tuple(x.shape)}")
        torch = sys.modules.get("torch")  # a tensor can only come from an imported torch; this module does not import it
        if torch is not None and isinstance(x, torch.Tensor):
            mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]  # (C, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
            return (x.expand(self.in_chans, -1, -1) - mean) / std  # (C, S, S)
        mean = np.asarray(self.mean, np.float32)[:, None, None]  # (C, 1, 1)
        std = np.asarray(self.std, np.float32)[:, None, None]
        return (np.broadcast_to(x, (self.in_chans, *x.shape[1:])) - mean) / std  # (C, S, S)

    def to_dict(self) -> dict:
        """The contract as a plain dict (as the checkpoint stores it)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        """The contract from :meth:`to_dict`'s dict (an older one without ``resize`` squashes)."""
        return cls(int(d["input_size"]), tuple(d["mean"]), tuple(d["std"]), int(d["in_chans"]), d.get("resize", "bilinear-squash"))
