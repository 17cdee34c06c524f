"""Training settings: ``TrainConfig`` (the whole run) with ``FinetuneConfig`` (stage 2) inside it.

Settings come from the defaults here, then a YAML file, then the command line's
flags, then ``--set key=value`` overrides (:func:`load_train_config`). Stage 2's
settings are written nested (``finetune: {lr: 3e-5}``, ``--set finetune.lr=3e-5``)
or, as the flags name them, flat: ``finetune_lr``, ``finetune_epochs``, and the
stage-2 names no run-wide setting has (``unfreeze``, ``augment``, ``devices``...).

No Lightning here: settings are checked before stage 2's engine is imported.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from ..data.augment import resolve_augment
from ..data.bounded import MAX_CONFIG_BYTES, read_text
from ..data.layouts import LABEL_SOURCES
from ..data.records import NORMAL
from ..errors import UsageError
from ..metrics.operating_point import THRESHOLD_POLICIES
from ..models.backbones import DEFAULT_BACKBONE, UNFREEZE
from .tracking import LOGGERS


@dataclass
class FinetuneConfig:
    """Stage 2: fine-tune the backbone (:func:`pneumoscope.finetune.finetune`)."""

    epochs: int = 0  # 0: no fine-tuning (the frozen-backbone model of stage 1)
    unfreeze: str = "top"  # "top": the registry's top layers; "all": the whole backbone
    lr: float = 1e-4  # backbone; the head gets 10x
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.1
    batch_size: int = 32
    patience: int = 3  # epochs without a better validation AUC
    augment: bool | str | dict = True  # true/false, a preset (augment.PRESETS) or AugmentConfig changes
    devices: int | str = 1
    num_nodes: int = 1
    accelerator: str = "auto"
    precision: str = "auto"  # see finetune.auto_precision; or any Lightning precision, e.g. 32-true
    # regularisation against the training site (all off by default)
    ema: float = 0.0  # decay of an exponential moving average of the weights (e.g. 0.999); 0: off
    freeze_bn: bool = False  # every BatchNorm keeps its statistics (eval mode), also in unfrozen layers
    mixup: float = 0.0  # Beta(alpha, alpha) mixup of image pairs and their labels (e.g. 0.2); 0: off

    def __post_init__(self):
        for name in ("epochs", "patience", "batch_size", "num_nodes"):
            if getattr(self, name) < (0 if name == "epochs" else 1):
                raise UsageError(f"finetune {name} must be at least {0 if name == 'epochs' else 1}, got {getattr(self, name)!r}")
        if self.unfreeze not in UNFREEZE:
            raise UsageError(f"unfreeze must be one of {list(UNFREEZE)}, got {self.unfreeze!r}")
        if not 0.0 <= self.ema < 1.0:
            raise UsageError(f"finetune ema (a decay) must be in [0, 1), got {self.ema!r}")
        if not self.mixup >= 0:  # NaN too
            raise UsageError(f"finetune mixup (a Beta alpha) must be >= 0, got {self.mixup!r}")
        resolve_augment(self.augment)  # a typo fails before any work


@dataclass
class TrainConfig:
    """Every training setting: defaults here, then --config YAML, then flags, then --set."""

    backbone: str = DEFAULT_BACKBONE
    pretrained: str = "imagenet"
    weights: str | None = None
    epochs: int = 100
    patience: int = 10
    seed: int = 0
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    hidden: int = 256
    dropout: float = 0.3
    val_fraction: float = 0.1
    limit: int | None = None
    # youden-smooth on cross-fitted heads: the operating point that moved least with the seed (BENCHMARKS.md, "Operating point")
    threshold_policy: str = "youden-smooth"  # or "youden", or "sensitivity" / "specificity" with threshold_target
    threshold_target: float | None = None
    # > 1: cross-fitted heads. Train and validation patients are cut into this many folds; a head is fitted on each
    # fold's complement (early stopping on the fold) and the shipped head averages them; temperature and threshold
    # are fitted on every image's out-of-fold logit, not on the one validation split.
    head_folds: int = 5
    ood_quantile: float = 0.99
    feature_batch_size: int = 32
    num_workers: int = 1  # image decoding processes, both stages
    cache_dir: str | None = None
    logger: str = "csv"  # training logs besides the CSV log: a name in tracking.LOGGERS
    # the task: None for NORMAL vs PNEUMONIA; "auto" for every class folder, sorted; or class names in order
    classes: str | list[str] | None = None
    labels: str = "folders"  # or "pneumonia-type": NORMAL / BACTERIA / VIRUS from Kermany's file names
    normal_class: str = NORMAL  # N > 2 classes: the class the screening decision (normal vs not) is taken against
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # stage 2 (0 epochs: the frozen-backbone model of stage 1)

    def __post_init__(self):
        if isinstance(self.finetune, dict):
            self.finetune = FinetuneConfig(**self.finetune)
        if not 0 <= self.seed <= 2**32 - 1:  # NumPy's and PyTorch's generators take no other
            raise UsageError(f"seed must be from 0 to 2**32 - 1 (4,294,967,295), got {self.seed!r}")
        for name in ("epochs", "patience", "batch_size", "hidden", "feature_batch_size", "head_folds"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.labels not in LABEL_SOURCES:
            raise UsageError(f"labels must be one of {list(LABEL_SOURCES)}, got {self.labels!r}")
        if not isinstance(self.normal_class, str) or not self.normal_class:
            raise UsageError(f"normal_class must name a class, got {self.normal_class!r}")
        if self.logger not in LOGGERS:
            raise UsageError(f"logger must be one of {list(LOGGERS)}, got {self.logger!r}")
        if self.head_folds > 1 and self.finetune.epochs:  # the folds' out-of-fold logits would be stale once the backbone changes
            self.head_folds = 1
        if self.threshold_policy not in THRESHOLD_POLICIES:
            raise UsageError(f"threshold_policy must be one of {list(THRESHOLD_POLICIES)}, got {self.threshold_policy!r}")
        if self.threshold_policy in ("sensitivity", "specificity") and not (
            self.threshold_target is not None and 0 < self.threshold_target < 1
        ):
            raise UsageError(f"threshold_policy {self.threshold_policy!r} needs threshold_target in (0, 1), got {self.threshold_target!r}")


_RUN_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "finetune"}
_STAGE2_FIELDS = {f.name: f for f in dataclasses.fields(FinetuneConfig)}


def setting_name(key: str) -> tuple[str, str] | None:
    """Where a setting's name points: ("run", field) or ("finetune", field); None if nowhere.

    ``finetune.lr`` and ``finetune_lr`` are stage 2's ``lr``; a bare name is the run's
    field if it has one (``lr`` is the head's), else stage 2's (``unfreeze``)."""
    key = key.strip().replace("-", "_")
    for prefix in ("finetune.", "finetune_"):
        if key.startswith(prefix) and key[len(prefix) :] in _STAGE2_FIELDS:
            return "finetune", key[len(prefix) :]
    if key in _RUN_FIELDS:
        return "run", key
    if key in _STAGE2_FIELDS:
        return "finetune", key
    return None


def load_train_config(path: str | os.PathLike | None, flags: dict | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """TrainConfig from defaults, then a YAML file, then explicit flags, then ``key=value`` overrides."""
    import yaml

    items: list[tuple[str, object]] = []
    if path:
        loaded = _read_yaml(path) or {}
        if not isinstance(loaded, dict):
            raise UsageError(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
        for key, value in loaded.items():
            if key == "finetune" and isinstance(value, dict):  # nested, as config.json writes it
                items += [(f"finetune.{k}", v) for k, v in value.items()]
            else:
                items.append((str(key), value))
    items += list((flags or {}).items())
    for item in overrides or []:
        if "=" not in item:
            raise UsageError(f"--set takes KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            items.append((key, yaml.safe_load(raw)))  # YAML typing: 3e-5, true, null, [0.9, 1.1]
        except yaml.YAMLError as err:
            raise UsageError(
                f"--set {item}: the value is not plain YAML ({' '.join(str(err).split())[:200]}). Fix: e.g. --set lr=3e-4"
            ) from err
    run, stage2, unknown = {}, {}, []
    for key, value in items:
        where = setting_name(key)
        if where is None:
            unknown.append(key)
            continue
        scope, name = where
        fields = _RUN_FIELDS if scope == "run" else _STAGE2_FIELDS
        (run if scope == "run" else stage2)[name] = _coerce(key, str(fields[name].type), value)
    if unknown:
        raise UsageError(
            f"unknown training settings {sorted(unknown)}; known: {sorted(_RUN_FIELDS)} and stage 2's "
            f"{sorted('finetune.' + k for k in _STAGE2_FIELDS)}"
        )
    return TrainConfig(**run, finetune=FinetuneConfig(**stage2))


def _read_yaml(path: str | os.PathLike):
    """A config file's settings; a file that is not plain YAML (a syntax error, binary bytes, a Python tag) is one UsageError."""
    import yaml

    try:
        text = read_text(path, MAX_CONFIG_BYTES, pipes=True)  # a pipe, as from `--config <(envsubst < c.yaml)`, too
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not a text file ({err.reason} at byte {err.start}). Fix: give a YAML file of settings") from err
    except ValueError as err:
        raise UsageError(f"{path}: {err}. Fix: give a YAML file of settings") from err
    except OSError as err:
        raise UsageError(f"{path}: cannot be read ({err.strerror}). Fix: check the path of --config") from err
    try:
        return yaml.safe_load(text)  # safe: a tag such as !!python/object is refused, never run
    except yaml.YAMLError as err:
        raise UsageError(
            f"{path}: not plain YAML ({' '.join(str(err).split())[:300]}). Fix: write settings as `name: value` lines (no Python tags)"
        ) from err


def _coerce(key: str, annotation: str, value):
    """Numbers written as YAML 1.1 strings ('3e-5') become the field's type; anything else must fit it: a numeric
    setting takes a finite number, not a list, a mapping, a NaN or an infinity."""
    value = _as_declared(key, annotation, value)
    kinds = set(annotation.split(" | "))
    if kinds and kinds <= {"int", "float", "None"} and value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UsageError(f"setting {key} must be a finite number ({annotation}), got {value!r}")
        if "float" not in kinds and value != int(value):
            raise UsageError(f"setting {key} must be a whole number, got {value!r}")
        return int(value) if "float" not in kinds else value
    return value


def _as_declared(key: str, annotation: str, value):
    if value is None and "None" not in annotation.split(" | "):
        raise UsageError(f"setting {key} must be {annotation}, got null (an empty value)")
    if value is None or isinstance(value, bool) or not isinstance(value, str):
        return value
    for kind in (int, float):
        if kind.__name__ in annotation.split(" | "):
            try:
                return kind(value)
            except ValueError:
                continue
    if "str" in annotation.split(" | "):
        return value
    raise UsageError(f"setting {key} must be {annotation}, got {value!r}")
