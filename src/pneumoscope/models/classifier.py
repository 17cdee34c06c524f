"""The classifier: a registered backbone (``backbones.BACKBONES``), the head, the OOD guard and the site adapter."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..data.records import CLASS_NAMES
from ..errors import UsageError
from .backbones import DEFAULT_BACKBONE, PRETRAINED, BackboneSpec, get_spec, load_imagenet_state_dict

logger = logging.getLogger(__name__)


class Head(nn.Module):
    """The notebook's head: global average pooling -> Dropout -> Dense(ReLU) -> one logit (two classes: the logit of
    class 1) or one logit per class (softmax over ``outputs`` classes).

    Accepts a feature map (B, C, H, W) or already pooled features (B, C), so
    the same module trains on cached features and runs inside the full model.
    """

    def __init__(self, in_features: int, hidden: int = 256, dropout: float = 0.3, outputs: int = 1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features (B, C) or a feature map (B, C, H, W) -> logits (B, outputs)."""
        if x.ndim == 4:
            x = x.mean(dim=(2, 3))  # (B, C)
        return self.fc2(self.act(self.fc1(self.dropout(x))))  # (B, outputs)


def pack_heads(heads: list[Head], widths: list[int]) -> Head:
    """One :class:`Head` that computes the mean of ``heads``' logits, each head seeing its own
    consecutive ``widths[i]`` input features (an ensemble's members' features side by side).

    The first layers go block-diagonal, the output layer averages: an ordinary Head (of
    hidden size sum of the heads'), so checkpoints, site adaptation and ONNX need nothing new.
    """
    packed = Head(sum(widths), hidden=sum(h.fc1.out_features for h in heads), dropout=heads[0].dropout.p, outputs=heads[0].fc2.out_features)
    with torch.no_grad():
        packed.fc1.weight.zero_()
        row = col = 0
        for h, w in zip(heads, widths, strict=True):
            if h.fc1.in_features != w:
                raise ValueError(f"a head for {w} features was given one of {h.fc1.in_features}")
            n = h.fc1.out_features
            packed.fc1.weight[row : row + n, col : col + w] = h.fc1.weight
            packed.fc1.bias[row : row + n] = h.fc1.bias
            packed.fc2.weight[:, row : row + n] = h.fc2.weight / len(heads)
            row, col = row + n, col + w
        packed.fc2.bias.copy_(torch.stack([h.fc2.bias for h in heads]).mean(0))
    return packed.eval()


def average_heads(heads: list[Head]) -> Head:
    """One :class:`Head` whose logit is the mean of ``heads``' logits on the same features (a seed or fold ensemble).

    The hidden layers are stacked and the output layer averages them: an ordinary Head (hidden size the sum of the
    heads'), so checkpoints, site adaptation and ONNX need nothing new.
    """
    packed = Head(
        heads[0].fc1.in_features,
        hidden=sum(h.fc1.out_features for h in heads),
        dropout=heads[0].dropout.p,
        outputs=heads[0].fc2.out_features,
    )
    with torch.no_grad():
        packed.fc1.weight.copy_(torch.cat([h.fc1.weight for h in heads]))  # (sum hidden, C)
        packed.fc1.bias.copy_(torch.cat([h.fc1.bias for h in heads]))
        packed.fc2.weight.copy_(torch.cat([h.fc2.weight for h in heads], dim=1) / len(heads))  # (1, sum hidden)
        packed.fc2.bias.copy_(torch.stack([h.fc2.bias for h in heads]).mean(0))
    return packed.eval()


