"""Checks that a map means something (a heatmap verifies nothing by itself: Adebayo et al. 2018).

* faithfulness, ROAD (Rong et al. 2022): remove the most (or least) relevant 20%
  of pixels with noisy linear imputation and measure the change in the explained
  class's probability; compared with smooth random maps of the same size;
* sanity, model-parameter randomisation: Spearman correlation between the CAM of
  the trained model and of the same model with its top layers re-initialised
  (a meaningful method gives a low correlation);
* shortcut audit: change in P(pneumonia) when a border band or the central chest
  region is masked, and the share of CAM mass outside the central region.
"""

from __future__ import annotations

import copy
import logging
from typing import TypedDict

import numpy as np
import torch
from pytorch_grad_cam.metrics.perturbation_confidence import PerturbationConfidenceMetric, RemoveLeastRelevantFirst, RemoveMostRelevantFirst
from pytorch_grad_cam.metrics.road import NoisyLinearImputer

from ..inference.predictor import Predictor
from ..runtime import progress_bar, seeded_rng
from .cams import ProbabilityTarget, compute_cam, views_and_cams

logger = logging.getLogger(__name__)


# Central chest region of a frontal radiograph, as fractions of height and width
# (rows 15-85%, columns 20-80%): lungs and heart; what lies outside is border,
# labels, arms and shoulders.
CENTRAL_BOX = (0.15, 0.85, 0.20, 0.80)


BORDER_FRACTION = 0.10


REMOVE_PERCENT = 20


# A one-sided Wilcoxon signed-rank test on n pairs cannot go below p = 2**-n: with fewer
# than 5 images (p >= 0.0625) no map could ever be shown better than random ones.
MIN_FAITHFULNESS_IMAGES = 5


def random_maps(n: int, size: int, rng: np.random.Generator, grid: int = 7) -> np.ndarray:
    """Smooth random maps (n, size, size) in [0, 1], as coarse as a 7x7 CAM."""
    coarse = torch.from_numpy(rng.uniform(size=(n, 1, grid, grid)).astype(np.float32))
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()


def compute_road(
    model, x: torch.Tensor, cams: np.ndarray, targets: list[int], *, most_relevant: bool = True, percent: int = REMOVE_PERCENT
) -> np.ndarray:
    """Change in the explained class's probability after ROAD removal of ``percent``% of pixels.

    ``most_relevant``: remove the highest-CAM pixels (a faithful map gives a large
    drop); else the lowest (a faithful map gives almost none).
    """
    if most_relevant:
        perturb = RemoveMostRelevantFirst(100 - percent, NoisyLinearImputer())
    else:
        perturb = RemoveLeastRelevantFirst(percent, NoisyLinearImputer())
    metric = PerturbationConfidenceMetric(perturb)
    model.eval()
    return np.asarray(metric(x, cams, [ProbabilityTarget(t) for t in targets], model), dtype=np.float32).reshape(-1)


def randomized_copy(model, seed: int = 0):
    """A copy of ``model`` with its head and top backbone layers re-initialised (Adebayo et al.) from ``seed``.

    The caller's global RNG is left as it was."""
    with seeded_rng(seed):
        return reinitialised_copy(model)


def reinitialised_copy(model):
    """:func:`randomized_copy`, drawing from the global RNG as it stands."""
    clone = copy.deepcopy(model).eval()
    names = clone.spec.top_layers
    for name in names:
        for module in clone.backbone.get_submodule(name).modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    for module in clone.head.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return clone


def spearman(a: np.ndarray, b: np.ndarray, size: int = 56) -> float:
    """Rank correlation of two maps, compared at a coarse grid (CAMs are upsampled from 7x7)."""
    from scipy.stats import spearmanr

    def coarse(m):
        t = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None]
        return torch.nn.functional.adaptive_avg_pool2d(t, size)[0, 0].numpy().ravel()

    ca, cb = coarse(a), coarse(b)
    if ca.std() == 0 or cb.std() == 0:
        return 0.0
    return float(spearmanr(ca, cb).statistic)


