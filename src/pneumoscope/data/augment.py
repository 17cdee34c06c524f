"""Augmentation for radiographs, on one grayscale image at a time (in DataLoader workers).

Small rotations, scale and translation; brightness, contrast and gamma; blur and
noise; JPEG re-encoding (the test images were re-saved as JPEG). Horizontal flips
are off by default: the heart's side is anatomy, and a flipped film is not a
plausible input.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from ..errors import UsageError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class AugmentConfig:
    """Stage 2's random augmentation: ranges of rotation, scale, translation, brightness, contrast and gamma."""

    rotation_deg: float = 7.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.15
    gamma: tuple[float, float] = (0.8, 1.25)
    blur_p: float = 0.2
    noise_p: float = 0.2
    noise_std: float = 0.02
    jpeg_p: float = 0.3
    jpeg_quality: tuple[int, int] = (50, 95)
    hflip_p: float = 0.0

    def __post_init__(self):
        for name, value in asdict(self).items():
            parts = value if isinstance(value, (tuple, list)) else (value,)
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in parts):
                raise UsageError(
                    f"augment setting {name} must be finite numbers, got {value!r} (a NaN would be written to the run as "
                    "bare NaN and break every draw)"
                )

    def to_dict(self) -> dict:
        """The settings as a plain dict (recorded in the run's description)."""
        return asdict(self)


# Named settings for the ablation in BENCHMARKS.md (``--augment NAME``); each is a set of
# changes to the default AugmentConfig.
PRESETS: dict[str, dict | None] = {
    "none": None,
    "default": {},
    "geometric": {"brightness": 0.0, "contrast": 0.0, "gamma": (1.0, 1.0), "blur_p": 0.0, "noise_p": 0.0, "jpeg_p": 0.0},
    "intensity": {"rotation_deg": 0.0, "scale": (1.0, 1.0), "translate": 0.0},
    "default+hflip": {"hflip_p": 0.5},
    "strong": {
        "rotation_deg": 12.0,
        "scale": (0.8, 1.2),
        "translate": 0.1,
        "brightness": 0.2,
        "contrast": 0.3,
        "gamma": (0.7, 1.4),
        "blur_p": 0.3,
        "noise_p": 0.3,
        "jpeg_p": 0.5,
    },
}


def resolve_augment(setting: bool | str | dict | None) -> AugmentConfig | None:
    """A training setting -> the AugmentConfig it means (None: no augmentation).

    ``True``/``False``, a preset name from :data:`PRESETS`, or a mapping of
    AugmentConfig fields that change the default (YAML: ``augment: {hflip_p: 0.5}``).
    """
    if setting is True:
        setting = "default"
    if setting is False or setting is None:
        return None
    if isinstance(setting, str):
        if setting not in PRESETS:
            raise UsageError(f"augment must be true, false, a mapping of settings or one of {sorted(PRESETS)}; got {setting!r}")
        changes = PRESETS[setting]
        return None if changes is None else AugmentConfig(**changes)
    if isinstance(setting, dict):
        known = set(AugmentConfig.__dataclass_fields__)
        unknown = sorted(set(setting) - known)
        if unknown:
            raise UsageError(f"unknown augmentation settings {unknown}; known: {sorted(known)}")
        return AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in setting.items()})
    raise UsageError(f"augment must be true, false, a preset name or a mapping; got {setting!r}")


class Augment:
    """uint8 (1, S, S) tensor -> float32 (1, S, S) in [0, 1], randomly perturbed."""

    def __init__(self, config: AugmentConfig):
        self.config = config

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        # imported here, not at the top: the command line's parser reads PRESETS and must not wait for torch
        import torch
        from torchvision.transforms import v2
        from torchvision.transforms.v2 import functional as F

        c = self.config
        size = img.shape[-1]

        def chance(p: float) -> bool:
            return p > 0 and float(torch.rand((), generator=generator)) < p

        def uniform(lo: float, hi: float) -> float:
            return lo + (hi - lo) * float(torch.rand((), generator=generator))

        if chance(c.jpeg_p):
            img = _jpeg(img, round(uniform(*c.jpeg_quality)))
        shift = [round(uniform(-c.translate, c.translate) * size), round(uniform(-c.translate, c.translate) * size)]
        # fill with the image's mean grey: black wedges at the border would be a new shortcut
        img = F.affine(
            img,
            angle=uniform(-c.rotation_deg, c.rotation_deg),
            translate=shift,
            scale=uniform(*c.scale),
            shear=[0.0, 0.0],
            interpolation=v2.InterpolationMode.BILINEAR,
            fill=[float(img.float().mean())],
        )
        x = img.float() / 255.0
        if chance(c.hflip_p):
            x = torch.flip(x, dims=(-1,))
        mean = x.mean()
        x = (x - mean) * uniform(1 - c.contrast, 1 + c.contrast) + mean + uniform(-c.brightness, c.brightness)
        x = x.clamp(0, 1) ** uniform(*c.gamma)
        if chance(c.blur_p):
            x = F.gaussian_blur(x, kernel_size=5, sigma=uniform(0.3, 1.2))
        if chance(c.noise_p):
            x = x + c.noise_std * torch.randn(x.shape, generator=generator)
        return x.clamp(0, 1)


def _jpeg(img: torch.Tensor, quality: int) -> torch.Tensor:
    """Re-encode a uint8 (1, S, S) image as JPEG at ``quality`` and decode it again."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img[0].numpy()).save(buf, format="JPEG", quality=int(quality))
    return torch.from_numpy(np.array(Image.open(buf).convert("L")))[None]