class MahalanobisGuard(nn.Module):
    """Out-of-distribution score: Mahalanobis distance of pooled backbone features to the
    training features (Lee et al. 2018), with a cut-off chosen on validation data."""

    def __init__(self, mean: torch.Tensor, precision: torch.Tensor, cutoff: float):
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("precision", precision.float())
        self.register_buffer("cutoff", torch.tensor(float(cutoff)))

    @classmethod
    def fit(cls, features: np.ndarray, val_features: np.ndarray, quantile: float = 0.99) -> MahalanobisGuard:
        """A guard fitted on ``features`` (Ledoit-Wolf), its cut-off the ``quantile`` of ``val_features``' distances."""
        from sklearn.covariance import LedoitWolf  # shrinkage: 1,280 dims from a few thousand images

        lw = LedoitWolf().fit(features)
        guard = cls(torch.from_numpy(lw.location_), torch.from_numpy(lw.precision_), 0.0)
        guard.cutoff.fill_(float(np.quantile(guard.distance_np(val_features), quantile)))
        return guard

    @classmethod
    def empty(cls, dim: int) -> MahalanobisGuard:
        """An unfitted guard of ``dim`` features, to load a state dict into."""
        return cls(torch.zeros(dim), torch.eye(dim), 0.0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distances (B,) of pooled features (B, C)."""
        d = features.float() - self.mean  # (B, C)
        return torch.sqrt(torch.clamp(((d @ self.precision) * d).sum(dim=1), min=0.0))  # (B,)

    def distance_np(self, features: np.ndarray) -> np.ndarray:
        """Distances of a numpy array of features, without gradients."""
        with torch.no_grad():
            return self(torch.as_tensor(features, dtype=torch.float32)).numpy()


class FeatureAdapter(nn.Module):
    """Site adaptation of the pooled features: ``f * scale + shift``, per feature.

    Holds the training split's feature moments (``ref_mean``, ``ref_sd``) and a
    sample of its features with their labels (``ref_sample``, ``ref_labels``: for
    set-level shift tests, and to refit the head beside a few labelled site images). Identity
    (scale 1, shift 0, exactly) until :meth:`fit_site` maps a site's feature mean and
    sd onto the training split's, from the site's images alone (no labels).
    """

    def __init__(self, ref_mean: torch.Tensor, ref_sd: torch.Tensor, ref_sample: torch.Tensor, ref_labels: torch.Tensor):
        super().__init__()
        self.register_buffer("ref_mean", ref_mean.float())
        self.register_buffer("ref_sd", ref_sd.float())
        self.register_buffer("ref_sample", ref_sample.float())
        self.register_buffer("ref_labels", ref_labels.float())
        self.register_buffer("scale", torch.ones_like(self.ref_mean))
        self.register_buffer("shift", torch.zeros_like(self.ref_mean))

    REFERENCE_SAMPLE = 512  # training features kept for shift tests (2.6 MB for 1,280 features)
    MIN_SD = 1e-3  # features that barely vary at the site are left unscaled

    @classmethod
    def reference(cls, features: np.ndarray, labels: np.ndarray, seed: int = 0) -> FeatureAdapter:
        """The identity adapter with the training split's feature statistics and a seeded sample of its features."""
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.permutation(len(features))[: cls.REFERENCE_SAMPLE])
        return cls(
            torch.from_numpy(features.mean(0)),
            torch.from_numpy(features.std(0)),
            torch.from_numpy(features[rows]),
            torch.from_numpy(np.asarray(labels)[rows].astype(np.float32)),
        )

    @classmethod
    def empty(cls, dim: int, n_sample: int) -> FeatureAdapter:
        """A blank adapter of ``dim`` features and ``n_sample`` reference rows, to load a state dict into."""
        return cls(torch.zeros(dim), torch.ones(dim), torch.zeros(n_sample, dim), torch.zeros(n_sample))

    def fit_site(self, site_features: np.ndarray, *, shrink: float = 1.0) -> None:
        """Map the site's per-feature mean and sd onto the training split's.

        ``shrink`` in [0, 1] blends the site's sd with the training one (1: the site's
        own; 0: a mean shift only), for small site samples.
        """
        site = torch.as_tensor(np.asarray(site_features, np.float64))
        ref_mean, ref_sd = self.ref_mean.double(), self.ref_sd.double()
        sd = shrink * site.std(0, unbiased=False) + (1 - shrink) * ref_sd
        scale = torch.where(sd > self.MIN_SD, ref_sd / sd.clamp(min=self.MIN_SD), torch.ones_like(sd))
        self.scale.copy_(scale.float())
        self.shift.copy_((ref_mean - site.mean(0) * scale).float())

    @property
    def is_identity(self) -> bool:
        """Whether the adapter leaves features unchanged (no site fitted)."""
        return bool((self.scale == 1).all() and (self.shift == 0).all())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """The features (B, C) mapped to the training split's per-feature statistics."""
        return features * self.scale + self.shift  # (B, C)

    def apply_np(self, features: np.ndarray) -> np.ndarray:
        """The adapted features of a numpy array, without gradients."""
        with torch.no_grad():
            return self(torch.as_tensor(features, dtype=torch.float32)).numpy()


