"""The input contract: how a decoded image becomes a model input, stored in every checkpoint.

Importable without PyTorch (the command line's parser reads the backbone registry, which names a
``Preprocessing`` for each backbone).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields

import numpy as np

from ..errors import UsageError
from .decode import resize_image

INPUT_SIZE_RANGE = (16, 1024)  # pixels a side; a registered backbone runs at its own size (models.description checks that)


def _rule(name: str, rule: str, value) -> UsageError:
    return UsageError(f"preprocessing.{name} must be {rule}, got {value!r}")


def _number(value, name: str) -> float:
    if isinstance(value, bool):
        raise _rule(name, "a number", value)
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise _rule(name, "a number", value) from None
    if not math.isfinite(x):
        raise _rule(name, "finite", value)
    return x


def check_preprocessing(d: Mapping) -> Preprocessing:
    """The contract from a mapping (a checkpoint's ``preprocessing``): no key it does not know, every value checked by
    :class:`Preprocessing` itself; a :class:`UsageError` names the field, the rule and the value."""
    allowed = tuple(f.name for f in fields(Preprocessing))
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise UsageError(
            f"preprocessing must be a mapping of {list(allowed)} (unknown keys could change how the model runs), got {unknown!r}"
        )
    return Preprocessing(d.get("input_size"), d.get("mean"), d.get("std"), d.get("in_chans"), d.get("resize", "bilinear-squash"))


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
        """Every rule of the contract, checked here and only here (a checkpoint's description is read through
        :func:`check_preprocessing`, which builds one): typed values replace what was given."""
        size = _number(self.input_size, "input_size")
        if size != int(size) or not INPUT_SIZE_RANGE[0] <= size <= INPUT_SIZE_RANGE[1]:
            raise _rule("input_size", f"an integer in [{INPUT_SIZE_RANGE[0]}, {INPUT_SIZE_RANGE[1]}]", self.input_size)
        object.__setattr__(self, "input_size", int(size))
        for key in ("mean", "std"):
            values = getattr(self, key)
            if not isinstance(values, (list, tuple)) or not values:
                raise _rule(key, "a list of numbers", values)
            numbers = tuple(_number(v, key) for v in values)
            if key == "std" and min(numbers) <= 0:
                raise _rule("std", "> 0", values)
            object.__setattr__(self, key, numbers)
        if self.in_chans != 3:  # every registered backbone's first convolution takes 3 channels
            raise _rule("in_chans", "3 (the backbones take three channels)", self.in_chans)
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise _rule("in_chans", f"the number of mean and std values ({len(self.mean)}, {len(self.std)})", self.in_chans)
        if not isinstance(self.resize, str) or self.resize not in RESIZE_METHODS:
            raise _rule("resize", f"one of {list(RESIZE_METHODS)} (a newer version may know more)", self.resize)

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
        return check_preprocessing(d)
