"""Stage 2: fine-tune the backbone with PyTorch Lightning (AdamW, warm-up + cosine, early stopping).

Lightning's Trainer is the engine: EarlyStopping on validation ROC-AUC,
ModelCheckpoint (best and last, written atomically), a CSV logger (and the
``--logger`` one beside it, see ``tracking``), its progress bar, and data parallel training over devices and nodes (``strategy="ddp"``:
NCCL on GPUs, gloo on CPUs; or launched by torchrun).

BatchNorm: the layers that stay frozen are kept in eval mode, so their running
statistics stay the ImageNet ones; the unfrozen top layers update theirs.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from ..data.augment import Augment
from ..data.preprocessing import Preprocessing
from ..errors import MissingFileError, UsageError
from ..models.backbones import UNFREEZE
from ..models.classifier import PneumoniaClassifier
from ..runtime import die_with_parent, is_launched_rank, quiet_lightning
from .config import FinetuneConfig
from .resume import AtomicCheckpointIO, load_resume_state, merge_earlier_log, read_history, resume_checkpoint, set_aside_earlier_log

logger = logging.getLogger(__name__)


class ArrayDataset(TorchDataset):
    """Rows of a uint8 (N, S, S) array (already resized, see ``imagecache``) -> (C, S, S) tensors
    normalised by ``preprocessing.normalize``, augmented before that when training."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, preprocessing: Preprocessing, augment: Augment | None, seed: int = 0):
        self.images, self.labels = images, labels.astype(np.float32)
        self.preprocessing, self.augment, self.seed, self.epoch = preprocessing, augment, seed, 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = torch.from_numpy(np.array(self.images[i]))[None]  # (1, S, S) uint8, copied out of the memmap
        if self.augment is not None:
            g = torch.Generator().manual_seed(hash((self.seed, self.epoch, i)) & 0x7FFFFFFF)
            x = self.augment(img, g)
        else:
            x = img.float() / 255.0
        return self.preprocessing.normalize(x), self.labels[i]  # (C, S, S)


def frozen_modules(model: PneumoniaClassifier, unfreeze: str) -> list[torch.nn.Module]:
    """The backbone modules that stay frozen (requires_grad off, eval mode)."""
    if unfreeze == "all":
        return []
    if unfreeze not in UNFREEZE:
        raise UsageError(f"unfreeze must be 'top' or 'all', got {unfreeze!r}")
    top = {id(m) for name in model.spec.top_layers for m in model.backbone.get_submodule(name).modules()}

    def owns_state(m) -> bool:  # holds weights or BatchNorm statistics itself
        return any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))

    return [m for m in model.backbone.modules() if id(m) not in top and owns_state(m)]


class FineTuner(L.LightningModule):
    """The LightningModule of stage 2: class-balanced BCE on one logit, or class-weighted cross-entropy over K logits
    (the weights stage 1 uses); AdamW with warm-up and cosine decay; validation AUC (macro one-vs-rest for K)."""

    def __init__(self, model: PneumoniaClassifier, config: FinetuneConfig, weights: np.ndarray, total_steps: int, seed: int = 0):
        super().__init__()
        self.model, self.config, self.total_steps, self.seed = model, config, max(1, total_steps), seed
        self.binary = model.n_outputs == 1
        self.frozen = frozen_modules(model, config.unfreeze)
        for m in self.frozen:
            m.requires_grad_(False)
        if self.binary:  # BCE's positive weight: the balanced weights' ratio, as stage 1's
            self.register_buffer("pos_weight", torch.tensor(float(weights[1] / weights[0])))
        else:
            self.register_buffer("class_weight", torch.as_tensor(weights, dtype=torch.float32))
        self._val_logits, self._val_labels = [], []

    def _loss(self, logits: torch.Tensor, y: torch.Tensor, *, weighted: bool = True) -> torch.Tensor:
        """Class-weighted (``weighted``) or plain BCE on one logit, cross-entropy over K logits; ``y`` as float labels."""
        if self.binary:
            return torch.nn.functional.binary_cross_entropy_with_logits(logits, y, pos_weight=self.pos_weight if weighted else None)
        return torch.nn.functional.cross_entropy(logits.float(), y.long(), weight=self.class_weight if weighted else None)

    def on_train_epoch_start(self) -> None:
        """Keep the frozen part's BatchNorm layers (or all, with ``freeze_bn``) in eval mode."""
        for m in self.frozen:
            m.eval()  # keep ImageNet BatchNorm statistics in the frozen part
        if self.config.freeze_bn:
            for m in self.model.backbone.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
        loader = self.trainer.train_dataloader
        if loader is not None and hasattr(loader.dataset, "epoch"):
            loader.dataset.epoch = self.current_epoch

    def forward(self, x):
        """Logits of preprocessed images: (B,) for one logit, (B, K) for K classes."""
        out = self.model(x)
        return out[:, 0] if self.binary else out

    def training_step(self, batch, _):
        """The batch's class-weighted loss (with mixup, when set), logged."""
        x, y = batch
        if self.config.mixup > 0:  # Zhang et al. 2018: train on convex pairs of images and of their losses
            lam = float(np.random.default_rng((self.seed, self.global_step)).beta(self.config.mixup, self.config.mixup))
            pair = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed * 100_003 + self.global_step)).to(x.device)
            logits = self(lam * x + (1 - lam) * x[pair])
            loss = lam * self._loss(logits, y) + (1 - lam) * self._loss(logits, y[pair])
        else:
            loss = self._loss(self(x), y)
        self.log("finetune/train_loss", loss, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def on_train_epoch_end(self) -> None:
        """Log the epoch number as the loggers' step."""
        self._log_epoch()

    def _log_epoch(self) -> None:
        """Lightning's loggers take a metric named "step" as the x-axis: epochs (1-based), as in stage 1, not optimizer steps."""
        self.log("step", float(self.current_epoch + 1), sync_dist=True)

    def validation_step(self, batch, _):
        """Log the batch's validation loss and keep its logits for the epoch's AUC."""
        x, y = batch
        logits = self(x)
        self.log("finetune/val_loss", self._loss(logits, y, weighted=False), prog_bar=True, sync_dist=True)
        self._val_logits.append(logits.detach().float())
        self._val_labels.append(y.detach())

    def on_validation_epoch_end(self) -> None:
        """Log the validation AUC over every rank's logits (macro one-vs-rest over K classes; 0.5 while a class is absent)."""
        logits = self.all_gather(torch.cat(self._val_logits)).cpu().numpy()
        labels = self.all_gather(torch.cat(self._val_labels)).reshape(-1).cpu().numpy()
        self._val_logits, self._val_labels = [], []
        auc = validation_auc(labels, logits.reshape(-1) if self.binary else logits.reshape(-1, logits.shape[-1]))
        self.log("finetune/val_auc", float(auc), prog_bar=True, sync_dist=True)  # the same on every rank: computed from gathered outputs
        self._log_epoch()

    def configure_optimizers(self):
        """AdamW (the head at 10x the backbone's rate) and a linear warm-up then cosine schedule, per step."""
        head = list(self.model.head.parameters())
        backbone = [p for p in self.model.backbone.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            [{"params": backbone, "lr": self.config.lr}, {"params": head, "lr": 10 * self.config.lr}], weight_decay=self.config.weight_decay
        )
        warmup = max(1, int(self.config.warmup_fraction * self.total_steps))

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, self.total_steps - warmup))))

        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, schedule), "interval": "step"}}


