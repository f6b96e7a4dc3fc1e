"""`fit`: one training with Lightning, and what happened as a value (FitResult).

The Trainer comes from params.trainer (the GPU when there is one, the CPU otherwise; Lightning's own DDP when
asked). Callbacks do in-loop work only: EpochRecorder keeps a row per epoch, StopOnNonFinite stops a diverged
training, ModelCheckpoint keeps the best and the last weights. After training, the module holds the best
checkpoint's weights. The MLflow run is Lightning's MLflow logger (live per-epoch metrics); everything else the
run gets is published by the stage afterwards (pipeline.tracking.publish_training).

A keyed training (`FitConfig.resume_key`: the stage, its params and data) killed midway resumes from its last
epoch on the next call, in the same MLflow run; a last checkpoint that cannot be read is set aside, and the
training starts over.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar

from pipeline import tracking
from pipeline.errors import Interrupted, PipelineError, interrupted
from pipeline.params import TrainerParams, TrainParams
from pipeline.rank import is_rank_zero
from pipeline.training.module import MONITOR_MODES

CHECKPOINT_ROOT = Path(".cache/checkpoints")
CURVE_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")
NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"  # Lightning sets it to 1 when imported


def skip_nvml_without_a_driver() -> bool:
    """Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1 when it is imported (a CUDA check that does not initialize
    CUDA, so that forked workers stay usable on a GPU machine). torch then answers every torch.cuda.is_available()
    by loading libnvidia-ml first, and Adam asks on every step: on a machine without an NVIDIA driver the failed
    load costs 0.1-0.4 ms a step (benchmarks/README.md) to reach torch's plain check anyway. Where the library
    cannot be loaded there is no NVIDIA GPU: the check goes straight to the plain one (same answer, 14 us).
    True when it was dropped."""
    import ctypes

    if os.environ.get(NVML_CHECK) != "1":
        return False
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        del os.environ[NVML_CHECK]
        return True
    return False


skip_nvml_without_a_driver()  # at import, right after Lightning's own import set the variable


@dataclass(frozen=True)
class FitConfig:
    """How a training runs: everything but the model, the data and the run."""

    trainer: TrainerParams
    epochs: int
    monitor: str = "val_acc"  # picks the best checkpoint (and stops early, with patience)
    patience: int | None = None  # early stopping; None: off
    gradient_clip_val: float = 0.0
    limit_train_batches: float = 1.0
    label: str = ""  # prefix of the per-epoch console lines
    quiet: bool = False  # no per-epoch lines (sweeps)
    resume_key: str | None = None  # trainings with a key resume from their last checkpoint after a kill
    callbacks: tuple = ()  # more in-loop callbacks (benchmarks' timers)

    @classmethod
    def from_train(cls, train: TrainParams, trainer: TrainerParams, **overrides) -> FitConfig:
        """From the params.train and params.trainer sections."""
        stop = train.early_stopping
        return cls(trainer=trainer, epochs=train.epochs, monitor=train.monitor,
                   patience=stop.patience if stop.enabled else None, gradient_clip_val=train.gradient_clip_val,
                   limit_train_batches=train.limit_train_batches, **overrides)


def trained_with(world_size: int, precision) -> dict[str, str]:
    """The params a training's run gets from its Trainer: the processes DDP started, the precision auto chose."""
    return {"trainer.world_size": str(world_size), "trainer.precision_used": str(precision)}


@dataclass
class FitResult:
    """What a training did: a row per epoch, its best epoch, time, processes, its MLflow run and checkpoint."""

    rows: list[dict[str, float]]
    best: dict[str, float]  # the row of the epoch the monitor prefers
    train_time_s: float
    world_size: int  # processes that trained (devices x nodes under DDP)
    precision: str = "32-true"  # the precision Lightning trained in (what `auto` chose)
    run_id: str | None = None
    checkpoint_dir: Path | None = None  # best.ckpt and last.ckpt, kept for the caller (keep_checkpoint)
    last_state: dict | None = None  # the network's weights at the last epoch (trainings kept in memory)

    @property
    def run_params(self) -> dict[str, str]:
        """What its MLflow run gets from the Trainer (a sweep's runs are recorded after the training)."""
        return trained_with(self.world_size, self.precision)

    @property
    def epochs_run(self) -> int:
        return len(self.rows)

    @property
    def best_val_acc(self) -> float:
        return float(self.best.get("val_acc", math.nan))

    @property
    def best_val_loss(self) -> float:
        return float(self.best.get("val_loss", math.nan))

    @property
    def best_checkpoint(self) -> Path | None:
        path = self.checkpoint_dir / "best.ckpt" if self.checkpoint_dir else None
        return path if path and path.exists() else None

    def discard_checkpoints(self) -> None:
        if self.checkpoint_dir is not None:
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)


