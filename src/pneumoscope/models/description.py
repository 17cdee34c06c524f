"""What a run says about itself: :class:`RunDescription`, the JSON description of a checkpoint.

The same description sits in the checkpoint's header, in the run's ``checkpoint.json`` and
in an ONNX export's metadata. :meth:`RunDescription.from_dict` reads it and
:meth:`RunDescription.to_dict` gives back the JSON it was read from: same keys, same
values, same order (tests/data/description_v1.json). Nested entries are written as this
version reads them: an older file's ``preprocessing`` without ``resize`` gains the resize it
was always run with (``bilinear-squash``), and an empty ``ood`` entry reads as no guard. The rules that keep a description from
silently changing answers run once, when one is made (``from_dict``,
:func:`dataclasses.replace`, the constructor), so a ``RunDescription`` in hand is valid.

Top-level keys this version does not know are kept, and written back, as they were read
(``extra``); unknown keys inside ``head``, ``preprocessing`` or ``ood`` are refused, since
they could change how the model is run.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from ..data.preprocessing import Preprocessing, check_preprocessing
from ..data.records import CLASS_NAMES
from ..errors import CheckpointError, UsageError
from ..metrics.calibration import TEMPERATURE_RANGE
from .backbones import BACKBONES
from .sections import AdaptationSection, CalibrationSection, LeakageSection, TrainingSection

FORMAT = "pneumoscope-checkpoint"
FORMAT_VERSION = 2  # 2: N-class runs (class_names of any length, head outputs, normal_class); binary runs are still written as 1
BINARY_FORMAT_VERSION = 1  # what a two-class run is written as: every earlier pneumoscope reads it
MAX_CLASSES = 1000
OUTPUT = "one logit; P(PNEUMONIA) = sigmoid(logit / temperature)"


def output_text(class_names) -> str:
    """What the network's output means, for the description's ``output`` field."""
    if len(class_names) == 2:
        return OUTPUT if tuple(class_names) == CLASS_NAMES else f"one logit; P({class_names[1]}) = sigmoid(logit / temperature)"
    return f"{len(class_names)} logits, one per class in class_names order; P(class) = softmax(logits / temperature)"


# Input sizes a model here can run at: below 16 px a backbone has nothing left to pool;
# above 1,024 px one CPU image costs seconds and a batch gigabytes.
MAX_FEATURES = 16_384  # pooled backbone features (the registered backbones have 1,280 to 2,688)
MAX_HIDDEN = 65_536  # the head's hidden units (256 a head; cross-fitted and ensemble heads stack a few)
MAX_REFERENCE_SAMPLE = 100_000  # the site adapter's sample of training features (FeatureAdapter.REFERENCE_SAMPLE)

# Sections after the fixed keys, each written only when present (a description made here writes them
# in this order): train writes training, ood and leakage; calibrate, adapt and export add theirs.
SECTIONS = ("training", "ood", "leakage", "calibration", "adaptation", "onnx")
REQUIRED = ("format", "backbone", "head")


@dataclass(frozen=True)
class HeadShape:
    """The head's layer sizes: enough to rebuild it before its weights are loaded."""

    in_features: int
    hidden: int
    dropout: float
    outputs: int = 1  # one logit (two classes), or one per class

    def to_dict(self) -> dict:
        """As the description's ``head`` holds it (``outputs`` only when there are several: two-class files read as before)."""
        out = {"in_features": self.in_features, "hidden": self.hidden, "dropout": self.dropout}
        return out if self.outputs == 1 else {**out, "outputs": self.outputs}


@dataclass(frozen=True)
class OodGuardEntry:
    """The out-of-distribution guard's entry: a distance above ``cutoff`` flags an image."""

    cutoff: float
    method: str | None = None
    cutoff_rule: str | None = None

    def to_dict(self) -> dict:
        """The entry as the checkpoint stores it (unset fields left out)."""
        out = {"method": self.method, "cutoff": self.cutoff, "cutoff_rule": self.cutoff_rule}
        return {k: v for k, v in out.items() if k == "cutoff" or v is not None}


