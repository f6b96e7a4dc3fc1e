"""The LightningModule that trains any classifier: loss, accuracy, and the optimisation its params section names.

The recipe is a params section that trains (params.train, params.transfer, params.compare: each a RecipeParams):
the module reads it as it is, so a training has no setting params.yaml does not show.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from torch import nn

from pipeline.params import RecipeParams

MONITOR_MODES = {"val_acc": "max", "val_loss": "min"}  # what "better" means for each metric a training monitors


def set_frozen_eval(model: nn.Module) -> None:
    """Frozen parts run in inference mode: BatchNorm keeps its running statistics, dropout and stochastic
    depth are off, so a frozen base is a fixed function (and its features can be cached)."""
    for m in model.modules():
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            m.eval()


class ClassifierModule(pl.LightningModule):
    """`model` trained with `recipe`; parameters under `base` (an attribute path, e.g. "net.base") train at
    lr * base_lr_factor (fine-tuning a pretrained base)."""

    def __init__(self, model: nn.Module, recipe: RecipeParams, base_lr_factor: float = 1.0,
                 base: str = "net.base") -> None:
        super().__init__()
        self.model = model
        self.recipe = recipe
        self.base, self.base_lr_factor = base, base_lr_factor
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)

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
        self._sums = torch.zeros(3, device=self.device)  # this epoch's loss x images, correct, images

    def net(self) -> nn.Module:
        """What trains: the model, or its torch.compile wrapper while a fit with trainer.compile runs."""
        return self.__dict__.get("compiled", self.model)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net()(x)
        loss = self.loss_fn(logits, y)
        self._add_up("train", self._sums, loss, logits, y, batch_idx + 1 >= self.trainer.num_training_batches)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(3, device=self.device)

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        x, y = batch
        logits = self.net()(x)
        trainer = self.trainer
        batches = trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches
        last = batch_idx + 1 >= batches[dataloader_idx]
        self._add_up("val", self._val_sums, self.loss_fn(logits, y), logits, y, last)

    def _add_up(self, split: str, sums: torch.Tensor, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
                last: bool) -> None:
        """The epoch's loss and accuracy add up in three numbers (loss x images, correct, images), on the model's
        device, no copy from the host; Lightning's logging runs once, at the epoch's last batch: each self.log
        call costs about half a millisecond (benchmarks: lightning_step; the claims' 54 trainings validate 5,472
        batches)."""
        with torch.no_grad():
            sums[0] += loss * len(y)
            sums[1] += (logits.argmax(dim=1) == y).sum()
            sums[2] += len(y)
        if last:
            loss_sum, correct, seen = sums
            self._log_epoch(split, loss_sum / seen, correct / seen, int(seen.item()))

    def _log_epoch(self, split: str, loss: torch.Tensor, accuracy: torch.Tensor, batch_size: int) -> None:
        """Epoch means over `batch_size` images (the epoch's accuracy is exactly correct / seen), weighted by each
        process's images under DDP. The batch size is named: without it Lightning searches the batch for one."""
        for name, value in (("loss", loss), ("acc", accuracy)):
            self.log(f"{split}_{name}", value, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True,
                     batch_size=batch_size)

    # ------------------------------------------------------------------------------------ optimisation
    def _param_groups(self) -> list[dict]:
        lr = self.recipe.lr
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if self.base_lr_factor == 1.0:
            return [{"params": [p for _, p in trainable], "lr": lr}]
        base = [p for n, p in trainable if n.startswith(self.base + ".")]
        rest = [p for n, p in trainable if not n.startswith(self.base + ".")]
        groups = [{"params": rest, "lr": lr, "name": "head"}]
        if base:
            groups.append({"params": base, "lr": lr * self.base_lr_factor, "name": "base"})
        return groups

    def configure_optimizers(self):
        r = self.recipe
        groups = self._param_groups()
        # A fused step unscales gradients itself: Lightning's mixed precision cannot clip them before it.
        fused = _fused(groups) and not r.gradient_clip_val
        opt = OPTIMIZERS[r.optimizer](groups, r, fused)
        if r.scheduler == "none" and not r.warmup_epochs:
            return opt
        total = max(1, int(self.trainer.estimated_stepping_batches))
        steps = Steps(total, max(1, total // max(1, self.trainer.max_epochs or 1)), r)
        return SCHEDULERS[r.scheduler](opt, groups, steps)


# ---------------------------------------------------------------------------------------------- tables
def _fused(groups: list[dict]) -> bool:
    """torch's fused (one-kernel) update where it has one: float parameters on the CPU or a CUDA GPU. On the
    CPU it halves Adam's step (seed CNN: 780 -> 350 us per step; benchmarks/README.md)."""
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


OPTIMIZERS = {
    "adam": lambda groups, r, fused: torch.optim.Adam(groups, lr=r.lr, weight_decay=r.weight_decay, fused=fused),
    "adamw": lambda groups, r, fused: torch.optim.AdamW(groups, lr=r.lr, weight_decay=r.weight_decay, fused=fused),
    "sgd": lambda groups, r, fused: torch.optim.SGD(groups, lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay,
                                                    nesterov=True, fused=fused),
}


@dataclass(frozen=True)
class Steps:
    total: int
    per_epoch: int
    recipe: RecipeParams

    @property
    def warmup(self) -> int:
        return self.recipe.warmup_epochs * self.per_epoch


def _per_step(factor):
    """A LambdaLR schedule (stepped every batch) from factor(step, steps), with linear warm-up first."""
    def build(opt, _groups, s: Steps):
        def lr_factor(step: int) -> float:
            return (step + 1) / s.warmup if step < s.warmup else factor(step - s.warmup, s)

        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lr_factor),
                                                   "interval": "step"}}

    return build


def _cosine(step: int, s: Steps) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / max(1, s.total - s.warmup))))


def _step(step: int, s: Steps) -> float:
    return s.recipe.gamma ** (step // (s.recipe.step_size * s.per_epoch))


def _onecycle(opt, groups, s: Steps):
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=s.total,
                                                pct_start=max(s.warmup / s.total, 0.05), anneal_strategy="cos")
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _plateau(opt, _groups, s: Steps):
    r = s.recipe
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode=MONITOR_MODES[r.monitor], factor=r.gamma, patience=max(1, r.step_size // 2))
    schedulers = [{"scheduler": plateau, "interval": "epoch", "monitor": r.monitor}]
    if s.warmup:
        schedulers.insert(0, {"scheduler": torch.optim.lr_scheduler.LinearLR(
            opt, start_factor=1.0 / s.warmup, total_iters=s.warmup), "interval": "step"})
    return [opt], schedulers


SCHEDULERS = {
    "none": _per_step(lambda step, s: 1.0),  # reached with warm-up only
    "cosine": _per_step(_cosine),
    "step": _per_step(_step),
    "onecycle": _onecycle,
    "plateau": _plateau,
}