def best_row(rows: list[dict[str, float]], monitor: str) -> dict[str, float]:
    """The epoch the monitor prefers (val_acc: highest, val_loss: lowest), among validated epochs."""
    validated = [r for r in rows if monitor in r]
    if not validated:
        return {}
    pick = max if MONITOR_MODES[monitor] == "max" else min
    return pick(validated, key=lambda r: r[monitor])


# ----------------------------------------------------------------------------------------- callbacks
class EpochRecorder(pl.Callback):
    """One row per epoch (losses, accuracies, lr, epoch time); epoch time and lr also go to the logger."""

    def __init__(self, print_lines: bool = False, label: str = "") -> None:
        self.rows: list[dict[str, float]] = []
        self.print_lines, self.label = print_lines, label
        self._start = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    # The rows travel in Lightning's checkpoints, so a resumed training keeps the epochs before the kill.
    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows = list(state_dict.get("rows", []))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        seconds = time.perf_counter() - self._start
        m = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch + 1, "step": trainer.global_step}
        row |= {k: round(float(m[k]), 6) for k in CURVE_KEYS[:4] if k in m}
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        row |= {"lr": lr, "epoch_time_s": round(seconds, 4)}
        self.rows.append(row)
        if trainer.logger is not None:
            trainer.logger.log_metrics({"epoch_time_s": seconds, "lr": lr}, step=trainer.global_step)
        if self.print_lines and is_rank_zero():
            parts = " ".join(f"{k}={row[k]:.4g}" for k in CURVE_KEYS if k in row)
            print(f"{self.label}epoch {row['epoch']}/{trainer.max_epochs} {parts} ({seconds:.1f}s)", flush=True)


class StopOnNonFinite(pl.Callback):
    """A diverged training stops with one line (which epoch, which metric) instead of publishing a NaN model."""

    def _check(self, trainer, keys: tuple[str, ...]) -> None:
        for key in keys:
            value = trainer.callback_metrics.get(key)
            if value is not None and not math.isfinite(float(value)):
                lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
                raise PipelineError(f"training diverged: {key} is {float(value)} at epoch {trainer.current_epoch + 1} "
                                    f"(lr {lr:g}); lower the learning rate or set gradient clipping")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._check(trainer, ("train_loss",))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._check(trainer, ("val_loss",))


class KeepBest(pl.Callback):
    """ModelCheckpoint's top-1 rule kept in memory, for trainings that neither resume nor hand files on (the
    sweeps' and claims' many short ones): after each epoch's validation the weights are copied when the monitor
    strictly improved (the first validated epoch always), and the last epoch's weights at the end. A copy is a
    few milliseconds; a checkpoint file was 10-20 ms a save (claims: 750 of them, benchmarks/README.md)."""

    def __init__(self, monitor: str) -> None:
        self.monitor, self.mode = monitor, MONITOR_MODES[monitor]
        self.best_score: float | None = None
        self.best_state: dict | None = None
        self.last_state: dict | None = None

    @staticmethod
    def _copy(pl_module) -> dict:
        return {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # where ModelCheckpoint saves: after validation
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        score = float(value)
        if math.isnan(score):
            score = -math.inf if self.mode == "max" else math.inf
        better = self.best_score is None or (score > self.best_score if self.mode == "max" else score < self.best_score)
        if better:
            self.best_score, self.best_state = score, self._copy(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.last_state = self._copy(pl_module)


# ------------------------------------------------------------------------------------------- trainer
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX tiles): detected, never assumed."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and check() for check in checks)


def has_strided_depthwise(model: torch.nn.Module | None) -> bool:
    """Whether a model has a depthwise convolution with a stride (MobileNet's, EfficientNet's downsampling ones):
    its backward in bf16 takes a slow path on the CPU (64 images of 96 channels at 16x16, stride 2: 32 ms against
    4.6 ms in fp32; at stride 1: 6.2 against 6.4 ms)."""
    return model is not None and any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
                                     and max(m.stride) > 1 for m in model.modules())