@dataclass(frozen=True)
class RunDescription:
    """A checkpoint's description; build it with :meth:`from_dict` or ``checkpoint.describe``.

    Derived descriptions come from :func:`dataclasses.replace`, which checks them again.
    The dict-valued fields (metrics, versions, feature_adapter and the sections) hold what
    was read or given: treat them as read-only; :meth:`to_dict` returns copies.
    """

    backbone: str
    head: HeadShape
    preprocessing: Preprocessing
    threshold: float
    threshold_policy: str = ""
    temperature: float = 1.0
    metrics: dict = field(default_factory=dict)
    feature_adapter: dict | None = None  # {"reference_sample": n}: training moments and a sample, fitted to a site by `adapt`
    versions: dict = field(default_factory=dict)
    training: TrainingSection | None = None
    ood: OodGuardEntry | None = None
    leakage: LeakageSection | None = None
    calibration: CalibrationSection | None = None
    adaptation: AdaptationSection | None = None
    onnx: dict | None = None
    class_names: tuple[str, ...] = CLASS_NAMES
    positive_class: str = CLASS_NAMES[1]
    output: str = OUTPUT
    normal_class: str | None = None  # N classes: the class the screening decision (normal vs not) is taken against
    format: str = FORMAT
    format_version: int = BINARY_FORMAT_VERSION  # describe() writes FORMAT_VERSION for N classes
    extra: dict = field(default_factory=dict)  # top-level keys this version does not know, kept as read
    source: str = field(default="description", compare=False, repr=False)  # where it was read, for messages
    read_keys: tuple[str, ...] | None = field(default=None, compare=False, repr=False)  # the file's keys in its order; None: made here

    def __post_init__(self):
        """Refuse a description that would silently change answers: a temperature <= 0 inverts
        every probability, a threshold outside (0, 1) makes one class impossible, a NaN or
        negative OOD cut-off turns the guard off. Sections given as mappings become their types."""
        source = self.source
        if self.format != FORMAT or _number(self.format_version or 0, "format_version", source) > FORMAT_VERSION:
            raise CheckpointError(
                f"{source}: checkpoint format {self.format_version} is newer than this pneumoscope reads; upgrade pneumoscope."
            )

        def set_(name: str, value) -> None:  # frozen: the checked, typed value replaces what was given
            object.__setattr__(self, name, value)

        low, high = TEMPERATURE_RANGE
        if not low <= _number(self.temperature, "temperature", source) <= high:
            raise _refuse(
                source,
                "temperature",
                f"in [{low:g}, {high:g}], the range calibration fits in (a negative one inverts every "
                "prediction, a huge one makes every probability 0.5)",
                self.temperature,
            )
        set_("temperature", float(self.temperature))
        threshold = _number(self.threshold, "threshold", source)
        if not 0.0 < threshold < 1.0:
            raise _refuse(source, "threshold", "in (0, 1)", threshold)
        set_("threshold", threshold)
        set_("ood", _ood(self.ood, source))
        set_("preprocessing", _preprocessing(self.preprocessing, source))
        set_("class_names", _class_names(self.class_names, source))
        self._check_task(source)
        if not isinstance(self.backbone, str) or not self.backbone:
            raise _refuse(source, "backbone", "a backbone name", self.backbone)
        spec = BACKBONES.get(self.backbone)
        if spec is not None and self.preprocessing.input_size != spec.preprocessing.input_size:
            raise _refuse(
                source,
                "preprocessing.input_size",
                f"{spec.preprocessing.input_size}, the size {self.backbone} is trained and run at (another size changes answers unflagged)",
                self.preprocessing.input_size,
            )
        set_("head", _head(self.head, source))
        outputs = 1 if len(self.class_names) == 2 else len(self.class_names)
        if self.head.outputs != outputs:
            raise _refuse(source, "head.outputs", f"{outputs} for {len(self.class_names)} classes", self.head.outputs)
        for name in ("metrics", "versions"):
            if not isinstance(getattr(self, name), Mapping):
                raise _refuse(source, name, "a mapping", getattr(self, name))
        for name in ("feature_adapter", *SECTIONS):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (Mapping, OodGuardEntry)):
                raise _refuse(source, name, "a mapping or absent", value)
        if self.feature_adapter is not None:  # the size of a tensor the loader allocates before reading the weights
            _integer(self.feature_adapter.get("reference_sample"), "feature_adapter.reference_sample", source, 1, MAX_REFERENCE_SAMPLE)
        shadowed = sorted(set(self.extra) & _KNOWN)
        if shadowed:
            raise _refuse(source, "extra", "keys this version does not know", shadowed)

    @classmethod
    def from_dict(cls, d: Mapping, source: str | os.PathLike) -> RunDescription:
        """Read a description as JSON holds it (checked; the mapping is copied, never kept)."""
        if not isinstance(d, Mapping):
            raise CheckpointError(f"{source}: the description must be a JSON object, got {type(d).__name__}. {_fix()}")
        missing = [k for k in REQUIRED if k not in d]
        if missing:
            raise CheckpointError(f"{source}: the description lacks {missing}; the file was edited or damaged. {_fix()}")
        d = copy.deepcopy(dict(d))
        read_keys = tuple(d)
        known = {k: d.pop(k) for k in read_keys if k in _KNOWN}
        known.setdefault("threshold", None)  # its rule names it: "threshold must be a number, got None"
        known.setdefault("preprocessing", None)
        return cls(**known, extra=d, source=str(source), read_keys=read_keys)

    def to_dict(self) -> dict:
        """The JSON description. Made here: the keys in the order ``describe`` writes them, then the
        sections present. Read from a file: its keys in its order (an older file's missing
        ``temperature`` or ``feature_adapter`` stays missing while it has the default), then any
        key added since (``replace`` adds a section as ``dict.update`` would)."""
        pre = self.preprocessing.to_dict()
        out = {
            "format": self.format,
            "format_version": self.format_version,
            "backbone": self.backbone,
            "head": self.head.to_dict(),
            "preprocessing": {**pre, "mean": list(pre["mean"]), "std": list(pre["std"])},
            "class_names": list(self.class_names),
            "positive_class": self.positive_class,
            **({"normal_class": self.normal_class} if self.normal_class is not None else {}),
            "output": self.output,
            "temperature": self.temperature,
            "threshold": self.threshold,
            "threshold_policy": self.threshold_policy,
            "metrics": self.metrics,
            "feature_adapter": self.feature_adapter,
            "versions": self.versions,
        }
        for name in SECTIONS:
            value = getattr(self, name)
            if value is not None or name in (self.read_keys or ()):  # a section read as null is written as null
                out[name] = value.to_dict() if isinstance(value, OodGuardEntry) else value
        out.update(self.extra)
        if self.read_keys is not None:
            added = [k for k in out if k not in self.read_keys and not (k in _OPTIONAL and out[k] == _OPTIONAL[k])]
            out = {k: out[k] for k in (*self.read_keys, *added) if k in out}
        return copy.deepcopy(out)

    def _check_task(self, source) -> None:
        """Class names, head outputs, positive and normal class agree: what the outputs mean cannot be misread."""
        k = len(self.class_names)
        if k == 2 and self.positive_class != self.class_names[1]:
            raise _refuse(source, "positive_class", f"{self.class_names[1]!r} (class index 1: the logit's class)", self.positive_class)
        if k > 2:
            if self.normal_class not in self.class_names:
                raise _refuse(
                    source, "normal_class", f"one of {list(self.class_names)} (the screening decision's normal class)", self.normal_class
                )
            if _number(self.format_version or 0, "format_version", source) < FORMAT_VERSION:
                raise _refuse(source, "format_version", f"{FORMAT_VERSION} for {k} classes", self.format_version)
        elif self.normal_class is not None:
            raise _refuse(source, "normal_class", "absent for two classes (the logit's class is the positive one)", self.normal_class)

    @property
    def n_classes(self) -> int:
        """How many classes the run tells apart."""
        return len(self.class_names)

    @property
    def ood_cutoff(self) -> float | None:
        """The OOD guard's cut-off, or None where the run has no guard."""
        return None if self.ood is None else self.ood.cutoff


