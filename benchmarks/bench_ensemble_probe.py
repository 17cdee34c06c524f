"""Probe: seed and backbone ensembles on frozen features, before shipping one (issue 10, item 4).

    python benchmarks/bench_ensemble_probe.py [--data DIR] [--cache-dir DIR] [--seeds 0 1 2]

On the seed-0 patient split of `pneumoscope train`, pooled features of EfficientNet-Lite0
and Lite2 (both at 224 px, the ensemble's input size; cached) feed the default head with
several head seeds; each variant's temperature and Youden threshold come from validation,
its figures from `test/`: one head per backbone, the mean logit of several head seeds, one
head on the joined features, and the mean logit of one head per backbone (what
`--backbone efficientnet_lite0+2` ships).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from pneumoscope.data.layouts import load_dataset
from pneumoscope.data.splits import scan
from pneumoscope.inference.predictor import calibrated_probability
from pneumoscope.metrics.calibration import fit_temperature
from pneumoscope.metrics.classification import compute_roc_auc
from pneumoscope.metrics.operating_point import compute_threshold
from pneumoscope.models.classifier import Head, create_model
from pneumoscope.models.features import extract_features
from pneumoscope.training.config import TrainConfig
from pneumoscope.training.head import fit_head, head_logits
from pneumoscope.training.prepare import prepare_records

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "chest_xray"))
    parser.add_argument("--cache-dir")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

    dataset = load_dataset(args.data)
    dataset = scan(dataset.subset(prepare_records(dataset, TrainConfig())), check_decode=False, progress=False)
    lite0 = create_model("efficientnet_lite0")
    feats = {}
    for name in ("efficientnet_lite0", "efficientnet_lite2"):
        model = create_model(name)
        model.preprocessing = lite0.preprocessing
        result = extract_features(model, dataset, cache_dir=args.cache_dir, progress=False)
        feats[name] = result.features
    y = np.array([r.label for r in result.records])
    split = np.array([r.split for r in result.records])
    tr, va, te = split == "train", split == "val", split == "test"

    def fit(x, seed):
        torch.manual_seed(seed)
        head = Head(x.shape[1])
        fit_head(head, x[tr], y[tr], x[va], y[va], seed=seed, progress=False)
        return head_logits(head, x[va]), head_logits(head, x[te])

    def score(tag, z_val, z_test):
        t = fit_temperature(z_val, y[va])
        threshold = compute_threshold(y[va], calibrated_probability(z_val, t), "youden", None)
        pred = calibrated_probability(z_test, t) >= threshold
        yt = y[te]
        print(
            f"{tag:34s} test AUC {compute_roc_auc(yt, z_test):.4f}  accuracy {(pred == yt).mean():.3f}  "
            f"sensitivity {pred[yt == 1].mean():.3f}  specificity {1 - pred[yt == 0].mean():.3f}  threshold {threshold:.3f}",
            flush=True,
        )

    single = {(n, s): fit(x, s) for n, x in feats.items() for s in args.seeds}
    for (n, s), z in single.items():
        score(f"{n} seed {s}", *z)
    for n in feats:
        score(f"{n} mean logit of seeds", *(np.mean([single[n, s][i] for s in args.seeds], 0) for i in (0, 1)))
    joined = np.concatenate(list(feats.values()), axis=1)
    for s in args.seeds:
        score(f"joined features seed {s}", *fit(joined, s))
        score(f"one head each, mean logit, seed {s}", *(np.mean([single[n, s][i] for n in feats], 0) for i in (0, 1)))


if __name__ == "__main__":
    main()
