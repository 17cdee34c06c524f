"""Test-time augmentation: an image's views (itself, shifted and zoomed), whose logits are averaged."""

from __future__ import annotations

import numpy as np

TTA_SHIFT = 0.04  # of the image side
TTA_ZOOM = 1.06


def tta_views(view: np.ndarray) -> list[np.ndarray]:
    """The image and four mild variants: shifted left/right/up by 4% (mean-grey fill) and zoomed 6% in."""
    from PIL import Image

    s = view.shape[0]
    d = max(1, round(TTA_SHIFT * s))
    fill = float(view.mean())
    out = [view]
    for dy, dx in ((0, d), (0, -d), (d, 0)):
        shifted = np.full_like(view, fill)
        src = view[max(0, -dy) : s - max(0, dy), max(0, -dx) : s - max(0, dx)]
        shifted[max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
        out.append(shifted)
    c = round(s * (1 - 1 / TTA_ZOOM) / 2)
    out.append(np.asarray(Image.fromarray(view[c : s - c, c : s - c]).resize((s, s), Image.Resampling.BILINEAR), dtype=np.float32))
    return out
