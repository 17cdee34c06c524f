"""Self-describing checkpoints: safetensors weights + a JSON description in its header; run folders.

No pickle: loading reads tensors and JSON only, so a checkpoint from a stranger
cannot run code. The description (:class:`~pneumoscope.description.RunDescription`)
holds everything needed to rebuild the model and use it: backbone, head shape,
preprocessing, class names, threshold (and how it was chosen), metrics and package
versions. A SHA-256 of the description and the weights, in the same header, is checked on load
(``verify_digest``; an ONNX export carries the same). :class:`RunFolder` names the files of a run folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save

from ..errors import CheckpointError, MissingFileError
from ..outputs import write_bytes_atomic
from .classifier import FeatureAdapter, MahalanobisGuard, PneumoniaClassifier, create_model
from .description import BINARY_FORMAT_VERSION, FORMAT_VERSION, HeadShape, RunDescription, output_text

CHECKPOINT_NAME = "model.safetensors"

logger = logging.getLogger(__name__)


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages a run depends on, as recorded in its description."""
    out = {"python": platform.python_version()}
    for name in ("pneumoscope", "torch", "timm", "numpy", "scikit-learn", "grad-cam", "safetensors"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def describe(
    model: PneumoniaClassifier,
    *,
    threshold: float,
    threshold_policy: str,
    temperature: float = 1.0,
    metrics: dict | None = None,
    normal_class: str | None = None,
    **sections,
) -> RunDescription:
    """The description of ``model`` as trained; ``normal_class``: N classes only, the screening decision's normal
    class; ``sections``: training, ood, leakage (see ``RunDescription``)."""
    return RunDescription(
        backbone=model.backbone_name,
        head=HeadShape(model.head.fc1.in_features, model.head.fc1.out_features, model.head.dropout.p, model.n_outputs),
        preprocessing=model.preprocessing,
        class_names=model.class_names,
        positive_class=model.class_names[1] if model.n_outputs == 1 else f"not {normal_class}",
        normal_class=normal_class if model.n_outputs > 1 else None,
        output=output_text(model.class_names),
        format_version=BINARY_FORMAT_VERSION if model.n_outputs == 1 else FORMAT_VERSION,
        temperature=temperature,
        threshold=threshold,
        threshold_policy=threshold_policy,
        metrics=metrics or {},
        # training feature moments and a sample of training features; fitted to a site by `adapt`
        feature_adapter=None if model.adapter is None else {"reference_sample": int(model.adapter.ref_sample.shape[0])},
        versions=package_versions(),
        **sections,
    )


SHA256_KEY = "pneumoscope_sha256"  # in the header: every other metadata entry (the description), then the weights
WEIGHTS_SHA256_KEY = "pneumoscope_weights_sha256"  # what versions before SHA256_KEY wrote: the weights only
_LEGACY_KEYS = frozenset({"pneumoscope", WEIGHTS_SHA256_KEY})  # the header entries those versions wrote


def _tensor_bytes(blob: bytes) -> bytes:
    """The data section of a safetensors file (what follows its 8-byte length and JSON header): every tensor's bytes."""
    return blob[8 + int.from_bytes(blob[:8], "little") :]


def compute_digest(entries: dict[str, str], payload: bytes) -> str:
    """SHA-256 of a model file's metadata ``entries`` (each key and value as stored, sorted by key, each prefixed
    with its length so that no two sets of entries hash alike) followed by ``payload`` (the weights)."""
    sha = hashlib.sha256()
    for key in sorted(entries):
        for text in (key, entries[key]):
            data = text.encode("utf-8")
            sha.update(len(data).to_bytes(8, "little"))
            sha.update(data)
    sha.update(payload)
    return sha.hexdigest()


def verify_digest(path: str | os.PathLike, meta: dict[str, str], payload: bytes, *, legacy_keys: frozenset[str], fix: str) -> bool:
    """Check ``meta`` (a model file's metadata: the description) and ``payload`` (its weights) against the SHA-256 stored
    under ``SHA256_KEY``: a flipped bit in a threshold or a weight changes labels without any other sign.

    A file without that key (written by an older version) passes when its keys are ``legacy_keys``, the ones those
    versions wrote; any other key there is a damaged name (maybe the digest's own). Returns whether it was checked.
    """
    expected = meta.get(SHA256_KEY)
    if expected is None:
        unknown = sorted(set(meta) - legacy_keys)
        if unknown:
            raise CheckpointError(
                f"{path}: its metadata has no SHA-256 digest and a key no version of pneumoscope wrote ({unknown[0][:40]!r}): "
                f"the file is damaged or was edited. Fix: copy it again from where it was made, or {fix}."
            )
        return False
    if compute_digest({k: v for k, v in meta.items() if k != SHA256_KEY}, payload) != expected:
        raise CheckpointError(
            f"{path}: its description or weights do not match the SHA-256 digest written with them: the file is damaged "
            f"(a changed byte or bit) or was edited. Fix: copy it again from where it was made, or {fix}."
        )
    return True


def save_checkpoint(path: str | os.PathLike, model: PneumoniaClassifier, description: RunDescription) -> Path:
    """Write weights and description to one file, atomically, with the SHA-256 of both (``compute_digest``) in its header."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = RunFolder(path).checkpoint
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"pneumoscope": json.dumps(description.to_dict())}
    digest = compute_digest(meta, _tensor_bytes(save(tensors, metadata=meta)))  # the data section does not depend on the header
    write_bytes_atomic(path, save(tensors, metadata={**meta, SHA256_KEY: digest}))
    return path


def _header(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if "pneumoscope" not in meta:
        raise CheckpointError(f"{path}: not a pneumoscope checkpoint (no description in its header). Train one with `pneumoscope train`.")
    return meta


def read_description(path: str | os.PathLike) -> RunDescription:
    """The checked description of a checkpoint (or run folder), without loading its weights (nor checking its digest:
    ``load_checkpoint`` does)."""
    path = resolve_checkpoint(path)
    return description_from_json(_header(path)["pneumoscope"], path)


def description_from_json(text: str, path: str | os.PathLike) -> RunDescription:
    """A description stored as JSON (a checkpoint's header, an ONNX export's metadata); damaged JSON is a CheckpointError."""
    try:
        raw = json.loads(text)
    except ValueError as err:
        raise CheckpointError(
            f"{path}: its description is not valid JSON ({err}): the file is damaged. Fix: copy it again from where "
            "it was made, or make it again (`pneumoscope train` or `export`)."
        ) from err
    return RunDescription.from_dict(raw, path)


def verify_weights(path: Path, blob: bytes, meta: dict) -> None:
    """The checkpoint's description and tensors against the digest written with them (``verify_digest``). Files written
    before it carry only the tensors' SHA-256 (``WEIGHTS_SHA256_KEY``), checked alone; older ones none, not checked."""
    if verify_digest(path, meta, _tensor_bytes(blob), legacy_keys=_LEGACY_KEYS, fix="train again"):
        return
    expected = meta.get(WEIGHTS_SHA256_KEY)
    if expected is None:
        logger.debug("%s: no digest (written by an older version); not checked", path)
        return
    if hashlib.sha256(_tensor_bytes(blob)).hexdigest() != expected:
        raise CheckpointError(
            f"{path}: the weights do not match the SHA-256 digest written with them: the file is damaged (a changed "
            "byte or bit). Fix: copy it again from where it was made, or train again."
        )


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint file of ``path`` (a run folder or the file itself), or a MissingFileError."""
    path = Path(path)
    if path.is_dir():
        path = RunFolder(path).checkpoint
    if not path.is_file():
        raise MissingFileError(f"{path}: no checkpoint here. Give a run folder made by `pneumoscope train` or its {CHECKPOINT_NAME}.")
    return path


def load_checkpoint(path: str | os.PathLike) -> tuple[PneumoniaClassifier, RunDescription]:
    """Rebuild the model from a checkpoint; returns (model in eval mode, description)."""
    from safetensors.torch import load

    path = resolve_checkpoint(path)
    meta = _header(path)
    blob = path.read_bytes()
    verify_weights(path, blob, meta)  # before the description is read: a damaged one is named as damage
    description = description_from_json(meta["pneumoscope"], path)
    head = description.head
    model = create_model(
        description.backbone, pretrained="none", hidden=head.hidden, dropout=head.dropout, class_names=description.class_names
    )
    if description.ood:
        model.ood = MahalanobisGuard.empty(head.in_features)
    if description.feature_adapter:
        model.adapter = FeatureAdapter.empty(head.in_features, int(description.feature_adapter["reference_sample"]))
    if description.preprocessing != model.preprocessing:
        model.preprocessing = description.preprocessing
    model.load_state_dict(load(blob), strict=True)  # the bytes that were verified, not a second read
    return model.eval(), description


def _file(name: str, doc: str) -> property:
    return property(lambda self: self.path / name, doc=f"{name}: {doc}")


@dataclass(frozen=True)
class RunFolder:
    """The files of a run folder, by the names ``pneumoscope train`` writes.

    ``RunFolder(path)`` names them (for writing); :meth:`of` finds the run a command was
    given, as a folder or as its checkpoint file.
    """

    path: Path
    checkpoint_name: str = CHECKPOINT_NAME

    # What a derived run (calibrated, adapted) keeps of the run it came from, beside its own checkpoint.
    CONTEXT_FILES = ("history.png", "history.csv", "data_summary.json", "config.json", "splits.csv", "samples.png")

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def of(cls, run: str | os.PathLike) -> RunFolder:
        """The run folder ``run`` names: the folder itself, or the folder of its checkpoint file."""
        run = Path(run)
        if run.is_dir():
            return cls(run)
        if run.is_file():
            return cls(run.parent, run.name)
        raise MissingFileError(
            f"{run}: no run folder or checkpoint here. Give a run folder made by `pneumoscope train` or its {CHECKPOINT_NAME}."
        )

    @property
    def checkpoint(self) -> Path:
        """The checkpoint (model.safetensors, or the file the run was given as)."""
        return self.path / self.checkpoint_name

    checkpoint_json = _file("checkpoint.json", "the checkpoint's description as a file of its own, readable without loading the checkpoint")
    config = _file("config.json", "the resolved training settings")
    metrics = _file("metrics.json", "validation metrics at the chosen threshold")
    history_csv = _file("history.csv", "the head's training history")
    history_png = _file("history.png", "the head's training history, drawn")
    finetune_history = _file("finetune_history.csv", "stage 2's history (fine-tuned runs)")
    splits = _file("splits.csv", "every image: split, label, patient id, content hash, used or skipped")
    skipped = _file("skipped.csv", "images training skipped as unreadable, and why")
    data_summary = _file("data_summary.json", "the training data's summary and leakage check")
    samples = _file("samples.png", "a grid of training images")
    logs = _file("logs", "the training loggers' folder")

    def context_files(self) -> list[Path]:
        """The training context this run holds (``CONTEXT_FILES`` that exist)."""
        return [self.path / name for name in self.CONTEXT_FILES if (self.path / name).is_file()]


def save_derived_run(
    run: str | os.PathLike, out: str | os.PathLike, model: PneumoniaClassifier, description: RunDescription, *, overwrite: bool = False
) -> Path:
    """A new run folder: this checkpoint and description, plus the source run's training context."""
    import shutil

    from ..outputs import atomic_output_dir, write_json

    source = RunFolder.of(run)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        new = RunFolder(tmp)
        save_checkpoint(new.path, model, description)
        write_json(new.checkpoint_json, description.to_dict())
        for path in source.context_files():
            shutil.copy2(path, new.path / path.name)
    return Path(out)