_KNOWN = frozenset(f.name for f in fields(RunDescription)) - {"extra", "source", "read_keys"}
# Keys older versions did not write, left out of a description read from such a file while they keep these values.
_OPTIONAL = {"temperature": 1.0, "feature_adapter": None, "normal_class": None, **dict.fromkeys(SECTIONS)}


def _fix() -> str:
    return "Fix: re-train, re-calibrate or re-export the model."


def _number(value, name: str, source) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"{source}: {name} must be a number, got {value!r}. {_fix()}") from None
    if not math.isfinite(x):
        raise CheckpointError(f"{source}: {name} must be finite, got {value!r}. {_fix()}")
    return x


def _refuse(source, name: str, rule: str, value) -> CheckpointError:
    return CheckpointError(f"{source}: {name} must be {rule}, got {value!r}; the file was edited or damaged. {_fix()}")


def _integer(value, name: str, source, lo: int, hi: int | None = None) -> int:
    x = _number(value, name, source)
    if x != int(x) or x < lo or (hi is not None and x > hi):
        raise _refuse(source, name, f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}", value)
    return int(x)


def _keys(d, name: str, allowed: tuple[str, ...], source) -> None:
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise _refuse(source, name, f"a mapping of {list(allowed)} (unknown keys could change how the model runs)", unknown)


