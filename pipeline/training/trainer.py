"""The Lightning Trainer, built from params.trainer: the GPU when there is one, the CPU otherwise."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar

from pipeline.training.callbacks import EpochRecorder


def resolve_precision(precision: str, accelerator: str) -> str:
    """`auto`: bf16 mixed on GPUs that support it, fp16 mixed on older GPUs, 32-bit on the CPU."""
    if precision != "auto":
        return precision
    on_gpu = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    if not on_gpu:
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def interactive() -> bool:
    """A rich progress bar in a terminal; one plain line per epoch under CI or in a log file."""
    return sys.stdout.isatty() and not os.environ.get("CI")


def configure_determinism(deterministic: bool) -> None:
    if deterministic:
        # cuBLAS needs this for deterministic matmuls on the GPU; harmless on the CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def build_trainer(
    trainer_params, max_epochs: int, logger=None, checkpoint_dir: Path | None = None, monitor: str = "val_acc",
    early_stopping_patience: int | None = None, gradient_clip_val: float = 0.0,
    limit_train_batches: float = 1.0, extra_callbacks: list | None = None, label: str = "",
    val_every: int = 1, quiet: bool = False,
) -> tuple[pl.Trainer, EpochRecorder, ModelCheckpoint | None]:
    """A Trainer plus the callbacks the stages read back (the epoch recorder and the checkpoint callback)."""
    configure_determinism(trainer_params.deterministic)
    if quiet:  # sweeps train dozens of models: no "GPU available" banner per training
        logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    show_bar = interactive() and not quiet
    recorder = EpochRecorder(print_lines=not show_bar and not quiet, label=label)
    callbacks: list[pl.Callback] = [recorder, *(extra_callbacks or [])]
    mode = "max" if monitor == "val_acc" else "min"
    checkpoint = None
    if checkpoint_dir is not None:
        checkpoint = ModelCheckpoint(dirpath=checkpoint_dir, filename="best", monitor=monitor, mode=mode,
                                     save_top_k=1, save_last=True, enable_version_counter=False)
        callbacks.append(checkpoint)
    if early_stopping_patience:
        callbacks.append(EarlyStopping(monitor=monitor, mode=mode, patience=early_stopping_patience))
    if show_bar:
        callbacks.append(RichProgressBar())
    limit = int(limit_train_batches) if limit_train_batches > 1 else (
        None if limit_train_batches == 1.0 else limit_train_batches)
    trainer = pl.Trainer(
        accelerator=trainer_params.accelerator,
        devices=trainer_params.devices,
        num_nodes=trainer_params.num_nodes,
        strategy=trainer_params.strategy,
        precision=resolve_precision(trainer_params.precision, trainer_params.accelerator),
        deterministic=trainer_params.deterministic,
        max_epochs=max_epochs,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        enable_checkpointing=checkpoint is not None,
        enable_progress_bar=show_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        gradient_clip_val=gradient_clip_val or None,
        limit_train_batches=limit,
        log_every_n_steps=1,
        check_val_every_n_epoch=val_every,
    )
    return trainer, recorder, checkpoint
