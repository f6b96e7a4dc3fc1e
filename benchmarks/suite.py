"""The benchmarks `python -m benchmarks` runs. Each `setup(quick)` returns two measuring callables, A and B, each
returning a rate (higher is better) so that the ratio A / B is the figure of merit."""

from __future__ import annotations

import time
from functools import cache

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from pipeline import params as params_mod
from pipeline.data import augment as aug
from pipeline.data.datamodule import ImageDataModule
from pipeline.data.prepared import build_prepared
from pipeline.data.sources import load_embedded
from pipeline.models.cnn import CNN, Classifier, spec_from_params
from pipeline.training.fit import FitConfig, build_trainer, fit, seed_all
from pipeline.training.module import OPTIMIZERS, SCHEDULERS, ClassifierModule, Steps


@cache
def defaults() -> params_mod.Params:
    return params_mod.Params()  # the schema's defaults are params.yaml's (tested)


@cache
def data():
    raw = load_embedded(28, 1)
    return build_prepared(raw.images, raw.labels, raw.class_names, (0.7, 0.15, 0.15), 0, 5)


def seed_cnn() -> Classifier:
    d = data()
    return Classifier(CNN(spec_from_params(defaults().model), 1, 28, 10), d.mean, d.std, 1)


def layout(model: torch.nn.Module) -> torch.nn.Module:
    """The memory layout the stages train in (params.trainer.channels_last, applied by a callback there)."""
    return model.to(memory_format=torch.channels_last) if defaults().trainer.channels_last else model


def splits():
    d = data()
    return {s: (d.x[s], d.y[s]) for s in ("train", "val", "test")}


# ---------------------------------------------------------------------------------------- lightning_step
class StepTimer(pl.Callback):
    """Wall time of training steps `warm`..last, nothing else (no setup, no validation)."""

    def __init__(self, warm: int) -> None:
        self.warm, self.start, self.end, self.steps = warm, 0.0, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warm:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end, self.steps = time.perf_counter(), batch_idx + 1 - self.warm


def lightning_step(quick: bool):
    steps, warm = (40, 10) if quick else (150, 20)
    p = defaults()
    # Steady state inside one epoch (no epoch-end work in the timing): the training split repeated so that
    # one epoch holds every measured step (3,500 images are 54 batches of 64).
    x, y = splits()["train"]
    repeat = -(-(steps * p.train.batch_size) // len(y))
    dm = ImageDataModule({"train": (np.tile(x, (repeat, 1, 1, 1)), np.tile(y, repeat)), "val": splits()["val"]},
                         p.train.batch_size, 0, num_workers=p.trainer.num_workers)

    def with_lightning() -> float:
        seed_all(0)
        timer = StepTimer(warm)
        config = FitConfig(p.trainer, 1, limit_train_batches=steps, quiet=True, callbacks=(timer,))
        trainer, _ = build_trainer(config, tempfile_dir())
        trainer.limit_val_batches = 0
        module = ClassifierModule(seed_cnn(), p.train)
        if p.trainer.channels_last:  # as fit lays the model out
            module.to(memory_format=torch.channels_last)
        trainer.fit(module, datamodule=dm)
        return timer.steps / (timer.end - timer.start)

    def plain() -> float:
        # The same recipe by hand: the optimizer and the per-step schedule of params.train, the same loss.
        seed_all(0)
        model = layout(seed_cnn())
        recipe = p.train
        groups = [{"params": list(model.parameters()), "lr": recipe.lr}]
        opt = OPTIMIZERS[recipe.optimizer](groups, recipe)
        # One epoch of `steps` steps, as the module computes it for the Lightning run (limit_train_batches=steps)
        schedule = SCHEDULERS[recipe.scheduler](opt, groups, Steps(steps, steps, recipe))
        scheduler = schedule["lr_scheduler"]["scheduler"]
        loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
        model.train()
        for i, (x, y) in enumerate(dm.train_dataloader()):
            if i == warm:
                start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
            scheduler.step()
            if i + 1 == steps:
                return (steps - warm) / (time.perf_counter() - start)
        raise RuntimeError("not enough batches")

    return with_lightning, plain


def tempfile_dir():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp(prefix="bench-ckpt-"))


# ----------------------------------------------------------------------------------- augment_end_to_end
def augment_end_to_end(quick: bool):
    p = defaults()
    batches = 25 if quick else None  # None: the whole epoch (3,500 images)

    def epoch(augmented: bool) -> float:
        seed_all(0)
        transform = aug.build(p.augment, 0) if augmented else None
        dm = ImageDataModule(splits(), p.train.batch_size, 0, transform, num_workers=p.trainer.num_workers)
        config = FitConfig(p.trainer, 1, limit_train_batches=batches or 1.0, quiet=True)
        result = fit(ClassifierModule(seed_cnn(), p.train), dm, config)
        return 1.0 / result.rows[-1]["epoch_time_s"]  # epochs per second: training only, no validation

    return (lambda: epoch(True)), (lambda: epoch(False))


