"""The head on cached features: its training loop (``fit_head``, read it top to bottom), class weights,
patient folds and the cross-fitted heads whose out-of-fold logits set the operating point.
Used by ``train`` (pipeline) and by ``calibrate``'s head refit."""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ..errors import UsageError
from ..models.classifier import Head, average_heads, pack_heads
from ..models.features import FeatureResult
from ..runtime import progress_bar
from .config import TrainConfig

logger = logging.getLogger(__name__)


class FitSplit(NamedTuple):
    """Labels and train/validation masks of the images features were extracted for (fixed for the whole run)."""

    y: np.ndarray
    train: np.ndarray  # bool
    val: np.ndarray  # bool


def class_weights(y: np.ndarray, n_classes: int = 2) -> np.ndarray:
    """Keras-style balanced weights n / (K n_c), one per class."""
    counts = np.bincount(y.astype(int), minlength=n_classes)
    if (counts == 0).any():
        raise UsageError(f"training needs images of every class, got counts {counts.tolist()} (in class order)")
    return counts.sum() / (len(counts) * counts)


class _Objective:
    """The loss and the hits of a head: class-weighted binary cross-entropy on one logit, or cross-entropy over
    K logits; a hit is the logit's sign (one logit) or the argmax (K) matching the label."""

    def __init__(self, outputs: int):
        self.binary = outputs == 1
        self.loss = nn.BCEWithLogitsLoss(reduction="none") if self.binary else nn.CrossEntropyLoss(reduction="none")

    def labels(self, y) -> torch.Tensor:
        return torch.as_tensor(y, dtype=torch.float32 if self.binary else torch.long)

    def logits(self, head: Head, x: torch.Tensor) -> torch.Tensor:
        out = head(x)
        return out.squeeze(1) if self.binary else out

    def hits(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((logits > 0).float() == y) if self.binary else (logits.argmax(1) == y)


def fit_head(
    head: Head,
    x_train,
    y_train: np.ndarray,
    x_val=None,
    y_val: np.ndarray | None = None,
    *,
    sample_weight=None,
    epochs: int = 100,
    patience: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    progress: bool = True,
    loggers: Sequence = (),
) -> tuple[list[dict], int]:
    """The one head fit: Adam on weighted BCE (one logit) or cross-entropy (K logits), for training and for
    ``calibrate --refit-head``.

    Args:
        head: trained in place.
        x_train, y_train: features (n, D) and class indices (n,).
        x_val, y_val: validation features and labels: early stopping on their (unweighted) loss, the best
            epoch's weights restored. Without them every epoch runs and the last weights stay.
        sample_weight: a weight per training row; default the balanced class weights (:func:`class_weights`).
        batch_size: rows a step; one batch (full-batch steps, in row order) when it is at least n.

    Returns:
        The per-epoch history and the best (or last) epoch, 1-based. Each epoch's losses and accuracies also
        go to ``loggers`` (Lightning loggers, called directly: ``head/val_loss`` and so on, step = epoch).
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    objective = _Objective(head.fc2.out_features)
    xt, yt = torch.as_tensor(x_train, dtype=torch.float32), objective.labels(y_train)
    if sample_weight is None:
        sample_weight = torch.as_tensor(class_weights(np.asarray(y_train), max(2, head.fc2.out_features)), dtype=torch.float32)[yt.long()]
    sample_w = torch.as_tensor(sample_weight, dtype=torch.float32)
    best = None if x_val is None else _EarlyStopping(torch.as_tensor(x_val, dtype=torch.float32), objective.labels(y_val), patience)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    history = []
    bar = progress_bar(range(1, epochs + 1), desc="head", unit="epoch", enabled=progress)
    for epoch in bar:
        order = torch.randperm(len(xt), generator=generator) if batch_size < len(xt) else torch.arange(len(xt))
        loss, accuracy = _train_epoch(head, opt, objective, xt, yt, sample_w, order, batch_size)
        history.append({"epoch": epoch, "loss": loss, "accuracy": accuracy})
        if best is None:
            continue
        history[-1]["val_loss"], history[-1]["val_accuracy"] = _validate(head, objective, best.x, best.y)
        _log_epoch(loggers, history[-1])
        bar.set_postfix(val_loss=f"{history[-1]['val_loss']:.4f}")
        if best.stop(head, epoch, history[-1]["val_loss"]):
            break
    bar.close()
    if best is not None:
        head.load_state_dict(best.state)
    head.eval()
    return history, best.epoch if best is not None else len(history)


class _EarlyStopping:
    """The validation features and labels, and the best epoch so far: its loss, number and weights."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, patience: int):
        self.x, self.y, self.patience = x, y, patience
        self.loss, self.epoch, self.state, self.waited = float("inf"), 0, None, 0

    def stop(self, head: Head, epoch: int, val_loss: float) -> bool:
        """Keep the head's weights when ``val_loss`` is a new best; True once ``patience`` epochs pass without one."""
        if val_loss < self.loss - 1e-6:
            self.loss, self.epoch, self.state, self.waited = val_loss, epoch, copy.deepcopy(head.state_dict()), 0
            return False
        self.waited += 1
        if self.waited >= self.patience:
            logger.info("early stopping at epoch %d; restoring epoch %d (val_loss %.4f)", epoch, self.epoch, self.loss)
            return True
        return False


def _train_epoch(
    head: Head, opt, objective: _Objective, xt: torch.Tensor, yt: torch.Tensor, sample_w: torch.Tensor, order: torch.Tensor, batch_size: int
):
    """One pass over the training features in ``order``, one Adam step a batch: (mean weighted loss, accuracy)."""
    head.train()
    total, correct = 0.0, 0
    for start in range(0, len(xt), batch_size):
        idx = order[start : start + batch_size]
        logits = objective.logits(head, xt[idx])
        loss = (objective.loss(logits, yt[idx]) * sample_w[idx]).sum() / sample_w[idx].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
        correct += int(objective.hits(logits, yt[idx]).sum())
    return total / len(xt), correct / len(xt)


def _validate(head: Head, objective: _Objective, xv: torch.Tensor, yv: torch.Tensor) -> tuple[float, float]:
    """(unweighted mean loss, accuracy: logit 0 or argmax) on the validation features."""
    head.eval()
    with torch.no_grad():
        val_logits = objective.logits(head, xv)
        val_loss = float(objective.loss(val_logits, yv).mean())
        val_acc = float(objective.hits(val_logits, yv).float().mean())
    return val_loss, val_acc


def _log_epoch(loggers: Sequence, row: dict) -> None:
    """An epoch's row to the Lightning loggers (step = epoch) and the debug log."""
    for lg in loggers:
        lg.log_metrics(
            {
                "head/train_loss": row["loss"],
                "head/train_accuracy": row["accuracy"],
                "head/val_loss": row["val_loss"],
                "head/val_accuracy": row["val_accuracy"],
            },
            step=row["epoch"],
        )
    logger.debug(
        "epoch %d: loss %.4f acc %.4f val_loss %.4f val_acc %.4f",
        row["epoch"],
        row["loss"],
        row["accuracy"],
        row["val_loss"],
        row["val_accuracy"],
    )


def fit_model_head(
    model, x_train, y_train, x_val, y_val, config: TrainConfig, *, progress: bool = True, loggers: Sequence = ()
) -> tuple[list[dict], int]:
    """Stage 1: the model's head on its frozen features. An ensemble's members get one head
    each, fitted on their own features and packed into one head that averages their logits
    (on `test/`, as good as one head on the joined features and steadier across seeds, BENCHMARKS.md).
    Returns the (first member's) history and best epoch; ``loggers`` get that history."""
    kw = dict(
        epochs=config.epochs,
        patience=config.patience,
        batch_size=config.batch_size,
        lr=config.lr,
        weight_decay=config.weight_decay,
        seed=config.seed,
        progress=progress,
    )
    parts = model.feature_parts()
    if len(parts) == 1:
        return fit_head(model.head, x_train, y_train, x_val, y_val, loggers=loggers, **kw)
    widths = [module.num_features for _, module in parts]
    heads, fits, start = [], [], 0
    for (name, _), width in zip(parts, widths, strict=True):
        cols = slice(start, start + width)
        head = Head(width, hidden=model.head.fc1.out_features, dropout=model.head.dropout.p, outputs=model.n_outputs)
        fits.append(fit_head(head, x_train[:, cols], y_train, x_val[:, cols], y_val, loggers=loggers if not fits else (), **kw))
        logger.info("ensemble member %s: best epoch %d", name, fits[-1][1])
        heads.append(head)
        start += width
    model.head = pack_heads(heads, widths)
    return fits[0]


def patient_folds(patients: Sequence[str], labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold (0..k-1) of each image: patients dealt to folds in a seeded order, each class separately (a patient's
    class is its highest label), so that every fold holds both classes in about the training proportion."""
    patient_label: dict[str, int] = {}
    for pid, y in zip(patients, labels, strict=True):
        patient_label[pid] = max(patient_label.get(pid, 0), int(y))
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    offset = 0
    for label in sorted(set(patient_label.values())):
        group = rng.permutation(sorted(p for p, y in patient_label.items() if y == label))
        fold_of.update((pid, (offset + i) % k) for i, pid in enumerate(group))
        offset += len(group)  # the next class starts where this one stopped: fold sizes stay even
    return np.array([fold_of[pid] for pid in patients])


def usable_folds(feats: FeatureResult, fit_split: FitSplit, config: TrainConfig) -> int:
    """``config.head_folds``, or fewer when a class has fewer patients than folds (each fold needs one of each); 1 (one head,
    the operating point on the validation split) when cross-fitting is off or a class has a single patient."""
    if config.head_folds <= 1:
        return 1
    pool = fit_split.train | fit_split.val
    per_class = [
        len({r.patient_id for r, keep, y in zip(feats.records, pool, fit_split.y, strict=True) if keep and y == c})
        for c in range(max(2, int(fit_split.y.max()) + 1))
    ]
    folds = min(config.head_folds, *per_class)
    if folds < config.head_folds:
        logger.warning(
            "head_folds %d: a class has only %d patients; %s",
            config.head_folds,
            min(per_class),
            f"cross-fitting {folds} heads" if folds > 1 else "one head, the operating point on the validation split",
        )
    return folds if folds > 1 else 1


def fit_crossfitted_heads(
    model, feats: FeatureResult, fit_split: FitSplit, config: TrainConfig, *, progress: bool = True, loggers: Sequence = ()
) -> tuple[list[dict], int]:
    """Stage 1 cross-fitted: ``config.head_folds`` heads (a count :func:`usable_folds` allows), each fitted on the train and validation images of the other
    folds (early stopping on its own fold), averaged into the model's head (:func:`~pneumoscope.models.average_heads`).

    Every image then has an out-of-fold logit, kept in ``model.oof_logits_`` for the operating point: the threshold is
    chosen on all the images instead of on one validation split of a tenth of them, so it moves less with the seed.
    Returns the first fold's history and best epoch (``loggers`` get that history)."""
    pool = fit_split.train | fit_split.val
    x, y = feats.features[pool], fit_split.y[pool]
    patients = [r.patient_id for r, keep in zip(feats.records, pool, strict=True) if keep]
    folds = patient_folds(patients, y, config.head_folds, config.seed)
    oof_shape = (len(y),) if model.n_outputs == 1 else (len(y), model.n_outputs)
    fresh, heads, oof, first = copy.deepcopy(model.head), [], np.full(oof_shape, np.nan), None
    for k in range(config.head_folds):
        held = folds == k
        model.head = copy.deepcopy(fresh)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed * 1000 + k)  # each fold's head starts elsewhere
            model.head.apply(lambda m: m.reset_parameters() if isinstance(m, nn.Linear) else None)
        fold_config = dataclasses.replace(config, seed=config.seed * 1000 + k)
        fit = fit_model_head(model, x[~held], y[~held], x[held], y[held], fold_config, progress=progress, loggers=loggers if k == 0 else ())
        oof[held] = head_logits(model.head, x[held])
        heads.append(model.head)
        first = first or fit
        logger.info("fold %d of %d: %d images held out, best epoch %d", k + 1, config.head_folds, int(held.sum()), fit[1])
    model.head = average_heads(heads)
    model.oof_logits_ = np.full((len(fit_split.y), *oof_shape[1:]), np.nan)
    model.oof_logits_[pool] = oof
    model.oof_folds_ = config.head_folds
    return first


def head_logits(head: Head, features: np.ndarray) -> np.ndarray:
    """The head's raw logits, float64: (n,) for one logit, (n, K) for K."""
    head.eval()
    with torch.no_grad():
        out = head(torch.as_tensor(features, dtype=torch.float32))
        return (out.squeeze(1) if out.shape[1] == 1 else out).double().numpy()
