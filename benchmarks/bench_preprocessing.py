"""Benchmark: do input changes help the frozen-backbone model generalise to `test/`? (issue 3)

    python benchmarks/bench_preprocessing.py [--data ../shared/data/chest_xray] base clahe crop80 ...

Cheap screening before any fine-tuning: the default EfficientNet-Lite0 features of
every image under one preprocessing variant, the default head trained on the seed-0
patient-level train split with early stopping on its validation split, the threshold
by Youden's J on validation, then ROC-AUC / accuracy / sensitivity / specificity on
`test/`. Variants: ``base`` (the shipped squash to 224), ``clahe`` (contrast-limited
adaptive histogram equalisation first), ``histeq`` (global equalisation), ``crop80``
(the central 80% only: no border), ``r320`` (320 px input). ``--logistic`` adds
logistic-regression heads at several regularisation strengths.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from pneumoscope.data.decode import resize_image
from pneumoscope.data.layouts import load_dataset
from pneumoscope.data.splits import split_by_patient
from pneumoscope.metrics.classification import calibrated_probability, compute_binary_metrics, compute_roc_auc, compute_youden_threshold
from pneumoscope.models.classifier import Head, create_model
from pneumoscope.runtime import tune_cpu_allocator
from pneumoscope.training.head import fit_head, head_logits

REPO = Path(__file__).resolve().parents[1]


def squash(image: np.ndarray, size: int) -> np.ndarray:
    return resize_image(image, size)


def clahe(image: np.ndarray, size: int) -> np.ndarray:
    from skimage import exposure

    return resize_image(exposure.equalize_adapthist(np.clip(resize_image(image, 512), 0, 1), clip_limit=0.01).astype(np.float32), size)


def histeq(image: np.ndarray, size: int) -> np.ndarray:
    from skimage import exposure

    return resize_image(exposure.equalize_hist(resize_image(image, 512)).astype(np.float32), size)


def central(fraction: float):
    def crop(image: np.ndarray, size: int) -> np.ndarray:
        x = resize_image(image, 448)
        m = int(448 * (1 - fraction) / 2)
        return resize_image(x[m : 448 - m, m : 448 - m], size)

    return crop


VARIANTS = {"base": (squash, 224), "clahe": (clahe, 224), "histeq": (histeq, 224), "crop80": (central(0.8), 224), "r320": (squash, 320)}


def features(model, images: list[np.ndarray], prepare, size: int) -> np.ndarray:
    contract = dataclasses.replace(model.preprocessing, input_size=size)  # the model's normalisation, at this variant's size
    out = []
    with torch.inference_mode():
        for s in range(0, len(images), 64):
            x = np.stack([contract.apply(prepare(im, size)) for im in images[s : s + 64]])  # (B, C, S, S)
            out.append(model.pooled_features(torch.from_numpy(x)).numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "chest_xray"))
    parser.add_argument("--logistic", action="store_true", help="also a logistic-regression head (standardised features, C 1e-4 to 1)")
    parser.add_argument("variants", nargs="+", choices=sorted(VARIANTS))
    args = parser.parse_args()
    tune_cpu_allocator()
    ds = load_dataset(args.data)
    recs = split_by_patient(ds.records, val_fraction=0.1, seed=0)
    images = [ds.reader.read_image(r.ref) for r in recs]
    y, split = np.array([r.label for r in recs]), np.array([r.split for r in recs])
    tr, va, te = split == "train", split == "val", split == "test"
    model = create_model().eval()
    print("| variant | val AUC | test AUC | accuracy | sensitivity | specificity | threshold | seconds |")
    for name in args.variants:
        t0 = time.perf_counter()
        prepare, size = VARIANTS[name]
        f = features(model, images, prepare, size)
        torch.manual_seed(0)
        head = Head(f.shape[1])
        fit_head(head, f[tr], y[tr], f[va], y[va], seed=0, progress=False)
        pv, pt = (calibrated_probability(head_logits(head, f[m])) for m in (va, te))
        th = compute_youden_threshold(y[va], pv)
        m = compute_binary_metrics(y[te], pt, th)
        print(
            f"| {name} | {compute_roc_auc(y[va], pv):.4f} | {compute_roc_auc(y[te], pt):.4f} | {m['accuracy']:.3f} | "
            f"{m['sensitivity']:.3f} | {m['specificity']:.3f} | {th:.3f} | {time.perf_counter() - t0:.0f} |",
            flush=True,
        )
        if args.logistic:
            logistic_heads(name, f, y, tr, va, te)


def logistic_heads(name: str, f: np.ndarray, y: np.ndarray, tr, va, te) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(f[tr])
    for c in (1e-4, 1e-3, 1e-2, 1e-1, 1.0):
        lr = LogisticRegression(C=c, max_iter=3000, class_weight="balanced").fit(scaler.transform(f[tr]), y[tr])
        pv, pt = (lr.predict_proba(scaler.transform(f[m]))[:, 1] for m in (va, te))
        th = compute_youden_threshold(y[va], pv)
        m = compute_binary_metrics(y[te], pt, th)
        print(
            f"| {name}, logistic C={c:g} | {compute_roc_auc(y[va], pv):.4f} | {compute_roc_auc(y[te], pt):.4f} | {m['accuracy']:.3f} | "
            f"{m['sensitivity']:.3f} | {m['specificity']:.3f} | {th:.3f} | |",
            flush=True,
        )


if __name__ == "__main__":
    main()