# ---------------------------------------------------------------------------------------- feature_cache
def feature_cache(quick: bool):
    from pipeline.data.datamodule import TensorDataModule
    from pipeline.data.prepared import class_subset, per_class_indices
    from pipeline.models import registry
    from pipeline.models.transfer import (
        HeadOnly,
        TransferNet,
        extract_features,
        freeze_base,
        load_imagenet_base,
    )
    from pipeline.training.transfer import epochs_for

    tp = defaults().transfer
    head_steps = 30 if quick else tp.head_steps
    per_class = 30
    target = class_subset(data(), list(range(10)))
    idx = per_class_indices(target["train"][1], per_class, 0, "n")
    vidx = per_class_indices(target["val"][1], tp.val_per_class, 0, "val")
    train = (target["train"][0][idx], target["train"][1][idx])
    val = (target["val"][0][vidx], target["val"][1][vidx])
    arch = registry.get(tp.backbone)
    net = TransferNet(tp.backbone, 10, tp.head_units, tp.head_dropout, tp.image_size, 3)
    load_imagenet_base(net)
    base_state = net.base.state_dict()
    epochs = epochs_for(head_steps, len(idx), tp.batch_size)

    def model() -> Classifier:
        seed_all(0)
        n = TransferNet(tp.backbone, 10, tp.head_units, tp.head_dropout, tp.image_size, 3)
        n.base.load_state_dict(base_state)
        m = Classifier(n, *arch.imagenet_norm, 3, tp.image_size)
        freeze_base(m.net, 0)
        return m

    def cached() -> float:
        m = model()
        start = time.perf_counter()
        feats = {k: extract_features(m, v[0], channels_last=defaults().trainer.channels_last)
                 for k, v in (("train", train), ("val", val))}
        m.net.head.train()  # extraction put the model in eval mode; the stage trains a fresh model's head
        dm = TensorDataModule((feats["train"], torch.as_tensor(train[1])), (feats["val"], torch.as_tensor(val[1])),
                              tp.batch_size, 0)
        fit(ClassifierModule(HeadOnly(m.net.head), tp), dm,
            FitConfig(defaults().trainer, epochs, val_every=max(1, epochs // 5), quiet=True))
        return 1.0 / (time.perf_counter() - start)

    def naive() -> float:
        m = model()
        start = time.perf_counter()
        dm = ImageDataModule({"train": train, "val": val}, tp.batch_size, 0)
        fit(ClassifierModule(m, tp), dm, FitConfig(defaults().trainer, epochs, val_every=max(1, epochs // 5),
                                                   quiet=True))
        return 1.0 / (time.perf_counter() - start)

    return cached, naive


# ------------------------------------------------------------------------------------- in_memory_loader
def in_memory_loader(quick: bool):
    p = defaults()
    x, y = splits()["train"]
    epochs = 100 if quick else 300  # an epoch takes about a millisecond: enough of them to measure
    dm = ImageDataModule(splits(), p.train.batch_size, 0, num_workers=p.trainer.num_workers)
    tensor = torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255.0)
    labels = torch.as_tensor(y)

    def through_loader() -> float:
        loader = dm.train_dataloader()  # once, as Lightning asks for it once per fit
        start, n = time.perf_counter(), 0
        for _ in range(epochs):
            for images, _ in loader:
                n += len(images)
        return n / (time.perf_counter() - start)

    def indexing() -> float:
        start, n = time.perf_counter(), 0
        g = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            order = torch.randperm(len(tensor), generator=g)
            for i in range(0, len(order) - p.train.batch_size + 1, p.train.batch_size):
                batch = order[i : i + p.train.batch_size]
                # index_select: the fastest way to index here (tensor[batch] takes 4x as long)
                images, _ = torch.index_select(tensor, 0, batch), torch.index_select(labels, 0, batch)
                n += len(images)
        return n / (time.perf_counter() - start)

    return through_loader, indexing


# --------------------------------------------------------------------------------------------- roofline
def roofline(quick: bool):
    from torch.utils.flop_counter import FlopCounterMode

    p = defaults()
    batch = p.train.batch_size
    steps = 20 if quick else 60
    x = torch.rand(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    model = layout(seed_cnn())
    opt = torch.optim.Adam(model.parameters(), lr=p.train.lr)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops_per_step = counter.get_total_flops()
    a, b = torch.rand(2048, 2048), torch.rand(2048, 2048)

    def training() -> float:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return flops_per_step * steps / (time.perf_counter() - start)

    def matmul() -> float:
        start = time.perf_counter()
        for _ in range(3):
            torch.mm(a, b)
        return 3 * 2 * 2048**3 / (time.perf_counter() - start)

    print(f"  roofline: {flops_per_step / batch / 1e6:.1f} MFLOP per image per training step, batch {batch}",
          flush=True)
    return training, matmul