def validation_auc(labels: np.ndarray, logits: np.ndarray) -> float:
    """ROC-AUC of one logit (N,), or macro one-vs-rest AUC of K logits (N, K); 0.5 while a class is absent."""
    from sklearn.metrics import roc_auc_score

    k = 2 if logits.ndim == 1 else logits.shape[1]
    if len(np.unique(labels)) < k:
        return 0.5
    if logits.ndim == 1:
        return float(roc_auc_score(labels, logits))
    from ..metrics.multiclass import softmax

    return float(roc_auc_score(labels.astype(int), softmax(logits.astype(np.float64)), multi_class="ovr", average="macro"))


def auto_precision(cuda: bool) -> str:
    """fp16 AMP on CUDA; bf16 autocast on a CPU with native bf16 (AVX512-BF16 or AMX), where a
    whole fine-tuning run is faster with the same test AUC (BENCHMARKS.md); else fp32."""
    if cuda:
        return "16-mixed"
    return "bf16-mixed" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32-true"


def finetune(
    model: PneumoniaClassifier,
    train: ArrayDataset,
    val: ArrayDataset,
    config: FinetuneConfig,
    work_dir: str | os.PathLike,
    *,
    seed: int = 0,
    num_workers: int = 2,
    resume: bool = False,
    progress: bool = True,
    loggers: Sequence = (),
) -> tuple[list[dict], dict | None]:
    """Fine-tune in place; ``model`` ends with the best validation-AUC weights.

    Returns (per-epoch history, facts about the fit) in the global-zero process and
    (history, None) in the others. Checkpoints live in ``work_dir/checkpoints``
    (``last.ckpt`` to resume, ``best.ckpt``; a folder of their own, apart from the
    logs); the CSV log, which the history is read from, in ``work_dir/logs/finetune``. ``loggers``: more Lightning loggers to log to.
    """
    L.seed_everything(seed, workers=True, verbose=False)
    work_dir = Path(work_dir)
    ckpt = resume_checkpoint(work_dir)
    if resume and not ckpt.is_file():
        raise MissingFileError(f"{ckpt}: nothing to resume from. Start without --resume.")
    resumed_from = int(load_resume_state(ckpt)["epoch"]) + 1 if resume else None  # epochs completed before the kill
    logs = work_dir / "logs"
    if resume and not is_launched_rank():
        set_aside_earlier_log(logs, resumed_from)
    cuda = torch.cuda.is_available() and config.accelerator in ("auto", "gpu", "cuda")
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    module = _fine_tuner(model, train, config, seed)
    trainer, best = _trainer(config, work_dir, ckpt.parent, cuda=cuda, progress=progress, loggers=loggers)
    loader_kw = {
        "batch_size": config.batch_size,
        "num_workers": num_workers,
        "persistent_workers": num_workers > 0,
        "worker_init_fn": die_with_parent,
    }
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # Lightning 2.6 on torch 2.14 warns of its own use of a deprecated pytree API, every fit
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
        trainer.fit(
            module,
            DataLoader(train, shuffle=True, **loader_kw),
            DataLoader(val, **loader_kw),
            ckpt_path=str(ckpt) if resume else None,
        )
    fit_s = time.perf_counter() - t0
    if best.best_model_path:
        state = load_resume_state(best.best_model_path)["state_dict"]
        module.load_state_dict(state)
    model.to(memory_format=torch.contiguous_format).cpu().eval()
    if trainer.is_global_zero:
        merge_earlier_log(logs)
    history = read_history(logs / "finetune" / "metrics.csv")
    return history, _fit_facts(
        trainer, best, resumed_from=resumed_from, fit_s=fit_s, n_train=len(train)
    ) if trainer.is_global_zero else None


