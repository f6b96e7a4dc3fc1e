"""How transfer learning trains one sweep point: where the base's weights come from, and each strategy, by name.

feature_extraction  base frozen; the head trains on the base's features, computed once per task (cached)
fine_tuning         that head, then the whole network (or its last unfreeze_blocks: then the frozen blocks'
                    output is computed once, like the features), the base at lr * backbone_lr_factor, BatchNorm
                    frozen
scratch             our own CNN (transfer.scratch_model) from scratch on the same images: the baseline to beat
scratch_backbone    the same backbone from random weights: what pretraining adds to it

Every training reads its recipe from the task's transfer section (a RecipeParams: optimizer, lr, weight decay,
label smoothing, schedule, ...). A point returns its row and what its MLflow run gets; the stage publishes the
runs after it has published its outputs.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline import params as params_mod
from pipeline import tasks, tracking
from pipeline.data import augment as aug
from pipeline.data.datamodule import ImageDataModule, TensorDataModule
from pipeline.data.prepared import PreparedData, class_subset
from pipeline.models import checkpoint
from pipeline.models.cnn import CNN, Classifier, preset, spec_from_params
from pipeline.models.transfer import (
    HeadOnly,
    Suffix,
    TransferNet,
    extract,
    freeze_base,
    freeze_batchnorm,
    frozen_prefix,
    load_base_from_checkpoint,
    load_imagenet_base,
)
from pipeline.predict import accuracy, device_for, predict_proba
from pipeline.rank import is_rank_zero
from pipeline.training.fit import FitConfig, FitResult, fit, inference_autocast, seed_all
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
    features: dict | None = None  # the frozen base's pooled features of every target image, computed once
    activations: dict | None = None  # the frozen prefix's output, when fine_tuning trains only the base's end
    prefix: int = 0  # how many of the base's blocks fine_tuning leaves frozen (cached when > 0)
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
    model: Classifier | None  # None once a sweep no longer needs it
    arch: dict
    run_id: str | None
    result: FitResult
    test_acc: float  # unrounded (the row's is rounded)


SWEEP_EPOCHS = 5  # a sweep training's epochs: each validated, the best one kept


def schedule(steps: int, n_train: int, batch_size: int) -> tuple[int, int]:
    """(epochs, passes over the data per epoch) that make at least `steps` optimizer steps in SWEEP_EPOCHS epochs
    or fewer (the loader drops a short last batch). Few labelled images make a pass one or two steps: an epoch is
    then several passes, so that a training is a few validated epochs, not hundreds of one-step ones."""
    per_pass = max(1, n_train // batch_size) if n_train > batch_size else 1
    total = max(1, math.ceil(steps / per_pass))
    epochs = min(SWEEP_EPOCHS, total)
    return epochs, math.ceil(total / epochs)


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
                           | {"strategy": "pretrain_source"}, params_mod.flatten({"seed": p.seed, "transfer": tp}))
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
    logged = params_mod.flatten({"seed": s.p.seed, s.task.transfer: tp, "model": s.p.model, "trainer": s.p.trainer})
    logged |= {"task": s.task.name, "strategy": strategy, "n": pt.n, "sweep_seed": pt.seed}
    return tracking.RunInfo(s.p.mlflow.experiment, f"{s.task.stage('transfer_learn')}/n{pt.n}/seed{pt.seed}/{strategy}",
                            tags, logged, parent_id=s.parent_id)


def _config(s: Setup, epochs: int) -> FitConfig:
    tp = s.tp
    return FitConfig(s.p.trainer, epochs, monitor=tp.monitor, gradient_clip_val=tp.gradient_clip_val, quiet=True)


def _transfer_arch(s: Setup) -> dict:
    tp = s.tp
    return checkpoint.transfer_arch(tp.backbone, len(s.classes), tp.head_units, tp.head_dropout, tp.image_size,
                                    s.channels)


def _rows(s: Setup, pt: Point) -> torch.Tensor:
    """The cached training rows of a point: each of its images in every view (view-major, as cached)."""
    n = len(s.splits["train"][1])
    return torch.as_tensor(np.concatenate([v * n + pt.train for v in range(s.tp.cached_views)]))


def _cached(s: Setup, pt: Point, cache: dict, steps: int) -> tuple[TensorDataModule, FitConfig]:
    """The cached rows of a point as training data, and a config that makes `steps` steps on them."""
    (_, y), (_, yv) = s.splits["train"], s.splits["val"]
    rows = _rows(s, pt)
    epochs, passes = schedule(steps, len(rows), s.tp.batch_size)
    data = TensorDataModule((cache["train"][rows], torch.as_tensor(np.tile(y[pt.train], s.tp.cached_views))),
                            (cache["val"][pt.val], torch.as_tensor(yv[pt.val])), s.tp.batch_size, s.p.seed + pt.seed,
                            passes)
    return data, _config(s, epochs)


def feature_extraction(s: Setup, pt: Point) -> tuple[FitResult, Classifier, dict, np.ndarray]:
    """Frozen base; the head trains on the cached features for head_steps. Its head also starts fine_tuning."""
    tp = s.tp
    model = s.new_model(with_base=True)
    freeze_base(model.net, 0)
    data, config = _cached(s, pt, s.features, tp.head_steps)
    result = fit(ClassifierModule(HeadOnly(model.net.head), tp), data, config)
    model.cpu()
    s.heads[(pt.n, pt.seed)] = {k: v.clone() for k, v in model.net.head.state_dict().items()}
    test_pred = model.net.head.eval()(s.features["test"]).argmax(1).numpy()
    return result, model, _transfer_arch(s), test_pred


def fine_tuning(s: Setup, pt: Point) -> tuple[FitResult, Classifier, dict, np.ndarray]:
    """Chollet's recipe: the feature-extraction head first, then the whole network (the last unfreeze_blocks
    of the base) for `steps` at lr, the base at lr * backbone_lr_factor, its BatchNorm layers frozen. When the
    base's first blocks stay frozen, their output is the cached one and only the rest runs."""
    tp = s.tp
    if (pt.n, pt.seed) not in s.heads:
        feature_extraction(s, pt)
    model = s.new_model(with_base=True)
    model.net.head.load_state_dict(s.heads[(pt.n, pt.seed)])
    freeze_base(model.net, tp.unfreeze_blocks)
    freeze_batchnorm(model.net.base)
    if not s.prefix:
        module = ClassifierModule(model, tp, base_lr_factor=tp.backbone_lr_factor)
        return _train_images(s, pt, "fine_tuning", module, tp.steps, _transfer_arch(s))
    end = Suffix(model.net, s.prefix)
    data, config = _cached(s, pt, s.activations, tp.steps)
    result = fit(ClassifierModule(end, tp, base_lr_factor=tp.backbone_lr_factor, base="suffix"), data, config)
    end.cpu().eval()
    with torch.no_grad():
        test_pred = torch.cat([end(z).argmax(1) for z in s.activations["test"].split(64)]).numpy()
    return result, model.cpu(), _transfer_arch(s), test_pred


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
                         checkpoint.cnn_arch(spec, s.data.channels, size, len(s.classes)),
                         size if size != s.data.image_size else None)


