"""How transfer learning trains: where the base's weights come from, and each strategy, by name.

feature_extraction  base frozen; the head trains on the base's features, computed once (cached)
fine_tuning         that head, then the whole network (the base at lr * backbone_lr_factor, BatchNorm frozen)
scratch             our own CNN (params.model) from scratch on the same images: the baseline to beat
scratch_backbone    the same backbone from random weights: what pretraining adds to it
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline import params as params_mod
from pipeline import tracking
from pipeline.data.datamodule import ImageDataModule, TensorDataModule
from pipeline.data.fewshot import class_subset
from pipeline.data.prepared import PreparedData
from pipeline.evaluation import accuracy, device_for, predict_proba
from pipeline.models.classifier import Classifier
from pipeline.models.cnn import CNN, spec_from_params
from pipeline.models.transfer import (
    HeadOnly,
    TransferNet,
    freeze_base,
    freeze_batchnorm,
    load_base_from_checkpoint,
    load_imagenet_base,
)
from pipeline.training.callbacks import RunSpec
from pipeline.training.fit import FitConfig, fit, seed_all
from pipeline.training.module import ClassifierModule, OptimConfig


@dataclass
class Setup:
    """What every training of a sweep shares."""

    p: params_mod.Params
    data: PreparedData
    classes: list[int]
    splits: dict  # the target classes' train/val/test, labels remapped to 0..k-1
    mean: tuple
    std: tuple
    channels: int
    base_state: dict | None
    transform: object
    parent_id: str | None = None
    features: dict | None = None  # the frozen base's features of every target image, computed once
    heads: dict = field(default_factory=dict)  # (N, seed) -> the trained feature-extraction head
    datasets: list = field(default_factory=list)  # the prepared splits as MLflow datasets, built once

    def new_model(self, with_base: bool) -> Classifier:
        tp = self.p.transfer
        net = TransferNet(tp.backbone, len(self.classes), tp.head_units, tp.head_dropout, tp.image_size,
                          self.channels)
        if with_base and self.base_state is not None:
            net.base.load_state_dict(self.base_state)
        return Classifier(net, self.mean, self.std, self.channels, tp.image_size)


@dataclass
class Point:
    """One (N, seed) of a sweep: the indices of its training and validation images."""

    n: int
    seed: int
    train: np.ndarray
    val: np.ndarray


def optim(lr: float, **overrides) -> OptimConfig:
    """Adam at `lr` without a schedule: every transfer training (the schema's other train defaults)."""
    return OptimConfig.from_params(lr=lr, scheduler="none", warmup_epochs=0, **overrides)


def epochs_for(steps: int, n_train: int, batch_size: int) -> int:
    """Epochs that make `steps` optimizer steps (the loader drops a short last batch)."""
    per_epoch = max(1, n_train // batch_size) if n_train > batch_size else 1
    return max(1, math.ceil(steps / per_epoch))


# ------------------------------------------------------------------------------------- base weights
def _imagenet(p, data, arch, channels, transform):
    net = TransferNet(p.transfer.backbone, 2, p.transfer.head_units, 0.0, p.transfer.image_size, channels)
    load_imagenet_base(net)
    return net.base.state_dict(), *arch.imagenet_norm


def _none(p, data, arch, channels, transform):
    return None, tuple(data.mean), tuple(data.std)


def _checkpoint(p, data, arch, channels, transform):
    net = TransferNet(p.transfer.backbone, 2, p.transfer.head_units, 0.0, p.transfer.image_size, channels)
    load_base_from_checkpoint(net, Path(p.transfer.weights))
    return net.base.state_dict(), tuple(data.mean), tuple(data.std)


def _source_task(p, data, arch, channels, transform):
    """Pretrain the backbone here, on params.transfer.source_classes of the prepared data."""
    tp = p.transfer
    seed_all(p.seed)
    net = TransferNet(tp.backbone, len(tp.source_classes), tp.head_units, tp.head_dropout, tp.image_size, channels)
    model = Classifier(net, data.mean, data.std, channels, tp.image_size)
    print(f"transfer_learn: pretraining {tp.backbone} on source classes {tp.source_classes}", flush=True)
    run = RunSpec(p.mlflow.experiment, f"transfer_learn/pretrain/{tp.backbone}",
                  tracking.run_tags("transfer_learn", tp.backbone, data.data_hash) | {"strategy": "pretrain_source"},
                  params_mod.flatten({"transfer": tp}), (channels, tp.image_size, tp.image_size), log_model=False)
    dm = ImageDataModule(class_subset(data, tp.source_classes), tp.batch_size, p.trainer.num_workers, p.seed,
                         transform, batched=p.trainer.batched_augment)
    fit(ClassifierModule(model, len(tp.source_classes), optim(tp.lr)), dm,
        FitConfig(p.trainer, tp.pretrain_epochs, label="pretrain "), run)
    return net.base.state_dict(), tuple(data.mean), tuple(data.std)


WEIGHT_SOURCES = {"imagenet": _imagenet, "none": _none, "source_task": _source_task}


def base_weights(p, data: PreparedData, arch, channels: int, transform) -> tuple[dict | None, tuple, tuple]:
    """The base's starting weights (transfer.weights: a source by name, else a checkpoint path) and the
    normalization that goes with them."""
    return WEIGHT_SOURCES.get(p.transfer.weights, _checkpoint)(p, data, arch, channels, transform)


# ---------------------------------------------------------------------------------------- strategies
def _run(s: Setup, pt: Point, strategy: str, shape: tuple, log_model: bool, **spec) -> RunSpec:
    tp = s.p.transfer
    tags = tracking.run_tags("transfer_learn", tp.backbone, s.data.data_hash) | {
        "strategy": strategy, "target_per_class": str(pt.n), "sweep_seed": str(pt.seed), "weights": tp.weights}
    logged = params_mod.flatten({"transfer": tp}) | {"strategy": strategy, "n": pt.n, "sweep_seed": pt.seed}
    return RunSpec(s.p.mlflow.experiment, f"transfer_learn/n{pt.n}/seed{pt.seed}/{strategy}", tags, logged, shape,
                   log_model=log_model, log_checkpoint=False, parent_id=s.parent_id, quiet=True,
                   datasets=s.datasets, register_as=s.p.mlflow.transfer_model if log_model else None, **spec)


def _config(s: Setup, pt: Point, steps: int) -> FitConfig:
    epochs = epochs_for(steps, len(pt.train), s.p.transfer.batch_size)
    return FitConfig(s.p.trainer, epochs, val_every=max(1, epochs // 5), quiet=True)


def feature_extraction(s: Setup, pt: Point, log_model: bool):
    """Frozen base; the head trains on the cached features for head_steps. Its head also starts fine_tuning."""
    tp = s.p.transfer
    model = s.new_model(with_base=True)
    freeze_base(model.net, 0)
    f, (_, y), (_, yv) = s.features, s.splits["train"], s.splits["val"]
    dm = TensorDataModule((f["train"][pt.train], torch.as_tensor(y[pt.train])),
                          (f["val"][pt.val], torch.as_tensor(yv[pt.val])), tp.batch_size, s.p.seed + pt.seed)
    example = torch.from_numpy(s.splits["val"][0][:2]).permute(0, 3, 1, 2).float() / 255.0
    config = _config(s, pt, tp.head_steps)
    run = _run(s, pt, "feature_extraction", (s.channels, tp.image_size, tp.image_size), log_model, tracked=model,
               example=example)
    result = fit(ClassifierModule(HeadOnly(model.net.head), len(s.classes), optim(tp.lr)), dm, config, run)
    s.heads[(pt.n, pt.seed)] = {k: v.clone() for k, v in model.net.head.state_dict().items()}
    return result, model, model.net.head.eval()(f["test"]).argmax(1).numpy(), config.epochs


def fine_tuning(s: Setup, pt: Point, log_model: bool):
    """Chollet's recipe: the feature-extraction head first, then the whole network (the last unfreeze_blocks
    of the base) for `steps` at lr, the base at lr * backbone_lr_factor, its BatchNorm layers frozen."""
    tp = s.p.transfer
    if (pt.n, pt.seed) not in s.heads:
        feature_extraction(s, pt, log_model=False)
    model = s.new_model(with_base=True)
    model.net.head.load_state_dict(s.heads[(pt.n, pt.seed)])
    freeze_base(model.net, tp.unfreeze_blocks)
    freeze_batchnorm(model.net.base)
    config = optim(tp.lr, base_prefix="net.base", base_lr_factor=tp.backbone_lr_factor)
    return _train_images(s, pt, "fine_tuning", model, config, tp.steps, log_model)


def scratch(s: Setup, pt: Point, log_model: bool):
    """The project's own CNN (params.model) at the data's size, from scratch, for cnn_steps: the small-model
    baseline of the textbook (Chollet trains a small convnet from scratch before reusing a pretrained one)."""
    m = s.p.model
    spec = spec_from_params(m)
    net = CNN(spec, s.data.channels, s.data.image_size, len(s.classes))
    model = Classifier(net, s.data.mean, s.data.std, s.data.channels)
    return _train_images(s, pt, "scratch", model, optim(s.p.transfer.lr), s.p.transfer.cnn_steps, log_model)


def scratch_backbone(s: Setup, pt: Point, log_model: bool):
    """The same backbone from random weights, for the same `steps` as fine_tuning: what pretraining adds."""
    return _train_images(s, pt, "scratch_backbone", s.new_model(with_base=False), optim(s.p.transfer.lr),
                         s.p.transfer.steps, log_model)


def _train_images(s: Setup, pt: Point, strategy: str, model: Classifier, config: OptimConfig, steps: int,
                  log_model: bool):
    tp = s.p.transfer
    (x, y), (xv, yv) = s.splits["train"], s.splits["val"]
    if s.transform is not None:  # every training draws its own augmentations, whatever ran before it
        s.transform.set_random_seed(s.p.seed + pt.seed)
    dm = ImageDataModule({"train": (x[pt.train], y[pt.train]), "val": (xv[pt.val], yv[pt.val])}, tp.batch_size,
                         s.p.trainer.num_workers, s.p.seed + pt.seed, s.transform,
                         batched=s.p.trainer.batched_augment)
    size = model.input_size or s.data.image_size
    fit_config = _config(s, pt, steps)
    result = fit(ClassifierModule(model, len(s.classes), config), dm, fit_config,
                 _run(s, pt, strategy, (model.net_channels, size, size), log_model))  # the net behind the resize
    test_pred = predict_proba(model, s.splits["test"][0], s.data.image_size,
                              device=device_for(s.p.trainer.accelerator)).argmax(1)
    return result, model, test_pred, fit_config.epochs


STRATEGIES = {"feature_extraction": feature_extraction, "fine_tuning": fine_tuning, "scratch": scratch,
              "scratch_backbone": scratch_backbone}


def train_one(s: Setup, strategy: str, pt: Point, log_model: bool) -> tuple[dict, Classifier]:
    """One (N, seed, strategy) training and its test accuracy on the full test split of the target classes."""
    seed_all(s.p.seed + pt.seed)
    result, model, test_pred, epochs = STRATEGIES[strategy](s, pt, log_model)
    test_acc = accuracy(test_pred, s.splits["test"][1])
    if result.run_id:
        tracking.log_metrics(result.run_id, {"target_test_acc": test_acc})
    print(f"transfer_learn: n={pt.n} seed={pt.seed} {strategy}: test acc {test_acc:.4f} "
          f"({result.train_time_s:.1f}s)", flush=True)
    row = {"target_per_class": pt.n, "seed": pt.seed, "strategy": strategy, "test_acc": round(test_acc, 6),
           "best_val_acc": round(result.best_val_acc, 6), "train_time_s": round(result.train_time_s, 2),
           "epochs": epochs, "params_trainable": result.counts.get("trainable"),
           "mlflow_run_id": result.run_id, "model_uri": result.model_uri, "model_version": result.model_version}
    return row, model
