"""The Lightning Trainer, built from params.trainer: the GPU when there is one, the CPU otherwise."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar

from pipeline.errors import PipelineError
from pipeline.training.callbacks import MONITOR_MODES, ChannelsLast, CompileModel, EpochRecorder


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


def build_trainer(config, checkpoint_dir: Path, logger=None, callbacks: list | None = None,
                  ) -> tuple[pl.Trainer, EpochRecorder, ModelCheckpoint]:
    """A Trainer for a FitConfig, plus the callbacks fit reads back (the epoch recorder, the checkpoint)."""
    tp = config.trainer
    if tp.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise PipelineError(f"trainer.accelerator={tp.accelerator}: this machine has no CUDA GPU "
                            "(use auto, which picks the GPU when there is one, or cpu)")
    configure_determinism(tp.deterministic)
    # Lightning's banners ("GPU available: False", tips) say nothing the stage does not say itself.
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    show_bar = interactive() and not config.quiet
    recorder = EpochRecorder(print_lines=not show_bar and not config.quiet, label=config.label)
    mode = MONITOR_MODES[config.monitor]
    checkpoint = ModelCheckpoint(dirpath=checkpoint_dir, filename="best", monitor=config.monitor, mode=mode,
                                 save_top_k=1, save_last=True, enable_version_counter=False)
    callbacks = [recorder, *(callbacks or []), checkpoint, *([ChannelsLast()] if tp.channels_last else []),
                 *([CompileModel()] if tp.compile else [])]
    if config.patience:
        callbacks.append(EarlyStopping(monitor=config.monitor, mode=mode, patience=config.patience))
    if show_bar:
        callbacks.append(RichProgressBar())
    limit = config.limit_train_batches
    limit = int(limit) if limit > 1 else (None if limit == 1.0 else limit)
    trainer = pl.Trainer(
        accelerator=tp.accelerator,
        devices=tp.devices,
        num_nodes=tp.num_nodes,
        strategy=tp.strategy,
        precision=resolve_precision(tp.precision, tp.accelerator),
        deterministic=tp.deterministic,
        max_epochs=config.epochs,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        enable_progress_bar=show_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        gradient_clip_val=config.gradient_clip_val or None,
        limit_train_batches=limit,
        log_every_n_steps=1,
        check_val_every_n_epoch=config.val_every,
    )
    return trainer, recorder, checkpoint