def resolve_precision(precision: str, accelerator: str, model: torch.nn.Module | None = None) -> str:
    """`auto`: bf16 mixed on GPUs that support it, fp16 mixed on older GPUs; on the CPU bf16 mixed where it has
    native bf16, for models without strided depthwise convolutions (the seed CNN's step: 2x faster, accuracy
    measured the same; MobileNetV2's: 282 against 191 ms in fp32, so such models stay fp32; the end of a frozen
    EfficientNet-Lite0, whose depthwise convolutions have no stride, steps 38 -> 28 ms; benchmarks/README.md),
    32-bit elsewhere."""
    if precision != "auto":
        return precision
    on_gpu = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    if on_gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_bf16() and not has_strided_depthwise(model) else "32-true"


AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def inference_autocast(precision: str, accelerator: str) -> torch.dtype | None:
    """The autocast dtype for a forward-only pass that trainings of this precision would use, for any model (no
    backward: strided depthwise convolutions run fast forward in bf16; EfficientNet-Lite0's features at 224 px:
    0.39 s against 1.0-1.1 s in fp32 for 32 images); None: fp32."""
    return AUTOCAST_DTYPES.get(resolve_precision(precision, accelerator))


def interactive() -> bool:
    """A rich progress bar in a terminal; one plain line per epoch under CI or in a log file."""
    return sys.stdout.isatty() and not os.environ.get("CI")


def build_trainer(config: FitConfig, checkpoint_dir: Path | None, logger=None, save_last: bool = True,
                  model: torch.nn.Module | None = None) -> tuple[pl.Trainer, EpochRecorder]:
    """A Trainer for a FitConfig, and the epoch recorder whose rows fit returns. `save_last`: the last epoch's
    checkpoint too (to resume from, or for the caller), not only the best one. Without a `checkpoint_dir` the
    best and the last weights stay in memory (a KeepBest callback) and no file is written."""
    tp = config.trainer
    if tp.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise PipelineError(f"trainer.accelerator={tp.accelerator}: this machine has no CUDA GPU "
                            "(use auto, which picks the GPU when there is one, or cpu)")
    if tp.deterministic:  # cuBLAS needs this for deterministic matmuls on the GPU; harmless on the CPU
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Lightning's banners ("GPU available: False", tips) say nothing the stage does not say itself.
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    show_bar = interactive() and not config.quiet
    recorder = EpochRecorder(print_lines=not show_bar and not config.quiet, label=config.label)
    mode = MONITOR_MODES[config.monitor]
    callbacks = [recorder, StopOnNonFinite(), *config.callbacks]
    if checkpoint_dir is None:
        callbacks.append(KeepBest(config.monitor))
    else:
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, filename="best", monitor=config.monitor, mode=mode,
                                         save_top_k=1, enable_version_counter=False))
    if save_last and checkpoint_dir is not None:  # every epoch's end (ModelCheckpoint's own save_last writes only
        # when a new best is saved)
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, filename="last", monitor=None, save_top_k=1,
                                         enable_version_counter=False))
    if config.patience:
        callbacks.append(EarlyStopping(monitor=config.monitor, mode=mode, patience=config.patience))
    if show_bar:
        callbacks.append(RichProgressBar())
    limit = config.limit_train_batches
    limit = int(limit) if limit > 1 else (None if limit == 1.0 else limit)
    trainer = pl.Trainer(
        accelerator=tp.accelerator, devices=tp.devices, num_nodes=tp.num_nodes, strategy=tp.strategy,
        precision=resolve_precision(tp.precision, tp.accelerator, model), deterministic=tp.deterministic,
        max_epochs=config.epochs, logger=logger if logger is not None else False, callbacks=callbacks,
        enable_progress_bar=show_bar, enable_model_summary=False, num_sanity_val_steps=0,
        gradient_clip_val=config.gradient_clip_val or None, limit_train_batches=limit, log_every_n_steps=1,
        enable_checkpointing=checkpoint_dir is not None,
    )
    return trainer, recorder