def scratch_backbone(s: Setup, pt: Point) -> tuple[FitResult, Classifier, dict, np.ndarray]:
    """The same backbone from random weights, for the same `steps` as fine_tuning: what pretraining adds."""
    return _train_images(s, pt, "scratch_backbone", ClassifierModule(s.new_model(with_base=False), s.tp),
                         s.tp.steps, _transfer_arch(s))


def _train_images(s: Setup, pt: Point, strategy: str, module: ClassifierModule, steps: int, arch: dict,
                  image_size: int | None = None) -> tuple[FitResult, Classifier, dict, np.ndarray]:
    """A training on the point's images, augmented online; `image_size`: the data module resizes them first
    (our small CNN on photos learns at 64 px: augmenting there is cheaper than at 224 px)."""
    (x, y), (xv, yv) = s.splits["train"], s.splits["val"]
    epochs, passes = schedule(steps, len(pt.train), s.tp.batch_size)
    dm = ImageDataModule({"train": (x[pt.train], y[pt.train]), "val": (xv[pt.val], yv[pt.val])}, s.tp.batch_size,
                         s.p.seed + pt.seed, s.augmentation, image_size, s.p.trainer.batched_augment,
                         s.p.trainer.num_workers, passes)
    result = fit(module, dm, _config(s, epochs))
    model = module.model
    test_pred = predict_proba(model, s.splits["test"][0], s.data.image_size,
                              device=device_for(s.p.trainer.accelerator)).argmax(1)
    return result, model.cpu(), arch, test_pred


STRATEGIES = {"feature_extraction": feature_extraction, "fine_tuning": fine_tuning, "scratch": scratch,
              "scratch_backbone": scratch_backbone}


