"""Callbacks own the side effects of training: per-epoch records, console lines."""

from __future__ import annotations

import time

import pytorch_lightning as pl

CURVE_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")
METRIC_KEYS = CURVE_KEYS[:4]


class EpochRecorder(pl.Callback):
    """Collects one row per epoch (losses, accuracies, lr, epoch time) and sends epoch time to the logger."""

    def __init__(self, print_lines: bool = False, label: str = "") -> None:
        self.rows: list[dict[str, float]] = []
        self.print_lines = print_lines
        self.label = label
        self._start = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        seconds = time.perf_counter() - self._start
        m = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch + 1, "step": trainer.global_step}
        row |= {k: round(float(m[k]), 6) for k in METRIC_KEYS if k in m}
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        row |= {"lr": lr, "epoch_time_s": round(seconds, 4)}
        self.rows.append(row)
        if trainer.logger is not None:
            trainer.logger.log_metrics({"epoch_time_s": seconds, "lr": lr}, step=trainer.global_step)
        if self.print_lines and trainer.is_global_zero:
            parts = " ".join(f"{k}={row[k]:.4g}" for k in CURVE_KEYS if k in row)
            print(f"{self.label}epoch {row['epoch']}/{trainer.max_epochs} {parts} ({seconds:.1f}s)", flush=True)
