"""What every training stage shares: params, rank checks, and one `fit` that trains and tracks a model."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from pipeline import plots, tracking
from pipeline.atomic import write_csv
from pipeline.training.module import ClassifierModule

CHECKPOINT_ROOT = Path(".cache/checkpoints")


def is_rank_zero() -> bool:
    """True in the process that owns outputs and MLflow (DDP children carry LOCAL_RANK/NODE_RANK)."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0


def seed_all(seed: int) -> None:
    pl.seed_everything(seed, workers=True, verbose=False)


@dataclass
class FitResult:
    run_id: str | None
    rows: list[dict[str, float]]
    best_val_acc: float
    best_val_loss: float
    epochs_run: int
    train_time_s: float
    best_checkpoint: Path | None
    counts: dict[str, int] = field(default_factory=dict)
    model_uri: str | None = None


def fit(
    module: ClassifierModule, datamodule: pl.LightningDataModule, *, trainer_params, epochs: int,
    experiment: str, run_name: str, tags: dict[str, str], log_params: dict[str, Any],
    input_shape: tuple[int, ...], checkpoint_name: str, monitor: str = "val_acc",
    patience: int | None = None, gradient_clip_val: float = 0.0, limit_train_batches: float = 1.0,
    extra_callbacks: list | None = None, label: str = "", log_model: bool = True,
    artifacts: list[tuple[Path, str]] | None = None, tracked: torch.nn.Module | None = None,
    example: torch.Tensor | None = None, parent_run_id: str | None = None, log_checkpoint: bool = True,
    val_every: int = 1, quiet: bool = False,
) -> FitResult:
    """Train `module` with Lightning, tracked in one MLflow run: params, counts, curves, best checkpoint, model.

    `tracked` is the deployable model whose counts and weights are logged (default: the module's model;
    it differs when only a head trains on cached features). Rank zero does all the logging; under DDP
    the other ranks return a result without a run id.
    """
    tracked = tracked if tracked is not None else module.model
    if parent_run_id:
        tags = tags | {"mlflow.parentRunId": parent_run_id}
    logger = tracking.make_logger(experiment, run_name, tags)
    run_id = None
    counts: dict[str, int] = {}
    if is_rank_zero():
        run_id = logger.run_id
        tracking.log_params(run_id, log_params)
        net = getattr(tracked, "net", tracked)
        counts = tracking.log_param_counts(run_id, tracked, input_shape, f"{run_name}", net=net, quiet=quiet)
        for path, artifact_dir in artifacts or []:
            tracking.log_artifact(run_id, path, artifact_dir)
    ckpt_dir = CHECKPOINT_ROOT / checkpoint_name
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    from pipeline.training.trainer import build_trainer

    trainer, recorder, checkpoint = build_trainer(
        trainer_params, epochs, logger=logger, checkpoint_dir=ckpt_dir, monitor=monitor,
        early_stopping_patience=patience, gradient_clip_val=gradient_clip_val,
        limit_train_batches=limit_train_batches, extra_callbacks=extra_callbacks, label=label,
        val_every=val_every, quiet=quiet,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    train_time = time.perf_counter() - start
    best_path = Path(checkpoint.best_model_path) if checkpoint and checkpoint.best_model_path else None
    if best_path is not None and best_path.exists():
        # Our own file, just written: the full Lightning checkpoint holds more than tensors.
        state = torch.load(best_path, map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(state)
    rows = recorder.rows
    val_accs = [r["val_acc"] for r in rows if "val_acc" in r]
    val_losses = [r["val_loss"] for r in rows if "val_loss" in r]
    best_i = int(np.argmax(val_accs)) if monitor == "val_acc" and val_accs else (
        int(np.argmin(val_losses)) if val_losses else 0)
    result = FitResult(
        run_id=run_id, rows=rows, best_val_acc=float(val_accs[best_i]) if val_accs else float("nan"),
        best_val_loss=float(val_losses[best_i]) if val_losses else float("nan"), epochs_run=len(rows),
        train_time_s=train_time, best_checkpoint=best_path, counts=counts,
    )
    if trainer.is_global_zero and run_id:
        tracking.log_metrics(run_id, {"best_val_acc": result.best_val_acc, "best_val_loss": result.best_val_loss,
                                      "epochs_run": result.epochs_run, "train_time_s": train_time})
        curves_dir = CHECKPOINT_ROOT / checkpoint_name / "curves"
        csv_path, png_path = curves_dir / "curves.csv", curves_dir / "learning_curves.png"
        if rows:
            write_csv(csv_path, rows)
            plots.learning_curves(rows, png_path, f"{run_name}: learning curves")
            tracking.log_artifact(run_id, csv_path, "curves")
            tracking.log_artifact(run_id, png_path, "curves")
        if log_checkpoint and best_path is not None and best_path.exists():
            tracking.log_artifact(run_id, best_path, "checkpoints")
        if log_model:
            if example is None:
                example = next(iter(datamodule.val_dataloader()))[0]
            result.model_uri = tracking.log_model(run_id, tracked, example)
    return result
