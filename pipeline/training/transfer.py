"""How transfer learning trains one sweep point: where the base's weights come from, and each strategy, by name.

feature_extraction  base frozen; the head trains on the base's features, computed once per task (cached)
fine_tuning         that head, then the whole network (or its last unfreeze_blocks), the base at
                    lr * backbone_lr_factor, BatchNorm frozen
scratch             our own CNN (transfer.scratch_model) from scratch on the same images: the baseline to beat
scratch_backbone    the same backbone from random weights: what pretraining adds to it

Every training reads its recipe from the task's transfer section (a RecipeParams: optimizer, lr, weight decay,
label smoothing, schedule, ...). A point returns its row and what its MLflow run gets; the stage publishes the
runs after it has published its outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline import params as params_mod
from pipeline import tasks, tracking
from pipeline.data.datamodule import ImageDataModule, TensorDataModule
from pipeline.data.prepared import PreparedData, class_subset
from pipeline.models import checkpoint
from pipeline.models.cnn import CNN, Classifier, preset, spec_from_params
from pipeline.models.transfer import (
    HeadOnly,
    TransferNet,
    extract_features,
    freeze_base,
    freeze_batchnorm,
    load_base_from_checkpoint,
    load_imagenet_base,
)
from pipeline.predict import accuracy, device_for, predict_proba
from pipeline.training.fit import FitConfig, FitResult, fit, seed_all
from pipeline.training.module import ClassifierModule


@dataclass
class Setup:
    """What every training of a task's sweep shares."""

    p: params_mod.Params
    task: tasks.Task
    data: PreparedData
    classes: list[int]
    splits: dict  # the target classes' train/val/test, labels remapped to 0..k-1
    mean: tuple
    std: tuple
    channels: int
    base_state: dict | None
    augmentation: object
    parent_id: str | None = None
    features: dict | None = None  # the frozen base's features of every target image, computed once
    heads: dict = field(default_factory=dict)  # (N, seed) -> the trained feature-extraction head

    @property
    def tp(self) -> params_mod.TransferParams:
        return self.task.section(self.p, "transfer")

    def new_model(self, with_base: bool) -> Classifier:
        tp = self.tp
        net = TransferNet(tp.backbone, len(self.classes), tp.head_units, tp.head_dropout, tp.image_size,
                          self.channels)
        if with_base and self.base_state is not None:
            net.base.load_state_dict(self.base_state)
        return Classifier(net, self.mean, self.std, self.channels,
                          tp.image_size if tp.image_size != self.data.image_size else None)


@dataclass
class Point:
    """One (N, seed) of a sweep: the indices of its training and validation images."""

    n: int
    seed: int
    train: np.ndarray
    val: np.ndarray


@dataclass
class Trained:
    """One (N, seed, strategy): its row of the sweep, its model and what its run is still to get."""

    row: dict
    model: Classifier
    arch: dict
    run_id: str | None
    result: FitResult