def _fine_tuner(model: PneumoniaClassifier, train: ArrayDataset, config: FinetuneConfig, seed: int) -> FineTuner:
    """The LightningModule over ``model``, its loss balanced as stage 1's and its schedule as long as the fit, in train mode."""
    from .head import class_weights

    if model.n_outputs == 1:  # BCE's positive weight n_0 / n_1: the balanced weights' ratio
        counts = np.bincount(train.labels.astype(int), minlength=2)
        weights = np.array([1.0, counts[0] / max(1, counts[1])])
    else:
        weights = class_weights(train.labels, model.n_outputs)  # balance the classes, as stage 1 does
    steps_per_epoch = math.ceil(len(train) / config.batch_size / max(1, int(config.devices) if str(config.devices).isdigit() else 1))
    module = FineTuner(model, config, weights, steps_per_epoch * config.epochs, seed)
    module.train()  # Lightning keeps the mode it is given, and feature extraction leaves the model in eval mode
    return module


def _best_and_last():
    """Lightning's ModelCheckpoint, with ``last.ckpt`` written after every epoch (Lightning 2.6 writes it only at an
    epoch whose score is a new best, so a run killed after epochs without one resumed from the last best epoch and
    trained the later ones again)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    class BestAndLast(ModelCheckpoint):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            """The best checkpoint when the score improved, then last.ckpt unless it was just written."""
            super().on_train_epoch_end(trainer, pl_module)  # validation has run: this epoch's score is in
            if self.save_last and getattr(self, "_last_written_step", None) != trainer.global_step:
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

        def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
            super()._save_last_checkpoint(trainer, monitor_candidates)
            self._last_written_step = trainer.global_step

    return BestAndLast


def _trainer(config: FinetuneConfig, work_dir: Path, ckpt_dir: Path, *, cuda: bool, progress: bool, loggers: Sequence):
    """(Lightning's Trainer, its best-checkpoint callback): early stopping on validation AUC, checkpoints written
    atomically to ``ckpt_dir``, the CSV log and ``loggers``, DDP when there is more than one device or node."""
    from lightning.pytorch.callbacks import EarlyStopping
    from lightning.pytorch.loggers import CSVLogger

    # beside the checkpoint resumed from (a run killed before the checkpoints/ layout has them in the work folder itself):
    # Lightning restores the best score and path only for the folder they were saved in
    best = _best_and_last()(dirpath=ckpt_dir, filename="best", monitor="finetune/val_auc", mode="max", save_last=True, save_top_k=1)
    callbacks = [best, EarlyStopping("finetune/val_auc", mode="max", patience=config.patience)]
    if config.ema:  # validation, the best checkpoint and the final model all use the averaged weights
        from lightning.pytorch.callbacks import WeightAveraging
        from torch.optim.swa_utils import get_ema_multi_avg_fn

        callbacks.append(WeightAveraging(multi_avg_fn=get_ema_multi_avg_fn(config.ema)))
    quiet_lightning()
    trainer = L.Trainer(
        max_epochs=config.epochs,
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy="ddp" if (str(config.devices) not in ("1", "auto") or config.num_nodes > 1) else "auto",
        precision=config.precision if config.precision != "auto" else auto_precision(cuda),
        callbacks=callbacks,
        logger=[CSVLogger(work_dir / "logs", name="", version="finetune"), *loggers],
        enable_progress_bar=progress,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
        deterministic=False,
        log_every_n_steps=10,
    )
    return trainer, best


def _fit_facts(trainer, best, *, resumed_from: int | None, fit_s: float, n_train: int) -> dict:
    """What the run's description records of the fit: world, precision, resume point, best AUC, epochs, time, speed."""
    return {
        "world_size": trainer.world_size,
        "num_nodes": trainer.num_nodes,
        "precision": str(trainer.precision),
        "resumed_after_epoch": resumed_from,
        "best_val_auc": float(best.best_model_score) if best.best_model_score is not None else None,
        "epochs_run": trainer.current_epoch,
        "fit_seconds": round(fit_s, 1),
        # training images per second of fit wall time (validation passes included), this process's epochs only
        "train_images_per_s": round(n_train * (trainer.current_epoch - (resumed_from or 0)) / fit_s, 1),
    }
