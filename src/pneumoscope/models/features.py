"""Frozen-backbone features, computed once and cached on disk.

The cache key is the backbone's weight fingerprint plus its preprocessing plus
the image's content hash, so a renamed file hits the cache and a changed one,
or a different backbone, misses it. Each entry is one small ``.npy`` written
atomically: a run killed mid-way leaves only whole entries behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data.loading import RecordImages
from ..data.paths import default_cache_dir
from ..data.records import Dataset, Record
from ..outputs import npy_bytes, write_bytes_atomic
from ..runtime import die_with_parent, progress_bar
from .classifier import PneumoniaClassifier, weights_fingerprint

logger = logging.getLogger(__name__)

FEATURE_VERSION = 1  # bump when the way features are computed changes


class FeatureCache:
    """``root/<model key>/<ab>/<content hash>.npy``, one pooled feature vector each."""

    def __init__(self, root: str | os.PathLike, model_key: str, dim: int | None = None):
        self.dir = Path(root) / "features" / model_key
        self.dim = dim  # the feature length an entry must have (None: not checked)

    def _path(self, content_hash: str) -> Path:
        return self.dir / content_hash[:2] / f"{content_hash}.npy"

    def get(self, content_hash: str) -> np.ndarray | None:
        """The cached vector, or None when there is none or it is damaged (then it is recomputed, never trusted)."""
        path = self._path(content_hash)
        try:
            feature = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError) as err:
            logger.warning("feature cache entry %s unreadable (%s); recomputing", path, err)
            return None
        expected = (self.dim,) if self.dim is not None else (feature.size,)
        if feature.shape != expected or feature.dtype.kind != "f" or not np.isfinite(feature).all():
            logger.warning(
                "feature cache entry %s is damaged (shape %s, dtype %s, expected %s finite floats); recomputing",
                path,
                feature.shape,
                feature.dtype,
                expected,
            )
            return None
        return feature

    def put(self, content_hash: str, feature: np.ndarray) -> None:
        """Store one image's pooled features under its content hash (written atomically)."""
        write_bytes_atomic(self._path(content_hash), npy_bytes(np.asarray(feature, dtype=np.float32)))


def _part_key(name: str, module, model: PneumoniaClassifier) -> str:
    payload = json.dumps(
        {"backbone": weights_fingerprint(name, module), "pre": model.preprocessing.to_dict(), "v": FEATURE_VERSION}, sort_keys=True
    )
    return f"{name}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def part_caches(model: PneumoniaClassifier, root: str | os.PathLike) -> list[FeatureCache]:
    """One cache per backbone of the model: an ensemble's members share entries with single-backbone runs."""
    return [FeatureCache(root, _part_key(name, module, model), dim=module.num_features) for name, module in model.feature_parts()]


class _Preprocessed:
    """A decoded image -> the (C, S, S) tensor the network takes (a class, so that spawned workers can unpickle it)."""

    def __init__(self, preprocessing):
        self.preprocessing = preprocessing

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.preprocessing.apply(image)))


def _collate(batch):
    ok = [(i, x) for i, x, _ in batch if x is not None]
    bad = [(i, why) for i, x, why in batch if x is None]
    if ok:
        idx, xs = zip(*ok, strict=True)
        return list(idx), torch.stack(xs), bad
    return [], None, bad


@dataclass
class FeatureResult:
    """Pooled features of the records that decoded, those records, and why the others did not."""

    features: np.ndarray  # (N, C) for the rows that decoded
    records: list[Record]  # those rows, in input order
    problems: list[tuple[str, str]]  # (path, reason and fix) for rows that did not


def extract_features(
    model: PneumoniaClassifier,
    dataset: Dataset,
    records: list[Record] | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    num_workers: int = 1,
    progress: bool = True,
) -> FeatureResult:
    """Pooled backbone features for ``records`` (default: all), using the cache.

    Records need ``content_hash`` (see :func:`pneumoscope.data.scan`) for the
    cache; without one, features are computed every time.
    """
    records = dataset.records if records is None else records
    caches = part_caches(model, cache_dir or default_cache_dir())
    bounds = np.cumsum([c.dim for c in caches])[:-1]  # where each backbone's features end in the head's input
    feats: dict[int, np.ndarray] = {}
    for i, r in enumerate(records):
        if r.content_hash:
            hits = [c.get(r.content_hash) for c in caches]
            if all(h is not None for h in hits):
                feats[i] = np.concatenate(hits)
    todo = [i for i in range(len(records)) if i not in feats]
    logger.info("features: %d cached, %d to compute (%s)", len(feats), len(todo), ", ".join(str(c.dir) for c in caches))
    problems: dict[int, str] = {}
    if todo:
        loader = DataLoader(
            RecordImages(dataset, [records[i] for i in todo], _Preprocessed(model.preprocessing), model.preprocessing.input_size),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_collate,
            persistent_workers=False,
            worker_init_fn=die_with_parent,
        )
        model.eval()
        bar = progress_bar(total=len(todo), desc="features", unit="img", enabled=progress)
        with torch.inference_mode():
            for idx, x, bad in loader:
                for j, why in bad:
                    problems[todo[j]] = why
                if x is not None:
                    out = model.pooled_features(x).float().numpy()
                    for j, f in zip(idx, out, strict=True):
                        feats[todo[j]] = f
                        if records[todo[j]].content_hash:
                            for c, part in zip(caches, np.split(f, bounds), strict=True):
                                c.put(records[todo[j]].content_hash, part)
                bar.update(len(idx) + len(bad))
        bar.close()
    kept = [i for i in range(len(records)) if i in feats]
    for i, why in sorted(problems.items()):
        logger.warning("skipping %s: %s", dataset.display(records[i]), why)
    dim = model.head.fc1.in_features
    features = np.stack([feats[i] for i in kept]) if kept else np.zeros((0, dim), np.float32)
    return FeatureResult(features, [records[i] for i in kept], [(dataset.display(records[i]), why) for i, why in sorted(problems.items())])