def _ood(ood, source) -> OodGuardEntry | None:
    if isinstance(ood, OodGuardEntry):
        ood = ood.to_dict()
    if not ood:
        return None
    if not isinstance(ood, Mapping):
        raise _refuse(source, "ood", "a mapping (method, cutoff, cutoff_rule)", ood)
    _keys(ood, "ood", ("method", "cutoff", "cutoff_rule"), source)
    cutoff = _number(ood.get("cutoff"), "ood.cutoff", source)
    if cutoff < 0:
        raise _refuse(source, "ood.cutoff", ">= 0 (a negative one flags everything; NaN flags nothing)", ood.get("cutoff"))
    return OodGuardEntry(cutoff, ood.get("method"), ood.get("cutoff_rule"))


def _preprocessing(pre, source) -> Preprocessing:
    if isinstance(pre, Preprocessing):
        return pre  # checked when it was made
    if not isinstance(pre, Mapping):
        raise _refuse(source, "preprocessing", "a mapping (input_size, mean, std, in_chans)", pre)
    try:
        return check_preprocessing(pre)  # the contract's rules live with the contract
    except UsageError as err:
        raise CheckpointError(f"{source}: {err}; the file was edited or damaged. {_fix()}") from None


def _class_names(names, source) -> tuple[str, ...]:
    if not isinstance(names, (list, tuple)) or not 2 <= len(names) <= MAX_CLASSES:
        raise _refuse(source, "class_names", f"a list of 2 to {MAX_CLASSES} class names", names)
    if not all(isinstance(n, str) and n for n in names) or len({n.lower() for n in names}) != len(names):
        raise _refuse(source, "class_names", "different non-empty names", names)
    return tuple(names)


def _head(head, source) -> HeadShape:
    if isinstance(head, HeadShape):
        head = head.to_dict()
    if not isinstance(head, Mapping) or not {"in_features", "hidden", "dropout"} <= set(head) <= {
        "in_features",
        "hidden",
        "dropout",
        "outputs",
    }:
        raise _refuse(source, "head", "a mapping of in_features, hidden, dropout (and outputs)", head)
    dropout = _number(head["dropout"], "head.dropout", source)
    if not 0.0 <= dropout < 1.0:
        raise _refuse(source, "head.dropout", "in [0, 1)", head["dropout"])
    # bounded: the loader allocates the head before it reads the weights (hidden 10^9 asked for 5 TB)
    return HeadShape(
        _integer(head["in_features"], "head.in_features", source, 1, MAX_FEATURES),
        _integer(head["hidden"], "head.hidden", source, 1, MAX_HIDDEN),
        dropout,
        _integer(head.get("outputs", 1), "head.outputs", source, 1, MAX_CLASSES),
    )
