"""`fit`: one training with Lightning. The Trainer comes from params.trainer; side effects are callbacks:
EpochRecorder (rows per epoch), ModelCheckpoint + RestoreBest (the best weights) and MLflowTracking (the run).
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch

from pipeline.errors import Interrupted, interrupted
from pipeline.rank import is_rank_zero
from pipeline.training.callbacks import RestoreBest, RunSpec, StopOnNonFinite, best_row
from pipeline.training.trainer import build_trainer

CHECKPOINT_ROOT = Path(".cache/checkpoints")


@dataclass(frozen=True)
class FitConfig:
    """How a training runs: everything but the model, the data and the tracking."""

    trainer: object  # params.TrainerParams
    epochs: int
    monitor: str = "val_acc"  # picks the best checkpoint (and stops early, with patience)
    patience: int | None = None  # early stopping; None: off
    gradient_clip_val: float = 0.0
    limit_train_batches: float = 1.0
    val_every: int = 1  # validate every n epochs
    label: str = ""  # prefix of the per-epoch console lines
    quiet: bool = False  # no per-epoch lines, no layer table (sweeps)
    keep_checkpoint: bool = False  # keep the run's checkpoint folder (the caller copies and removes it)
    resume_key: str | None = None  # trainings with a key resume from their last checkpoint after a kill
    callbacks: tuple = ()

    @classmethod
    def from_params(cls, train, trainer, **overrides) -> FitConfig:
        """From the params.train and params.trainer sections."""
        stop = train.early_stopping
        return cls(trainer=trainer, epochs=train.epochs, monitor=train.monitor,
                   patience=stop.patience if stop.enabled else None, gradient_clip_val=train.gradient_clip_val,
                   limit_train_batches=train.limit_train_batches, **overrides)


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
    model_version: str | None = None  # the registered model's new version, when the run registered one
    world_size: int = 1  # processes that trained (devices x nodes under DDP)


@dataclass(frozen=True)
class Resume:
    """Where a training checkpoints, and what a killed run with the same key left to resume from."""

    folder: Path
    checkpoint: Path | None = None  # its last.ckpt, readable
    run_id: str | None = None  # its MLflow run, which continues
    epochs_done: int = 0


def checkpoint_folder(key: str | None) -> Resume:
    """Each training checkpoints into its own folder. A keyed one (same stage, params and data) finds the
    folder a killed run left behind: its last checkpoint and its MLflow run id, to resume from. A last checkpoint
    that cannot be read (the kill came while Lightning wrote it) is set aside and the training starts over."""
    CHECKPOINT_ROOT.mkdir(parents=True, exist_ok=True)
    if key is None:
        return Resume(Path(tempfile.mkdtemp(prefix="run-", dir=CHECKPOINT_ROOT)))
    folder = CHECKPOINT_ROOT / f"resume-{key}"
    stage = key.rsplit("-", 1)[0]
    if (folder / "last.ckpt").exists():
        run_file = folder / "mlflow_run_id"
        run_id = run_file.read_text().strip() if run_file.exists() else None
        epochs_done, problem = read_epoch(folder / "last.ckpt")
        if problem is None:
            return Resume(folder, folder / "last.ckpt", run_id, epochs_done)
        aside = CHECKPOINT_ROOT / "unreadable" / f"{key}-{time.strftime('%Y%m%d-%H%M%S')}-last.ckpt"
        aside.parent.mkdir(parents=True, exist_ok=True)
        (folder / "last.ckpt").replace(aside)
        print(f"{stage}: the checkpoint to resume from cannot be read ({problem}); it is set aside as {aside} "
              "and this training starts over", flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if any(p != folder for p in CHECKPOINT_ROOT.glob(f"resume-{stage}-*")):
        print(f"{stage}: an interrupted training with other params or data exists; this one starts over", flush=True)
    return Resume(folder)


def read_epoch(path: Path) -> tuple[int, str | None]:
    """The epochs a Lightning checkpoint holds, or why it cannot be resumed from (a truncated or foreign file).
    Our own file: a full pickle (Lightning writes more than tensors)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
        payload["state_dict"]
        return int(payload["epoch"]) + 1, None
    except Exception as exc:  # a torn zip, a pickle error, an EOF, a file without the keys: all one answer
        return 0, f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"


def fit(module: pl.LightningModule, datamodule: pl.LightningDataModule, config: FitConfig,
        run: RunSpec | None = None) -> FitResult:
    """Train `module`; with `run` the training is one MLflow run (see callbacks.MLflowTracking). The best
    checkpoint's weights are in `module` afterwards. A keyed training killed midway resumes on the next call."""
    resume = checkpoint_folder(config.resume_key)
    ckpt_dir, resume_from, run_id = resume.folder, resume.checkpoint, resume.run_id
    if resume_from is not None:
        print(f"{config.label or 'fit: '}resuming after epoch {resume.epochs_done} from {resume_from} (MLflow run "
              f"{run_id} continues)", flush=True)
    tracker = run.callback(run_id) if run is not None else None
    if tracker is not None and config.resume_key and is_rank_zero():
        (ckpt_dir / "mlflow_run_id").write_text(tracker.logger.run_id)
    trainer, recorder, checkpoint = build_trainer(
        config, ckpt_dir, logger=tracker.logger if tracker else None,
        callbacks=[StopOnNonFinite(), RestoreBest(), *([tracker] if tracker else []), *config.callbacks])
    try:
        start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
        train_time = time.perf_counter() - start
        if trainer.interrupted:  # Lightning stops quietly on SIGTERM: a stopped training is not a result
            raise interrupted() or Interrupted(signal.SIGTERM)
    except SystemExit:
        # Lightning ends an interrupted fit with exit(0/1) after closing its run (FAILED); say which signal.
        raise (interrupted() or Interrupted(signal.SIGINT)) from None
    except BaseException:
        if not config.resume_key:  # a keyed training keeps its folder to resume from
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        raise
    if not config.keep_checkpoint:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    best = best_row(recorder.rows, config.monitor)
    path = Path(checkpoint.best_model_path) if checkpoint.best_model_path else None
    return FitResult(
        run_id=tracker.run_id if tracker else None, rows=recorder.rows,
        best_val_acc=float(best.get("val_acc", float("nan"))), best_val_loss=float(best.get("val_loss", float("nan"))),
        epochs_run=len(recorder.rows), train_time_s=train_time,
        best_checkpoint=path if config.keep_checkpoint and path and path.exists() else None,
        counts=tracker.counts if tracker else {}, model_uri=tracker.model_uri if tracker else None,
        model_version=tracker.model_version if tracker else None, world_size=trainer.world_size,
    )


def seed_all(seed: int) -> None:
    pl.seed_everything(seed, workers=True, verbose=False)


def load_lightning_state(path: Path) -> dict[str, torch.Tensor]:
    """The module's weights from a Lightning checkpoint this process wrote (full pickle: our own file)."""
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