class PneumoniaClassifier(nn.Module):
    """Backbone feature map -> :class:`Head`. ``forward`` returns (B, 1) logits.

    The model carries what using it needs: its registry entry (``spec``: CAM layer, top
    layers, ensemble members), its preprocessing contract and its class names (index 1
    is the logit's class)."""

    def __init__(self, backbone: nn.Module, head: Head, backbone_name: str, spec: BackboneSpec, class_names: Sequence[str] = CLASS_NAMES):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.backbone_name = backbone_name
        self.spec = spec
        self.preprocessing = spec.preprocessing  # a checkpoint's stored contract replaces it on load
        self.class_names = tuple(class_names)
        self.ood: MahalanobisGuard | None = None  # set by training; part of the state dict when present
        self.adapter: FeatureAdapter | None = None  # set by training (identity), fitted by `adapt`

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's feature maps (B, C, h, w)."""
        return self.backbone(x)  # (B, C, h, w)

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled backbone features (B, C)."""
        return self.forward_features(x).mean(dim=(2, 3))  # (B, C)

    def adapted(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features as the head and the OOD guard see them (after site adaptation)."""
        return features if self.adapter is None else self.adapter(features)

    @property
    def n_outputs(self) -> int:
        """1 (two classes: the logit of class 1) or the number of classes (softmax)."""
        return self.head.fc2.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, S, S) -> logits (B, n_outputs)."""
        return self.head(self.adapted(self.pooled_features(x)))

    def _squeeze(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, 0] if self.n_outputs == 1 else logits

    def logit_and_ood(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, C, S, S) -> logits ((B,) for two classes, (B, K) for K) and OOD distance (B,), or None without a
        guard: what inference and the ONNX export compute, from one pass of the backbone."""
        feats = self.adapted(self.pooled_features(x))
        return self._squeeze(self.head(feats)), (self.ood(feats) if self.ood is not None else None)

    def head_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits ((B,) or (B, K)) from cached pooled backbone features."""
        return self._squeeze(self.head(self.adapted(torch.as_tensor(pooled, dtype=torch.float32))))

    def ood_distances(self, pooled) -> torch.Tensor | None:
        """OOD distances (B,) from cached pooled backbone features, as :meth:`logit_and_ood` computes them; None without a guard."""
        return None if self.ood is None else self.ood(self.adapted(torch.as_tensor(pooled, dtype=torch.float32)))

    def cam_layer(self) -> nn.Module:
        """The layer CAMs are computed at: the backbone's last convolutional stage."""
        return self.backbone.get_submodule(self.spec.cam_layer)

    def feature_parts(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of each backbone whose pooled features make up the head's input, in
        order: one, or an ensemble's members (so each member's features are cached as its own)."""
        if isinstance(self.backbone, ConcatBackbone):
            return list(zip(self.spec.members, self.backbone.members, strict=True))
        return [(self.backbone_name, self.backbone)]


def weights_fingerprint(name: str, module: nn.Module) -> str:
    """sha256 of a module's name and weights (keys the feature cache)."""
    h = hashlib.sha256(name.encode())
    for key, value in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class ConcatBackbone(nn.Module):
    """Several backbones on the same input; their last feature maps concatenated on channels.

    Training gives each member its own head and packs them into one (:func:`pack_heads`):
    the model's logit is the mean of the members' logits.

    The members must reduce the input by the same stride (the EfficientNet-Lites all do: 32),
    so the maps line up pixel for pixel and the head's pooling sees one (B, sum C, h, w) map.
    """

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.num_features = sum(m.num_features for m in members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The members' feature maps concatenated along channels (B, sum C_i, h, w)."""
        maps = [m(x) for m in self.members]  # each (B, C_i, h, w)
        if len({tuple(f.shape[2:]) for f in maps}) != 1:
            raise ValueError(f"ensemble members give feature maps of different sizes {[tuple(f.shape[2:]) for f in maps]}")
        return torch.cat(maps, dim=1)  # (B, sum C_i, h, w)


def create_backbone(name: str, *, pretrained: str = "imagenet", weights: str | os.PathLike | None = None) -> nn.Module:
    """A timm backbone that returns its last feature map, with no pooling or classifier.

    ``pretrained``: ``"imagenet"`` (registry weights, or ``weights`` when given)
    or ``"none"`` (random initialisation).
    """
    import timm

    spec = get_spec(name)
    if pretrained not in PRETRAINED:
        raise UsageError(f"pretrained must be 'imagenet' or 'none', got {pretrained!r}")
    if spec.members:
        if weights is not None:
            raise UsageError(
                f"{name} is an ensemble of {', '.join(spec.members)}: --weights takes one backbone's state dict. "
                "Fix: use the registry's ImageNet weights (--pretrained imagenet) or --pretrained none."
            )
        return ConcatBackbone([create_backbone(m, pretrained=pretrained) for m in spec.members])
    backbone = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, global_pool="")
    if pretrained == "imagenet" or weights is not None:
        state = load_imagenet_state_dict(name, weights)
        own = set(backbone.state_dict())
        classifier = {k for k in state if k not in own and k.split(".")[0] in ("classifier", "fc", "head")}
        state = {k: v for k, v in state.items() if k not in classifier}
        try:
            backbone.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise UsageError(f"weights do not fit {spec.timm_name}: {err}") from err
    return backbone


def create_model(
    name: str = DEFAULT_BACKBONE,
    *,
    pretrained: str = "imagenet",
    weights: str | os.PathLike | None = None,
    hidden: int = 256,
    dropout: float = 0.3,
    class_names: Sequence[str] = CLASS_NAMES,
) -> PneumoniaClassifier:
    """The classifier: a registered backbone with the notebook's head (one logit for two classes, one per class beyond)."""
    spec = get_spec(name)
    backbone = create_backbone(name, pretrained=pretrained, weights=weights)
    head = Head(backbone.num_features, hidden=hidden, dropout=dropout, outputs=1 if len(class_names) == 2 else len(class_names))
    return PneumoniaClassifier(backbone, head, name, spec, class_names)