def epochs_for(steps: int, n_train: int, batch_size: int) -> int:
    """Epochs that make `steps` optimizer steps (the loader drops a short last batch)."""
    per_epoch = max(1, n_train // batch_size) if n_train > batch_size else 1
    return max(1, math.ceil(steps / per_epoch))


# ------------------------------------------------------------------------------------- base weights
def _imagenet(s_p, tp, data, arch, channels, augmentation):
    net = TransferNet(tp.backbone, 2, tp.head_units, 0.0, tp.image_size, channels)
    load_imagenet_base(net)
    return net.base.state_dict(), *arch.imagenet_norm


def _none(s_p, tp, data, arch, channels, augmentation):
    return None, tuple(data.mean), tuple(data.std)


def _checkpoint(s_p, tp, data, arch, channels, augmentation):
    net = TransferNet(tp.backbone, 2, tp.head_units, 0.0, tp.image_size, channels)
    load_base_from_checkpoint(net, Path(tp.weights))
    return net.base.state_dict(), tuple(data.mean), tuple(data.std)


def _source_task(p, tp, data, arch, channels, augmentation):
    """Pretrain the backbone here, on transfer.source_classes of the prepared data."""
    seed_all(p.seed)
    net = TransferNet(tp.backbone, len(tp.source_classes), tp.head_units, tp.head_dropout, tp.image_size, channels)
    model = Classifier(net, data.mean, data.std, channels, tp.image_size)
    print(f"transfer_learn: pretraining {tp.backbone} on source classes {tp.source_classes}", flush=True)
    run = tracking.RunInfo(p.mlflow.experiment, f"transfer_learn/pretrain/{tp.backbone}",
                           tracking.run_tags("transfer_learn", tp.backbone, data.data_hash)
                           | {"strategy": "pretrain_source"}, params_mod.flatten({"transfer": tp}))
    dm = ImageDataModule(class_subset(data, tp.source_classes), tp.batch_size, p.seed, augmentation,
                         batched=p.trainer.batched_augment, num_workers=p.trainer.num_workers)
    fit(ClassifierModule(model, tp), dm, FitConfig(p.trainer, tp.pretrain_epochs, monitor=tp.monitor,
                                                   gradient_clip_val=tp.gradient_clip_val, label="pretrain "), run)
    return net.base.state_dict(), tuple(data.mean), tuple(data.std)


WEIGHT_SOURCES = {"imagenet": _imagenet, "none": _none, "source_task": _source_task}


def base_weights(p, tp, data: PreparedData, arch, channels: int, augmentation) -> tuple[dict | None, tuple, tuple]:
    """The base's starting weights (transfer.weights: a source by name, else a checkpoint path) and the
    normalization that goes with them."""
    return WEIGHT_SOURCES.get(tp.weights, _checkpoint)(p, tp, data, arch, channels, augmentation)


# ---------------------------------------------------------------------------------------- strategies
def _run(s: Setup, pt: Point, strategy: str) -> tracking.RunInfo:
    tp = s.tp
    tags = tracking.run_tags(s.task.stage("transfer_learn"), tp.backbone, s.data.data_hash) | {
        "task": s.task.name, "strategy": strategy, "target_per_class": str(pt.n), "sweep_seed": str(pt.seed),
        "weights": tp.weights}
    logged = params_mod.flatten({"transfer": tp}) | {"task": s.task.name, "strategy": strategy, "n": pt.n,
                                                     "sweep_seed": pt.seed}
    return tracking.RunInfo(s.p.mlflow.experiment, f"{s.task.stage('transfer_learn')}/n{pt.n}/seed{pt.seed}/{strategy}",
                            tags, logged, parent_id=s.parent_id)


def _config(s: Setup, pt: Point, steps: int) -> FitConfig:
    tp = s.tp
    epochs = epochs_for(steps, len(pt.train), tp.batch_size)
    return FitConfig(s.p.trainer, epochs, monitor=tp.monitor, gradient_clip_val=tp.gradient_clip_val,
                     val_every=max(1, epochs // 5), quiet=True)


def _transfer_arch(s: Setup) -> dict:
    tp = s.tp
    return checkpoint.transfer_arch(tp.backbone, len(s.classes), tp.head_units, tp.head_dropout, tp.image_size,
                                    s.channels)


def feature_extraction(s: Setup, pt: Point) -> tuple[FitResult, Classifier, dict, np.ndarray]:
    """Frozen base; the head trains on the cached features for head_steps. Its head also starts fine_tuning."""
    tp = s.tp
    model = s.new_model(with_base=True)
    freeze_base(model.net, 0)
    f, (_, y), (_, yv) = s.features, s.splits["train"], s.splits["val"]
    dm = TensorDataModule((f["train"][pt.train], torch.as_tensor(y[pt.train])),
                          (f["val"][pt.val], torch.as_tensor(yv[pt.val])), tp.batch_size, s.p.seed + pt.seed)
    result = fit(ClassifierModule(HeadOnly(model.net.head), tp), dm, _config(s, pt, tp.head_steps),
                 _run(s, pt, "feature_extraction"))
    model.cpu()
    s.heads[(pt.n, pt.seed)] = {k: v.clone() for k, v in model.net.head.state_dict().items()}
    test_pred = model.net.head.eval()(s.features["test"].cpu()).argmax(1).numpy()
    return result, model, _transfer_arch(s), test_pred


def fine_tuning(s: Setup, pt: Point) -> tuple[FitResult, Classifier, dict, np.ndarray]:
    """Chollet's recipe: the feature-extraction head first, then the whole network (the last unfreeze_blocks
    of the base) for `steps` at lr, the base at lr * backbone_lr_factor, its BatchNorm layers frozen."""
    tp = s.tp
    if (pt.n, pt.seed) not in s.heads:
        feature_extraction(s, pt)
    model = s.new_model(with_base=True)
    model.net.head.load_state_dict(s.heads[(pt.n, pt.seed)])
    freeze_base(model.net, tp.unfreeze_blocks)
    freeze_batchnorm(model.net.base)
    module = ClassifierModule(model, tp, base_lr_factor=tp.backbone_lr_factor)
    return _train_images(s, pt, "fine_tuning", module, tp.steps, _transfer_arch(s))


def scratch(s: Setup, pt: Point) -> tuple[FitResult, Classifier, dict, np.ndarray]:
    """Our own CNN (transfer.scratch_model: params.model or a preset by name), from scratch, for cnn_steps, at
    transfer.scratch_image_size: the small-model baseline of the textbook (Chollet trains a small convnet from
    scratch before reusing a pretrained one)."""
    tp = s.tp
    spec = spec_from_params(s.p.model) if tp.scratch_model == "model" else preset(tp.scratch_model)
    size = tp.scratch_image_size or s.data.image_size
    net = CNN(spec, s.data.channels, size, len(s.classes))
    model = Classifier(net, s.data.mean, s.data.std, s.data.channels, size if size != s.data.image_size else None)
    return _train_images(s, pt, "scratch", ClassifierModule(model, tp), tp.cnn_steps,
                         checkpoint.cnn_arch(spec, s.data.channels, size, len(s.classes)))


def scratch_backbone(s: Setup, pt: Point) -> tuple[FitResult, Classifier, dict, np.ndarray]:
    """The same backbone from random weights, for the same `steps` as fine_tuning: what pretraining adds."""
    return _train_images(s, pt, "scratch_backbone", ClassifierModule(s.new_model(with_base=False), s.tp),
                         s.tp.steps, _transfer_arch(s))


def _train_images(s: Setup, pt: Point, strategy: str, module: ClassifierModule, steps: int,
                  arch: dict) -> tuple[FitResult, Classifier, dict, np.ndarray]:
    (x, y), (xv, yv) = s.splits["train"], s.splits["val"]
    dm = ImageDataModule({"train": (x[pt.train], y[pt.train]), "val": (xv[pt.val], yv[pt.val])}, s.tp.batch_size,
                         s.p.seed + pt.seed, s.augmentation, batched=s.p.trainer.batched_augment,
                         num_workers=s.p.trainer.num_workers)
    result = fit(module, dm, _config(s, pt, steps), _run(s, pt, strategy))
    model = module.model
    test_pred = predict_proba(model, s.splits["test"][0], s.data.image_size,
                              device=device_for(s.p.trainer.accelerator)).argmax(1)
    return result, model.cpu(), arch, test_pred


STRATEGIES = {"feature_extraction": feature_extraction, "fine_tuning": fine_tuning, "scratch": scratch,
              "scratch_backbone": scratch_backbone}


def cache_features(s: Setup) -> None:
    """The frozen base's features of every target image, once per task: what the heads train and test on."""
    frozen, device = s.new_model(with_base=True), device_for(s.p.trainer.accelerator)
    s.features = {k: extract_features(frozen, v[0], device=device, channels_last=s.p.trainer.channels_last)
                  for k, v in s.splits.items()}


def train_one(s: Setup, strategy: str, pt: Point) -> Trained:
    """One (N, seed, strategy) training and its test accuracy on the full test split of the target classes."""
    seed_all(s.p.seed + pt.seed)
    result, model, arch, test_pred = STRATEGIES[strategy](s, pt)
    test_acc = accuracy(test_pred, s.splits["test"][1])
    print(f"{s.task.stage('transfer_learn')}: n={pt.n} seed={pt.seed} {strategy}: test acc {test_acc:.4f} "
          f"({result.train_time_s:.1f}s)", flush=True)
    row = {"target_per_class": pt.n, "seed": pt.seed, "strategy": strategy, "test_acc": round(test_acc, 6),
           "best_val_acc": round(result.best_val_acc, 6), "train_time_s": round(result.train_time_s, 2),
           "epochs": result.epochs_run, "params_trainable": sum(p.numel() for p in model.parameters()
                                                                if p.requires_grad),
           "mlflow_run_id": result.run_id}
    return Trained(row, model, arch, result.run_id, result)