def central_mask(shape: tuple[int, int]) -> np.ndarray:
    """A boolean (H, W) mask of the central box (``CENTRAL_BOX``): lungs and heart."""
    h, w = shape
    r0, r1, c0, c1 = CENTRAL_BOX
    mask = np.zeros(shape, bool)
    mask[int(r0 * h) : int(r1 * h), int(c0 * w) : int(c1 * w)] = True
    return mask


def border_mask(shape: tuple[int, int], fraction: float = BORDER_FRACTION) -> np.ndarray:
    """A boolean (H, W) mask of the border band, ``fraction`` of each side."""
    h, w = shape
    bh, bw = max(1, int(fraction * h)), max(1, int(fraction * w))
    mask = np.ones(shape, bool)
    mask[bh : h - bh, bw : w - bw] = False
    return mask


def mask_region(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Fill the masked pixels with the mean grey of the unmasked ones (no new edges of pure black)."""
    out = image.copy()
    out[mask] = image[~mask].mean() if (~mask).any() else image.mean()
    return out


def cam_mass_outside_centre(cam: np.ndarray) -> float:
    """The share of the CAM's mass outside the central box (NaN for an empty map)."""
    total = float(cam.sum())
    return float(cam[~central_mask(cam.shape)].sum() / total) if total > 0 else float("nan")


def shortcut_probs(predictor: Predictor, images: list[np.ndarray], probs: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """P(pneumonia) for each image as is (``probs`` when the caller has them), with its border band masked, and with its centre masked."""
    views = [predictor.preprocessing_view(im) for im in images]
    border = [mask_region(v, border_mask(v.shape)) for v in views]
    centre = [mask_region(v, central_mask(v.shape)) for v in views]
    return {
        "prob": predictor.predict_proba(views) if probs is None else np.asarray(probs),
        "prob_border_masked": predictor.predict_proba(border),
        "prob_centre_masked": predictor.predict_proba(centre),
    }


def check_batch(
    predictor: Predictor,
    images: list[np.ndarray],
    cams: np.ndarray,
    targets: list[int],
    method: str,
    *,
    probs: np.ndarray,
    randomized=None,
    n_random: int = 3,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Per-image check scores of a batch's CAMs (:func:`views_and_cams`, explaining ``targets``); ``probs``: the images' probabilities."""
    model = predictor.model
    x = torch.cat([predictor.preprocess(im) for im in images])  # (B, C, S, S)
    out: dict[str, np.ndarray] = {}
    out["road_most"] = compute_road(model, x, cams, targets, most_relevant=True)
    out["road_least"] = compute_road(model, x, cams, targets, most_relevant=False)
    rng = np.random.default_rng(seed)
    rand = [compute_road(model, x, random_maps(len(x), x.shape[-1], rng), targets, most_relevant=True) for _ in range(n_random)]
    out["road_random"] = np.mean(rand, axis=0)
    if randomized is not None:
        rcams = compute_cam(randomized, x, targets, method)
        out["sanity_spearman"] = np.array([spearman(a, b) for a, b in zip(cams, rcams, strict=True)])
    shortcut = shortcut_probs(predictor, images, probs)
    out["delta_border_masked"] = shortcut["prob_border_masked"] - shortcut["prob"]
    out["delta_centre_masked"] = shortcut["prob_centre_masked"] - shortcut["prob"]
    out["cam_outside_centre"] = np.array([cam_mass_outside_centre(c) for c in cams])
    return out


SCORE_COLUMNS = [
    "road_most",
    "road_least",
    "road_random",
    "sanity_spearman",
    "delta_border_masked",
    "delta_centre_masked",
    "cam_outside_centre",
]


class ChecksSummary(TypedDict):
    """The explanation checks over a set of images (:func:`summarize_checks`; ``checks`` in explanations.json)."""

    method: str
    n: int
    remove_percent: int  # the share of pixels ROAD removes, in percent
    central_box: tuple[float, float, float, float]
    border_fraction: float
    mean_road_most: float | None  # means over images of each SCORE_COLUMNS column
    mean_road_least: float | None
    mean_road_random: float | None
    mean_sanity_spearman: float | None
    mean_delta_border_masked: float | None
    mean_delta_centre_masked: float | None
    mean_cam_outside_centre: float | None
    road_vs_random_p: float | None  # one-sided Wilcoxon; None under MIN_FAITHFULNESS_IMAGES images
    road_most_vs_least_p: float | None
    road_combined: float  # ROAD's (LeRF - MoRF) / 2: positive is faithful
    faithfulness_verdict: str


def summarize_checks(rows: list[dict], method: str) -> ChecksSummary:
    """Means over images and the faithfulness verdict.

    A faithful map passes two one-sided Wilcoxon signed-rank tests over images:
    removing its most relevant pixels lowers the explained class's probability more
    than removing smooth random regions, and more than removing its least relevant
    pixels (ROAD's MoRF/LeRF contrast). Under ``MIN_FAITHFULNESS_IMAGES`` images the
    tests cannot reach significance, and the verdict says that instead of failing the map.
    """
    from scipy.stats import wilcoxon

    summary = {
        "method": method,
        "n": len(rows),
        "remove_percent": REMOVE_PERCENT,
        "central_box": CENTRAL_BOX,
        "border_fraction": BORDER_FRACTION,
    }
    for col in SCORE_COLUMNS:
        vals = np.array([r[col] for r in rows if r.get(col) is not None and np.isfinite(r[col])], dtype=float)
        summary[f"mean_{col}"] = float(vals.mean()) if vals.size else None
    most = np.array([r["road_most"] for r in rows])
    rand = np.array([r["road_random"] for r in rows])
    least = np.array([r["road_least"] for r in rows])

    def less(a, b):
        return float(wilcoxon(a, b, alternative="less").pvalue) if len(a) >= MIN_FAITHFULNESS_IMAGES and np.any(a != b) else None

    summary["road_vs_random_p"] = less(most, rand)
    summary["road_most_vs_least_p"] = less(most, least)
    summary["road_combined"] = float(np.mean(least - most) / 2)  # ROAD's (LeRF - MoRF) / 2: positive is faithful
    beats_random = summary["road_vs_random_p"] is not None and summary["road_vs_random_p"] < 0.05
    beats_least = summary["road_most_vs_least_p"] is not None and summary["road_most_vs_least_p"] < 0.05
    if len(rows) < MIN_FAITHFULNESS_IMAGES:
        verdict = f"too few images to test faithfulness: n={len(rows)}, need ≥ {MIN_FAITHFULNESS_IMAGES}"
    elif beats_random and beats_least:
        verdict = "better than random maps"
    elif beats_random:
        verdict = (
            "only partly faithful: removing its top pixels hurts more than removing random regions, but removing its least "
            "relevant pixels hurts as much or more (evidence the map does not show)"
        )
    else:
        verdict = "NOT better than random maps (removing its top pixels hurts no more than removing random regions)"
    summary["faithfulness_verdict"] = verdict
    return summary


def audit_dataset(
    predictor: Predictor,
    images_of,
    n: int,
    *,
    probs: np.ndarray | None = None,
    method: str = "gradcam",
    batch_size: int = 8,  # Grad-CAM keeps every activation for its backward pass: memory grows with the batch (BENCHMARKS.md)
    progress: bool = True,
) -> dict:
    """Shortcut audit over a set: mean change in P(pneumonia) with the border or the centre
    masked, and mean share of CAM mass outside the centre, with a verdict (:func:`shortcut_verdict`).
    ``images_of(i)`` decodes image i; ``probs`` are the images' unmasked probabilities when the caller has them."""
    deltas_b, deltas_c, outside = [], [], []
    for start in progress_bar(range(0, n, batch_size), desc="shortcut audit", unit="batch", enabled=progress):
        images = [images_of(i) for i in range(start, min(n, start + batch_size))]
        shortcut = shortcut_probs(predictor, images, None if probs is None else probs[start : start + len(images)])
        deltas_b.extend(shortcut["prob_border_masked"] - shortcut["prob"])
        deltas_c.extend(shortcut["prob_centre_masked"] - shortcut["prob"])
        _, cams, _ = views_and_cams(predictor, images, probs=shortcut["prob"], method=method)
        outside.extend(cam_mass_outside_centre(c) for c in cams)
    audit = {
        "n": n,
        "method": method,
        "central_box": CENTRAL_BOX,
        "border_fraction": BORDER_FRACTION,
        "mean_delta_border_masked": float(np.mean(deltas_b)),
        "mean_abs_delta_border_masked": float(np.mean(np.abs(deltas_b))),
        "mean_delta_centre_masked": float(np.mean(deltas_c)),
        "mean_abs_delta_centre_masked": float(np.mean(np.abs(deltas_c))),
        "mean_cam_outside_centre": _mean_of_finite(outside),  # None when every map is empty
        "central_area_fraction": float((CENTRAL_BOX[1] - CENTRAL_BOX[0]) * (CENTRAL_BOX[3] - CENTRAL_BOX[2])),
    }
    audit["shortcut_suspected"], audit["verdict"] = shortcut_verdict(audit, prob_of=predictor.prob_of.lower())
    return audit


# The border band is about a third of the image (0.36 at 10% a side) and the central box 0.42: a model that reads the
# chest changes far more with the chest masked. Half the centre's effect from the border, or a map that puts clearly
# more of its mass outside the centre than area alone would, says the decision leans on what lies outside the lungs.
BORDER_EFFECT_RATIO = 0.5


CAM_EXCESS_OUTSIDE = 0.10


MIN_AUDIT_EFFECT = 0.02  # mean absolute change in P(pneumonia) below which masking "changes nothing"


def _mean_of_finite(values) -> float | None:
    """The mean of the finite values, or None when there is none (numpy's nanmean warned and gave NaN)."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def shortcut_verdict(audit: dict, *, prob_of: str = "pneumonia") -> tuple[bool, str]:
    """(suspected, sentence) for a shortcut audit (:func:`audit_dataset`'s numbers).

    Suspected when masking the border band moves P(``prob_of``) by at least :data:`BORDER_EFFECT_RATIO` of what
    masking the chest centre does (and by at least :data:`MIN_AUDIT_EFFECT`), or when the maps put more than
    :data:`CAM_EXCESS_OUTSIDE` more of their mass outside the centre than the area outside it covers."""
    border, centre = audit["mean_abs_delta_border_masked"], audit["mean_abs_delta_centre_masked"]
    outside, area = audit["mean_cam_outside_centre"], 1 - audit["central_area_fraction"]
    effects = (
        f"masking the border band changes P({prob_of}) by {border:.3f} on average (absolute), masking the chest centre by {centre:.3f}"
    )
    maps = (
        f"the {audit['method']} maps are empty (no activation anywhere)"
        if outside is None
        else f"the {audit['method']} maps put {outside:.0%} of their mass outside the centre, which covers {area:.0%} of the image"
    )
    if border >= MIN_AUDIT_EFFECT and border >= BORDER_EFFECT_RATIO * centre:
        ratio = border / centre if centre > 0 else np.inf
        how = "more than" if ratio > 1.25 else "about as much as" if ratio >= 0.8 else "at least half as much as"
        return True, (
            f"The decision leans on the image border: {effects}, so the border moves it {how} the chest does; "
            f"{maps}. Look for markers, labels and collimation edges in the gallery."
        )
    if outside is not None and outside > area + CAM_EXCESS_OUTSIDE:
        return True, f"The maps look outside the lungs: {maps}, more than area alone would give; {effects}."
    if centre < MIN_AUDIT_EFFECT:
        return False, f"Inconclusive: masking changes little either way ({effects}); {maps}."
    return False, f"No sign of a border shortcut: {effects}, and {maps}."
