"""Self-describing checkpoints: safetensors weights + a JSON description in its header.

No pickle: loading reads tensors and JSON only, so a checkpoint from a stranger
cannot run code. The description (:class:`~pneumoscope.description.RunDescription`)
holds everything needed to rebuild the model and use it: backbone, head shape,
preprocessing, class names, threshold (and how it was chosen), metrics and package
versions.
"""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save

from .description import CheckpointError, HeadShape, RunDescription
from .errors import MissingFileError
from .models import FeatureAdapter, MahalanobisGuard, PneumoniaClassifier, create_model
from .outputs import write_bytes_atomic

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
    model: PneumoniaClassifier, *, threshold: float, threshold_policy: str, temperature: float = 1.0, metrics: dict | None = None, **sections
) -> RunDescription:
    """The description of ``model`` as trained; ``sections``: training, ood, leakage (see ``RunDescription``)."""
    return RunDescription(
        backbone=model.backbone_name,
        head=HeadShape(model.head.fc1.in_features, model.head.fc1.out_features, model.head.dropout.p),
        preprocessing=model.preprocessing,
        temperature=temperature,
        threshold=threshold,
        threshold_policy=threshold_policy,
        metrics=metrics or {},
        # training feature moments and a sample of training features; fitted to a site by `adapt`
        feature_adapter=None if model.adapter is None else {"reference_sample": int(model.adapter.ref_sample.shape[0])},
        versions=package_versions(),
        **sections,
    )


def save_checkpoint(path: str | os.PathLike, model: PneumoniaClassifier, description: RunDescription) -> Path:
    """Write weights and description to one file, atomically."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / CHECKPOINT_NAME
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_bytes_atomic(path, save(tensors, metadata={"pneumoscope": json.dumps(description.to_dict())}))
    return path


def read_description(path: str | os.PathLike) -> RunDescription:
    path = resolve_checkpoint(path)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if "pneumoscope" not in meta:
        raise CheckpointError(f"{path}: not a pneumoscope checkpoint (no description in its header). Train one with `pneumoscope train`.")
    return RunDescription.from_dict(json.loads(meta["pneumoscope"]), path)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise MissingFileError(f"{path}: no checkpoint here. Give a run folder made by `pneumoscope train` or its {CHECKPOINT_NAME}.")
    return path


def load_checkpoint(path: str | os.PathLike) -> tuple[PneumoniaClassifier, RunDescription]:
    """Rebuild the model from a checkpoint; returns (model in eval mode, description)."""
    from safetensors.torch import load_file

    path = resolve_checkpoint(path)
    description = read_description(path)
    head = description.head
    model = create_model(description.backbone, pretrained="none", hidden=head.hidden, dropout=head.dropout)
    if description.ood:
        model.ood = MahalanobisGuard.empty(head.in_features)
    if description.feature_adapter:
        model.adapter = FeatureAdapter.empty(head.in_features, int(description.feature_adapter["reference_sample"]))
    if description.preprocessing != model.preprocessing:
        model.preprocessing = description.preprocessing
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval(), description


# What a derived run (calibrated, adapted) keeps of the run it came from, beside its own checkpoint.
RUN_CONTEXT_FILES = ("history.png", "history.csv", "data_summary.json", "config.json", "splits.csv", "samples.png")


def save_derived_run(run: str | os.PathLike, out: str | os.PathLike, model: PneumoniaClassifier, description: RunDescription, *,
                     overwrite: bool = False) -> Path:  # fmt: skip
    """A new run folder: this checkpoint and description, plus the source run's training context."""
    import shutil

    from .outputs import atomic_output_dir, write_json

    run_dir = Path(run) if Path(run).is_dir() else Path(run).parent
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        save_checkpoint(tmp, model, description)
        write_json(tmp / "checkpoint.json", description.to_dict())
        for name in RUN_CONTEXT_FILES:
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, tmp / name)
    return Path(out)