# -------------------------------------------------------------------------------------------- resume
@dataclass(frozen=True)
class Resume:
    """Where a training checkpoints, and what a killed run with the same key left to resume from."""

    folder: Path | None  # None: a training kept in memory
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


# ----------------------------------------------------------------------------------------------- fit
def fit(module: pl.LightningModule, datamodule: pl.LightningDataModule, config: FitConfig,
        run: tracking.RunInfo | None = None, keep_checkpoint: bool = False) -> FitResult:
    """Train `module` on `datamodule`; with `run`, in that MLflow run, live (a new run, or the killed one
    resumed): per-epoch metrics as they come. Without one the caller logs what happened afterwards (a sweep's many
    short trainings: tracking.log_rows). Afterwards the module holds the best checkpoint's weights;
    `keep_checkpoint` leaves the best and the last checkpoint to the caller (FitResult.discard_checkpoints).
    A training that neither resumes nor keeps its checkpoint writes none: its best and last weights stay in
    memory (FitResult.last_state)."""
    in_memory = config.resume_key is None and not keep_checkpoint
    resume = Resume(None) if in_memory else checkpoint_folder(config.resume_key)
    if resume.checkpoint is not None:
        print(f"{config.label or 'fit: '}resuming after epoch {resume.epochs_done} from {resume.checkpoint} "
              f"(MLflow run {resume.run_id} continues)", flush=True)
    logger = tracking.training_logger(run, resume.run_id) if run is not None else None
    run_id = logger.run_id if logger is not None and is_rank_zero() else None
    if run_id and config.resume_key:
        (resume.folder / "mlflow_run_id").write_text(run_id)
    trainer, recorder = build_trainer(config, resume.folder, logger, save_last=bool(config.resume_key or keep_checkpoint),
                                      model=module)
    if run_id:  # the processes DDP starts, and the precision auto chose
        tracking.log_params(run_id, trained_with(trainer.world_size, trainer.precision))
    if config.trainer.channels_last:  # NHWC convolution weights: activations follow (the oneDNN and cuDNN rule)
        module.to(memory_format=torch.channels_last)
    if config.trainer.compile:  # beside the model, not in it: checkpoints and the logged model stay plain
        module.__dict__["compiled"] = torch.compile(module.model)
    try:
        start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume.checkpoint)
        train_time = time.perf_counter() - start
        if trainer.interrupted:  # Lightning stops quietly on SIGTERM: a stopped training is not a result
            raise interrupted() or Interrupted(signal.SIGTERM)
    except SystemExit:
        # Lightning ends an interrupted fit with exit(0/1) after closing its run (FAILED); say which signal.
        raise (interrupted() or Interrupted(signal.SIGINT)) from None
    except BaseException:
        if not config.resume_key and resume.folder is not None:  # a keyed training keeps its folder to resume from
            shutil.rmtree(resume.folder, ignore_errors=True)
        raise
    finally:
        module.__dict__.pop("compiled", None)
    last_state = None
    if in_memory:
        kept = next(cb for cb in trainer.callbacks if isinstance(cb, KeepBest))
        if kept.best_state is not None:  # the best epoch's weights, not the last epoch's
            module.load_state_dict(kept.best_state)
        last_state = {k[len("model."):]: v for k, v in (kept.last_state or {}).items() if k.startswith("model.")}
    else:
        best = Path(trainer.checkpoint_callback.best_model_path or "")
        if best.is_file():  # the best epoch's weights, not the last epoch's
            module.load_state_dict(torch.load(best, map_location="cpu", weights_only=False)["state_dict"])
    result = FitResult(rows=recorder.rows, best=best_row(recorder.rows, config.monitor), train_time_s=train_time,
                       world_size=trainer.world_size, precision=str(trainer.precision), run_id=run_id,
                       checkpoint_dir=resume.folder, last_state=last_state)
    if not keep_checkpoint:
        result.discard_checkpoints()
        result.checkpoint_dir = None
    return result


def seed_all(seed: int) -> None:
    pl.seed_everything(seed, workers=True, verbose=False)
