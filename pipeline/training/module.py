"""The LightningModule that trains any classifier: loss, torchmetrics accuracy, optimizer and schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy


def set_frozen_eval(model: nn.Module) -> None:
    """Frozen parts run in inference mode: BatchNorm keeps its running statistics, dropout and stochastic
    depth are off, so a frozen base is a fixed function (and its features can be cached)."""
    for m in model.modules():
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            m.eval()


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    scheduler: str = "none"
    warmup_epochs: int = 0
    step_size: int = 5
    gamma: float = 0.1
    monitor: str = "val_acc"
    # Parameters under this attribute path (e.g. "net.base") train at lr * base_lr_factor.
    base_prefix: str | None = None
    base_lr_factor: float = 1.0


class ClassifierModule(pl.LightningModule):
    def __init__(self, model: nn.Module, num_classes: int, optim: OptimConfig) -> None:
        super().__init__()
        self.model = model
        self.optim = optim
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=optim.label_smoothing)
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def train(self, mode: bool = True):
        super().train(mode)
        set_frozen_eval(self.model)  # frozen parts: BN statistics kept, dropout off
        return self

    def on_train_epoch_start(self) -> None:
        # Lightning does not call .train() when fitting starts; set the modes here, every epoch, so that blocks
        # unfrozen by a callback train and frozen ones stay in inference mode.
        self.train()

    def training_step(self, batch, _batch_idx):
        x, y = batch
        logits = self.model(x)
        loss = self.loss_fn(logits, y)
        self.train_acc(logits, y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, _batch_idx):
        x, y = batch
        logits = self.model(x)
        self.val_acc(logits, y)
        self.log("val_loss", self.loss_fn(logits, y), on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("val_acc", self.val_acc, on_epoch=True, prog_bar=True)

    # ------------------------------------------------------------------------------------ optimisation
    def _param_groups(self) -> list[dict]:
        o = self.optim
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not o.base_prefix:
            return [{"params": [p for _, p in trainable], "lr": o.lr}]
        base = [p for n, p in trainable if n.startswith(o.base_prefix + ".")]
        rest = [p for n, p in trainable if not n.startswith(o.base_prefix + ".")]
        groups = [{"params": rest, "lr": o.lr, "name": "head"}]
        if base:
            groups.append({"params": base, "lr": o.lr * o.base_lr_factor, "name": "base"})
        return groups

    def configure_optimizers(self):
        o = self.optim
        groups = self._param_groups()
        if o.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=True)
        elif o.optimizer == "adamw":
            opt = torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
        else:
            opt = torch.optim.Adam(groups, lr=o.lr, weight_decay=o.weight_decay)
        if o.scheduler == "none" and not o.warmup_epochs:
            return opt
        total = max(1, int(self.trainer.estimated_stepping_batches))
        per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        warmup = o.warmup_epochs * per_epoch
        if o.scheduler == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=[g["lr"] for g in groups], total_steps=total,
                pct_start=max(warmup / total, 0.05), anneal_strategy="cos")
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        if o.scheduler == "plateau":
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, mode="max" if o.monitor == "val_acc" else "min", factor=o.gamma, patience=max(1, o.step_size // 2))
            schedulers = [{"scheduler": plateau, "interval": "epoch", "monitor": o.monitor}]
            if warmup:
                schedulers.insert(0, {"scheduler": torch.optim.lr_scheduler.LinearLR(
                    opt, start_factor=1.0 / warmup, total_iters=warmup), "interval": "step"})
            return [opt], schedulers

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if o.scheduler == "cosine":
                progress = (step - warmup) / max(1, total - warmup)
                return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
            if o.scheduler == "step":
                return o.gamma ** ((step - warmup) // (o.step_size * per_epoch))
            return 1.0

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
