"""Callbacks own the side effects of training: per-epoch records and console lines, the best weights, and the
MLflow run (params, parameter counts and artifacts when fitting starts; curves, checkpoint and model at the end)."""

from __future__ import annotations

import contextlib
import math
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.rank import is_rank_zero

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

    # The rows travel in Lightning's checkpoints, so a resumed training keeps the epochs before the kill.
    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows = list(state_dict.get("rows", []))

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
        if self.print_lines and is_rank_zero():
            parts = " ".join(f"{k}={row[k]:.4g}" for k in CURVE_KEYS if k in row)
            print(f"{self.label}epoch {row['epoch']}/{trainer.max_epochs} {parts} ({seconds:.1f}s)", flush=True)


# What "better" means for each metric a training can monitor, said once.
MONITOR_MODES = {"val_acc": "max", "val_loss": "min"}


def best_row(rows: list[dict[str, float]], monitor: str) -> dict[str, float]:
    """The epoch the monitor prefers (val_acc: highest, val_loss: lowest), among validated epochs."""
    validated = [r for r in rows if monitor in r]
    if not validated:
        return {}
    pick = max if MONITOR_MODES[monitor] == "max" else min
    return pick(validated, key=lambda r: r[monitor])


class ChannelsLast(pl.Callback):
    """The model's convolution weights in NHWC (channels-last) layout when fitting starts: convolutions then
    run, and return activations, in that layout whatever the input's (the oneDNN and cuDNN rule)."""

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.to(memory_format=torch.channels_last)


class CompileModel(pl.Callback):
    """trainer.compile: the model's training and validation forward passes through torch.compile while it fits.

    The compiled wrapper lives beside the model, not in it: checkpoints, the logged model and everything after
    the fit see the plain model (same weights). The first steps pay the compilation (the seed CNN on 2 CPU cores:
    24 s, then 2x slower steps than eager: off by default; benchmarks/README.md)."""

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.__dict__["compiled"] = torch.compile(pl_module.model)  # bypasses nn.Module registration

    def teardown(self, trainer, pl_module, stage: str) -> None:
        pl_module.__dict__.pop("compiled", None)


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


class RestoreBest(pl.Callback):
    """When fitting ends, the module gets the weights of its best checkpoint (not of its last epoch)."""

    def on_fit_end(self, trainer, pl_module) -> None:
        from pipeline.training.fit import load_lightning_state

        path = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if path and Path(path).exists():
            pl_module.load_state_dict(load_lightning_state(Path(path)))


@dataclass
class RunSpec:
    """One training's MLflow run: where it goes, its name and tags, and what it logs besides the metrics."""

    experiment: str
    name: str
    tags: dict[str, str]
    params: dict[str, Any]
    input_shape: tuple[int, ...]  # the network's input, for its layer table
    tracked: nn.Module | None = None  # the deployable model (default: the module's model)
    example: torch.Tensor | None = None  # the logged model's input example (default: a validation batch)
    artifacts: list[tuple[Path, str]] = field(default_factory=list)
    log_model: bool = True
    log_checkpoint: bool = True
    parent_id: str | None = None
    quiet: bool = False  # no layer table on the console
    datasets: list = field(default_factory=list)  # (mlflow dataset, context): tracking.dataset_inputs
    register_as: str | None = None  # the logged model becomes a new version of this registered model

    def callback(self, run_id: str | None = None) -> MLflowTracking:
        """The tracking callback: a new run, or `run_id` continued (a resumed training)."""
        return MLflowTracking(self, run_id)


@contextlib.contextmanager
def untouched_rng():
    """Python's, NumPy's and torch's random states are the same after the block as before it."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(py_state)
    np.random.set_state(np_state)


class MLflowTracking(pl.Callback):
    """The run of one training; only rank zero writes to it. A failed or interrupted fit ends it FAILED
    (Lightning finalizes its logger so)."""

    def __init__(self, spec: RunSpec, run_id: str | None = None) -> None:
        from pipeline import tracking

        self.spec = spec
        tags = spec.tags | ({"mlflow.parentRunId": spec.parent_id} if spec.parent_id else {})
        self.logger = tracking.make_logger(spec.experiment, spec.name, tags, run_id=run_id)
        self.run_id: str | None = None
        self.counts: dict[str, int] = {}
        self.model_uri: str | None = None
        self.model_version: str | None = None
        self._start = 0.0

    def tracked(self, pl_module) -> nn.Module:
        return self.spec.tracked if self.spec.tracked is not None else pl_module.model

    def on_fit_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()
        if is_rank_zero():
            with untouched_rng():  # logging must not shift the dropout masks of the training that follows
                self._log_start(trainer, pl_module)

    def _log_start(self, trainer, pl_module) -> None:
        from pipeline import tracking

        self.run_id = self.logger.run_id
        tracking.log_params(self.run_id, self.spec.params | {"trainer.world_size": trainer.world_size})
        model = self.tracked(pl_module)
        self.counts = tracking.log_param_counts(self.run_id, model, self.spec.input_shape, self.spec.name,
                                                net=getattr(model, "net", model), quiet=self.spec.quiet)
        for path, artifact_dir in self.spec.artifacts:
            tracking.log_artifact(self.run_id, path, artifact_dir)
        if self.spec.datasets:
            tracking.log_inputs(self.run_id, self.spec.datasets)

    def on_fit_end(self, trainer, pl_module) -> None:
        if is_rank_zero() and self.run_id is not None:
            with untouched_rng():
                self._log_end(trainer, pl_module)

    def _log_end(self, trainer, pl_module) -> None:
        from pipeline import plots, tracking
        from pipeline.atomic import write_csv
        rows = next(cb for cb in trainer.callbacks if isinstance(cb, EpochRecorder)).rows
        ckpt = trainer.checkpoint_callback
        best = best_row(rows, ckpt.monitor)
        tracking.log_metrics(self.run_id, {"best_val_acc": best.get("val_acc"), "best_val_loss": best.get("val_loss"),
                                           "epochs_run": len(rows), "train_time_s": time.perf_counter() - self._start})
        with tempfile.TemporaryDirectory() as tmp:
            if rows:
                write_csv(Path(tmp) / "curves.csv", rows)
                plots.learning_curves(rows, Path(tmp) / "learning_curves.png", f"{self.spec.name}: learning curves")
                tracking.log_artifact(self.run_id, Path(tmp) / "curves.csv", "curves")
                tracking.log_artifact(self.run_id, Path(tmp) / "learning_curves.png", "curves")
        if self.spec.log_checkpoint and ckpt.best_model_path and Path(ckpt.best_model_path).exists():
            tracking.log_artifact(self.run_id, ckpt.best_model_path, "checkpoints")
        if self.spec.log_model:
            example = self.spec.example
            if example is None:
                example = next(iter(trainer.datamodule.val_dataloader()))[0]
            self.model_uri = tracking.log_model(self.run_id, self.tracked(pl_module), example)
            if self.spec.register_as:
                tags = {k: self.spec.tags[k] for k in ("dvc_experiment", "data_hash", "git_commit", "stage")
                        if k in self.spec.tags}
                tags["params_hash"] = tracking.params_hash(self.spec.params)
                tags["mlflow_run_id"] = self.run_id
                self.model_version = tracking.register(self.model_uri, self.spec.register_as, tags)