def cache_features(s: Setup) -> None:
    """What the frozen base computes, once per task: its pooled features of every target image (what the
    feature-extraction heads train and test on) and, when fine_tuning keeps the base's first blocks frozen, those
    blocks' output. Training images come in `cached_views` views: the stored image, then augmented copies.
    The training views go through the base in the precision the trainings use (bf16 on a CPU with native bf16:
    EfficientNet-Lite0 at 224 px 2.5x faster); validation and test images in fp32, as evaluate runs the saved
    models, so that the sweep's test accuracies are the ones evaluate reproduces."""
    tp, device = s.tp, device_for(s.p.trainer.accelerator)
    frozen = s.new_model(with_base=True)
    if "fine_tuning" in tp.strategies and tp.unfreeze_blocks != "all":
        probe = s.new_model(with_base=False)
        freeze_base(probe.net, tp.unfreeze_blocks)
        freeze_batchnorm(probe.net.base)
        s.prefix = frozen_prefix(probe.net)
    x = dict(s.splits)
    images = {"train": views(x["train"][0], s.augmentation, tp.cached_views, s.p.seed), "val": x["val"][0],
              "test": x["test"][0]}
    channels_last = s.p.trainer.channels_last
    train_dtype = inference_autocast(s.p.trainer.precision, s.p.trainer.accelerator)
    out = {k: extract(frozen, v, s.prefix or None, device=device, channels_last=channels_last,
                      autocast=train_dtype if k == "train" else None) for k, v in images.items()}
    if not s.prefix:
        s.features = out
        return
    s.activations = out
    rest = Suffix(frozen.net, s.prefix).eval()
    with torch.no_grad():  # the rest of the frozen base, pooled: the features, from the cached activations
        s.features = {k: torch.cat([rest.pool(rest.suffix(z)) for z in v.split(64)]) for k, v in
                      s.activations.items()}


def views(images: np.ndarray, augmentation, count: int, seed: int) -> np.ndarray:
    """`count` views of uint8 images, view-major: the images themselves, then augmented copies."""
    if count == 1 or augmentation is None or not len(augmentation.transforms):
        return np.concatenate([images] * count) if count > 1 else images
    augmentation.set_random_seed(seed)
    copies = [np.stack([aug.apply(augmentation, img) for img in images]) for _ in range(count - 1)]
    return np.concatenate([images, *copies])


@dataclass
class Job:
    """One (N, seed) of a sweep: every strategy on its images, in the sweep's order (fine_tuning starts from the
    feature-extraction head of the same point). `keep`: its models come back (the largest N, seed 0)."""

    point: Point
    keep: bool


def train_point(s: Setup, job: Job) -> list[Trained]:
    """Every strategy of one point, each seeded on its own, so that a point's numbers do not depend on which
    process trains it or after which other point (pipeline/training/pool.py). No MLflow here: the stage records
    the runs (`record`) as the points come back, in the sweep's order."""
    out = []
    for strategy in s.tp.strategies:
        t = train(s, strategy, job.point)
        t.result.last_state = None  # the model is the one to keep, when kept
        if not job.keep:
            t.model = None  # only the kept models travel back and stay in memory
        out.append(t)
    s.heads.pop((job.point.n, job.point.seed), None)
    return out


def train(s: Setup, strategy: str, pt: Point) -> Trained:
    """One (N, seed, strategy) training and its test accuracy on the full test split of the target classes."""
    seed_all(s.p.seed + pt.seed)
    result, model, arch, test_pred = STRATEGIES[strategy](s, pt)
    test_acc = accuracy(test_pred, s.splits["test"][1])
    row = {"target_per_class": pt.n, "seed": pt.seed, "strategy": strategy, "test_acc": round(test_acc, 6),
           "images": hashlib.sha256(pt.train.tobytes()).hexdigest()[:12],  # which images this point trained on
           "best_val_acc": round(result.best_val_acc, 6), "train_time_s": round(result.train_time_s, 2),
           "epochs": result.epochs_run, "precision": result.precision,
           "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    return Trained(row, model, arch, None, result, test_acc)


def record(s: Setup, pt: Point, t: Trained, progress: str = "") -> None:
    """A finished training's line and its MLflow run (recorded when it is done: a sweep's trainings are many and
    short; a kept model is added to its run after the stage's outputs are written)."""
    row, result = t.row, t.result
    print(f"{s.task.stage('transfer_learn')}: {progress}n={pt.n} seed={pt.seed} {row['strategy']}: test acc "
          f"{row['test_acc']:.4f} ({result.train_time_s:.1f}s)", flush=True)
    if is_rank_zero():
        run = _run(s, pt, row["strategy"])
        run.params.update(result.run_params)
        t.run_id = tracking.record_run(run, result.rows, {
            "target_test_acc": t.test_acc, "best_val_acc": result.best_val_acc,
            "epochs_run": result.epochs_run, "train_time_s": result.train_time_s})
    row["mlflow_run_id"] = t.run_id
