"""Self-describing checkpoints: safetensors weights + a JSON description in its header.

No pickle: loading reads tensors and JSON only, so a checkpoint from a stranger
cannot run code. The description holds everything needed to rebuild the model
and use it: backbone, head shape, preprocessing, class names, threshold (and
how it was chosen), metrics and package versions.
"""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save

from .data import CLASS_NAMES
from .errors import MissingFileError, PneumoscopeError
from .outputs import write_bytes_atomic
from .models import RESIZE_METHODS, FeatureAdapter, MahalanobisGuard, PneumoniaClassifier, Preprocessing, create_model

FORMAT = "pneumoscope-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_NAME = "model.safetensors"


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("pneumoscope", "torch", "timm", "numpy", "scikit-learn", "grad-cam", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def describe(
    model: PneumoniaClassifier, *, threshold: float, threshold_policy: str, temperature: float = 1.0, metrics: dict | None = None, extra: dict | None = None
) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backbone": model.backbone_name,
        "head": {"in_features": model.head.fc1.in_features, "hidden": model.head.fc1.out_features, "dropout": model.head.dropout.p},
        "preprocessing": model.preprocessing.to_dict(),
        "class_names": list(model.class_names),
        "positive_class": model.class_names[1],
        "output": "one logit; P(PNEUMONIA) = sigmoid(logit / temperature)",
        "temperature": float(temperature),
        "threshold": float(threshold),
        "threshold_policy": threshold_policy,
        "metrics": metrics or {},
        # training feature moments and a sample of training features; fitted to a site by `adapt`
        "feature_adapter": None if model.adapter is None else {"reference_sample": int(model.adapter.ref_sample.shape[0])},
        "versions": package_versions(),
        **(extra or {}),
    }


def save_checkpoint(path: str | os.PathLike, model: PneumoniaClassifier, description: dict) -> Path:
    """Write weights and description to one file, atomically."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / CHECKPOINT_NAME
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_bytes_atomic(path, save(tensors, metadata={"pneumoscope": json.dumps(description)}))
    return path


def read_description(path: str | os.PathLike) -> dict:
    path = resolve_checkpoint(path)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if "pneumoscope" not in meta:
        raise CheckpointError(f"{path}: not a pneumoscope checkpoint (no description in its header). Train one with `pneumoscope train`.")
    description = json.loads(meta["pneumoscope"])
    if description.get("format") != FORMAT or description.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {description.get('format_version')} is newer than this pneumoscope reads; upgrade pneumoscope.")
    return validate_description(description, path)


class CheckpointError(PneumoscopeError, ValueError):
    """A checkpoint (or ONNX export) whose description cannot be used as it stands."""


# Input sizes a model here can run at: below 16 px a backbone has nothing left to pool;
# above 1,024 px one CPU image costs seconds and a batch gigabytes.
INPUT_SIZE_RANGE = (16, 1024)


def validate_description(description: dict, source: str | os.PathLike) -> dict:
    """Refuse a description that would silently change answers: a temperature <= 0 inverts
    every probability, a threshold outside (0, 1) makes one class impossible, a NaN or
    negative OOD cut-off turns the guard off. Returns the description unchanged."""
    import math

    def number(value, name: str) -> float:
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise CheckpointError(f"{source}: {name} must be a number, got {value!r}. Fix: re-train, re-calibrate or re-export the model.") from None
        if not math.isfinite(x):
            raise CheckpointError(f"{source}: {name} must be finite, got {value!r}. Fix: re-train, re-calibrate or re-export the model.")
        return x

    def refuse(name: str, rule: str, value) -> CheckpointError:
        return CheckpointError(f"{source}: {name} must be {rule}, got {value!r}; the file was edited or damaged. Fix: re-train, re-calibrate or re-export the model.")

    if number(description.get("temperature", 1.0), "temperature") <= 0:
        raise refuse("temperature", "> 0 (a negative one inverts every prediction)", description.get("temperature"))
    threshold = number(description.get("threshold"), "threshold")
    if not 0.0 < threshold < 1.0:
        raise refuse("threshold", "in (0, 1)", threshold)
    if description.get("ood"):
        if number(description["ood"].get("cutoff"), "ood.cutoff") < 0:
            raise refuse("ood.cutoff", ">= 0 (a negative one flags everything; NaN flags nothing)", description["ood"].get("cutoff"))
    pre = description.get("preprocessing")
    if not isinstance(pre, dict):
        raise refuse("preprocessing", "a mapping (input_size, mean, std, in_chans)", pre)
    size = number(pre.get("input_size"), "preprocessing.input_size")
    lo, hi = INPUT_SIZE_RANGE
    if size != int(size) or not lo <= size <= hi:
        raise refuse("preprocessing.input_size", f"an integer in [{lo}, {hi}]", pre.get("input_size"))
    for key in ("mean", "std"):
        values = pre.get(key)
        if not isinstance(values, (list, tuple)) or not values:
            raise refuse(f"preprocessing.{key}", "a list of numbers", values)
        for v in values:
            if key == "std" and number(v, "preprocessing.std") <= 0:
                raise refuse("preprocessing.std", "> 0", values)
            number(v, f"preprocessing.{key}")
    if not isinstance(pre.get("resize", "bilinear-squash"), str) or pre.get("resize", "bilinear-squash") not in RESIZE_METHODS:
        raise refuse("preprocessing.resize", f"one of {list(RESIZE_METHODS)}", pre.get("resize"))
    names = description.get("class_names", list(CLASS_NAMES))
    if list(names) != list(CLASS_NAMES):
        raise refuse("class_names", f"{list(CLASS_NAMES)} (the positive class is index 1)", names)
    return description


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise MissingFileError(f"{path}: no checkpoint here. Give a run folder made by `pneumoscope train` or its {CHECKPOINT_NAME}.")
    return path


def load_checkpoint(path: str | os.PathLike) -> tuple[PneumoniaClassifier, dict]:
    """Rebuild the model from a checkpoint; returns (model in eval mode, description)."""
    from safetensors.torch import load_file

    path = resolve_checkpoint(path)
    description = read_description(path)
    head = description["head"]
    model = create_model(description["backbone"], pretrained="none", hidden=head["hidden"], dropout=head["dropout"])
    if description.get("ood"):
        model.ood = MahalanobisGuard.empty(head["in_features"])
    if description.get("feature_adapter"):
        model.adapter = FeatureAdapter.empty(head["in_features"], int(description["feature_adapter"]["reference_sample"]))
    stored = Preprocessing.from_dict(description["preprocessing"])
    if stored != model.preprocessing:
        model.preprocessing = stored
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval(), description


# What a derived run (calibrated, adapted) keeps of the run it came from, beside its own checkpoint.
RUN_CONTEXT_FILES = ("history.png", "history.csv", "data_summary.json", "config.json", "splits.csv", "samples.png")


def save_derived_run(run: str | os.PathLike, out: str | os.PathLike, model: PneumoniaClassifier, description: dict, *, overwrite: bool = False) -> Path:
    """A new run folder: this checkpoint and description, plus the source run's training context."""
    import shutil

    from .outputs import atomic_output_dir, write_json

    validate_description(description, out)
    run_dir = Path(run) if Path(run).is_dir() else Path(run).parent
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        save_checkpoint(tmp, model, description)
        write_json(tmp / "checkpoint.json", description)
        for name in RUN_CONTEXT_FILES:
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, tmp / name)
    return Path(out)
