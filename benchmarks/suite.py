"""The benchmarks `python -m benchmarks` runs. Each `setup(quick)` returns two measuring callables, A and B, each
returning a rate (higher is better) so that the ratio A / B is the figure of merit.

`configure(device)` picks where they run (`--device auto|cpu|cuda`): the stages' trainings on that accelerator,
with its `precision: auto` (bf16 mixed on GPUs and on CPUs with native bf16), the data on that device, the
plain-PyTorch baselines in the same precision and layout.
"""

from __future__ import annotations

import contextlib
import os
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
from pipeline.training.fit import (
    AUTOCAST_DTYPES,
    NVML_CHECK,
    FitConfig,
    build_trainer,
    cpu_has_bf16,
    fit,
    resolve_precision,
    seed_all,
)
from pipeline.training.module import OPTIMIZERS, SCHEDULERS, ClassifierModule, Steps

DEVICE = torch.device("cpu")


def configure(device: str) -> torch.device:
    """Where the benchmarks run: auto (the GPU when there is one), cpu or cuda."""
    global DEVICE
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks: --device cuda, but this machine has no CUDA GPU")
    DEVICE = torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    defaults.cache_clear()
    return DEVICE


@cache
def defaults() -> params_mod.Params:
    """The schema's defaults (they are params.yaml's, tested), on the benchmark's device."""
    return params_mod.parse({"trainer": {"accelerator": "gpu" if DEVICE.type == "cuda" else "cpu"}})


def precision() -> str:
    p = defaults().trainer
    return resolve_precision(p.precision, p.accelerator)


def autocast(precision_: str | None = None):
    """The autocast Lightning runs a training step in, for the plain-PyTorch side of a comparison."""
    precision_ = precision_ or precision()
    dtype = AUTOCAST_DTYPES.get(precision_)
    return torch.autocast(DEVICE.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def plain_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               precision_: str | None = None) -> None:
    """One training step in plain PyTorch, in the autocast Lightning would run it in: the B side of the
    comparisons with the stages' training, and the step the roofline and bf16 benchmarks time."""
    opt.zero_grad(set_to_none=True)
    with autocast(precision_):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()


def steps_per_s(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int,
                precision_: str | None = None) -> float:
    """`steps` plain training steps on one batch, timed between device syncs."""
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        plain_step(model, opt, x, y, precision_)
    sync()
    return steps / (time.perf_counter() - start)


@cache
def data():
    raw = load_embedded(28, 1)
    return build_prepared(raw.images, raw.labels, raw.class_names, (0.7, 0.15, 0.15), 0, 5)


def seed_cnn() -> Classifier:
    d = data()
    return Classifier(CNN(spec_from_params(defaults().model), 1, 28, 10), d.mean, d.std, 1)


def layout(model: torch.nn.Module) -> torch.nn.Module:
    """The memory layout and device the stages train in (params.trainer.channels_last, as fit lays it out)."""
    model = model.to(DEVICE)
    return model.to(memory_format=torch.channels_last) if defaults().trainer.channels_last else model


def splits():
    d = data()
    return {s: (d.x[s], d.y[s]) for s in ("train", "val", "test")}


def on_device(dm: ImageDataModule) -> ImageDataModule:
    """A data module set up as Lightning sets it up for fitting on the benchmark's device."""
    from types import SimpleNamespace

    dm.trainer = SimpleNamespace(global_rank=0, training=True, strategy=SimpleNamespace(root_device=DEVICE))
    dm.setup("fit")
    return dm


# ---------------------------------------------------------------------------------------- lightning_step
class StepTimer(pl.Callback):
    """Wall time of training steps `warm`..last, nothing else (no setup, no validation)."""

    def __init__(self, warm: int) -> None:
        self.warm, self.start, self.end, self.steps = warm, 0.0, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warm:
            sync()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sync()
        self.end, self.steps = time.perf_counter(), batch_idx + 1 - self.warm


def lightning_step(quick: bool):
    steps, warm = (40, 10) if quick else (150, 20)
    p = defaults()
    # Steady state inside one epoch (no epoch-end work in the timing): the training split repeated so that
    # one epoch holds every measured step (3,500 images are 54 batches of 64).
    x, y = splits()["train"]
    repeat = -(-(steps * p.train.batch_size) // len(y))
    tiled = {"train": (np.tile(x, (repeat, 1, 1, 1)), np.tile(y, repeat)), "val": splits()["val"]}

    def with_lightning() -> float:
        seed_all(0)
        timer = StepTimer(warm)
        dm = ImageDataModule(tiled, p.train.batch_size, 0, num_workers=p.trainer.num_workers)
        config = FitConfig(p.trainer, 1, limit_train_batches=steps, quiet=True, callbacks=(timer,))
        trainer, _ = build_trainer(config, tempfile_dir(), save_last=False)
        trainer.limit_val_batches = 0
        module = ClassifierModule(layout(seed_cnn()), p.train)
        trainer.fit(module, datamodule=dm)
        return timer.steps / (timer.end - timer.start)

    def plain() -> float:
        # The same recipe by hand: the optimizer and the per-step schedule of params.train, the same loss,
        # precision, layout and device, the data module's batches.
        seed_all(0)
        model = layout(seed_cnn())
        recipe = p.train
        groups = [{"params": list(model.parameters()), "lr": recipe.lr}]
        opt = OPTIMIZERS[recipe.optimizer](groups, recipe, True)
        # One epoch of `steps` steps, as the module computes it for the Lightning run (limit_train_batches=steps)
        schedule = SCHEDULERS[recipe.scheduler](opt, groups, Steps(steps, steps, recipe))
        scheduler = schedule["lr_scheduler"]["scheduler"]
        loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
        model.train()
        dm = on_device(ImageDataModule(tiled, p.train.batch_size, 0, num_workers=p.trainer.num_workers))
        for i, (x, y) in enumerate(dm.train_dataloader()):
            if i == warm:
                sync()
                start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = loss_fn(model(x.to(DEVICE)), y.to(DEVICE))
            loss.backward()
            opt.step()
            scheduler.step()
            if i + 1 == steps:
                sync()
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
    from pipeline.models.transfer import HeadOnly, TransferNet, extract, freeze_base, load_imagenet_base
    from pipeline.training.transfer import schedule

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
    epochs, passes = schedule(head_steps, len(idx), tp.batch_size)

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
        feats = {k: extract(m, v[0], device=DEVICE, channels_last=defaults().trainer.channels_last)
                 for k, v in (("train", train), ("val", val))}
        m.net.head.train()  # extraction put the model in eval mode; the stage trains a fresh model's head
        dm = TensorDataModule((feats["train"], torch.as_tensor(train[1])), (feats["val"], torch.as_tensor(val[1])),
                              tp.batch_size, 0, passes)
        fit(ClassifierModule(HeadOnly(m.net.head), tp), dm, FitConfig(defaults().trainer, epochs, quiet=True))
        return 1.0 / (time.perf_counter() - start)

    def naive() -> float:
        m = model()
        start = time.perf_counter()
        dm = ImageDataModule({"train": train, "val": val}, tp.batch_size, 0, passes=passes)
        fit(ClassifierModule(m, tp), dm, FitConfig(defaults().trainer, epochs, quiet=True))
        return 1.0 / (time.perf_counter() - start)

    return cached, naive


# ------------------------------------------------------------------------------------- in_memory_loader
def in_memory_loader(quick: bool):
    p = defaults()
    x, y = splits()["train"]
    epochs = 100 if quick else 300  # an epoch takes about a millisecond: enough of them to measure
    dm = on_device(ImageDataModule(splits(), p.train.batch_size, 0, num_workers=p.trainer.num_workers))
    tensor = torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255.0).to(DEVICE)
    labels = torch.as_tensor(y).to(DEVICE)

    def through_loader() -> float:
        loader = dm.train_dataloader()  # once, as Lightning asks for it once per fit
        start, n = time.perf_counter(), 0
        for e in range(epochs):
            loader.sampler.set_epoch(e)
            for images, _ in loader:
                n += len(images)
        sync()
        return n / (time.perf_counter() - start)

    def indexing() -> float:
        start, n = time.perf_counter(), 0
        for e in range(epochs):
            order = torch.randperm(len(tensor), generator=torch.Generator().manual_seed(e)).to(DEVICE)
            for i in range(0, len(order) - p.train.batch_size + 1, p.train.batch_size):
                batch = order[i : i + p.train.batch_size]
                # index_select: the fastest way to index here (tensor[batch] takes 4x as long)
                images, _ = torch.index_select(tensor, 0, batch), torch.index_select(labels, 0, batch)
                n += len(images)
        sync()
        return n / (time.perf_counter() - start)

    return through_loader, indexing


# --------------------------------------------------------------------------------- roofline and bf16_step
def _step_and_matmul(quick: bool, precision_: str):
    """The seed CNN's training step (plain PyTorch, the stages' layout) and a large matmul, both in `precision_`:
    FLOP/s each."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = defaults().train.batch_size
    steps = 20 if quick else 60
    x = torch.rand(batch, 1, 28, 28, device=DEVICE)
    y = torch.randint(0, 10, (batch,), device=DEVICE)
    model = layout(seed_cnn())
    opt = torch.optim.Adam(model.parameters(), lr=defaults().train.lr, fused=True)

    counter = FlopCounterMode(display=False)
    with counter:
        plain_step(model, opt, x, y, precision_)
    flops_per_step = counter.get_total_flops()
    dtype = AUTOCAST_DTYPES.get(precision_)
    a, b = (torch.rand(2048, 2048, device=DEVICE, dtype=dtype or torch.float32) for _ in range(2))

    def training() -> float:
        return flops_per_step * steps_per_s(model, opt, x, y, steps, precision_)

    def matmul() -> float:
        start = time.perf_counter()
        for _ in range(3):
            torch.mm(a, b)
        sync()
        return 3 * 2 * 2048**3 / (time.perf_counter() - start)

    print(f"  {precision_}: {flops_per_step / batch / 1e6:.1f} MFLOP per image per training step, batch {batch}",
          flush=True)
    return training, matmul


def roofline(quick: bool):
    """fp32: the training step's FLOP/s against a 2048^3 float32 matmul's."""
    return _step_and_matmul(quick, "32-true")


def roofline_bf16(quick: bool):
    """bf16 mixed: the training step's FLOP/s against a 2048^3 bfloat16 matmul's."""
    return _step_and_matmul(quick, "bf16-mixed")


def bf16_step(quick: bool):
    """Training steps per second of the seed CNN at the full-MNIST batch (128), bf16 autocast / fp32."""
    batch, steps = 128, 20 if quick else 60
    x = torch.rand(batch, 1, 28, 28, device=DEVICE)
    y = torch.randint(0, 10, (batch,), device=DEVICE)
    model = layout(seed_cnn())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    if DEVICE.type == "cpu" and not cpu_has_bf16():
        print("  this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 runs emulated, precision auto stays fp32")

    return (lambda: steps_per_s(model, opt, x, y, steps, "bf16-mixed")), \
        (lambda: steps_per_s(model, opt, x, y, steps, "32-true"))


# ------------------------------------------------------------------------------------- time to accuracy
def time_to_accuracy(quick: bool):
    """Seconds of training to 99.2% test accuracy on full MNIST: the recipe before the bf16 work (3 epochs,
    fp32) / today's mnist_full recipe; each as a rate, 1 / seconds (0 when the target is not reached)."""
    from benchmarks import time_to_accuracy as tta

    workspace = tta.workspace()
    workspace.__enter__()  # one folder (the prepared 70,000 digits) for every round; removed at exit
    import atexit

    atexit.register(workspace.__exit__, None, None, None)
    overrides = {"trainer.accelerator": "gpu" if DEVICE.type == "cuda" else "cpu"}

    def rate(before: bool) -> float:
        m = tta.measure(tta.recipe("mnist_full", overrides | (tta.BEFORE if before else {})), 0.992)
        print(tta.describe("before" if before else "today", m, 0.992), flush=True)
        return 1.0 / m["seconds"] if m["seconds"] else 0.0

    return (lambda: rate(False)), (lambda: rate(True))


# ------------------------------------------------------------------------------------------ predict_layout
def predict_layout(quick: bool):
    """Images/s of prediction (what evaluate, explain, the champion check and the sweeps' test accuracies run):
    predict_logits, channels-last, / the same model and batches in NCHW. EfficientNet-Lite0 at the photo task's
    224 px (96 px quick), the costliest model the stages predict with."""
    from pipeline.models.transfer import TransferNet
    from pipeline.predict import predict_logits, to_float

    size, n = (96, 32) if quick else (224, 64)
    net = TransferNet("efficientnet_lite0", 5, 128, 0.0, size, 3).eval()
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)

    def nhwc() -> float:
        start = time.perf_counter()
        predict_logits(net, images, size, device=DEVICE)
        sync()
        return n / (time.perf_counter() - start)

    @torch.no_grad()
    def nchw() -> float:
        model = net.to(DEVICE).to(memory_format=torch.contiguous_format)
        start = time.perf_counter()
        for i in range(0, n, 64):
            model(to_float(images[i : i + 64], size).to(DEVICE)).float().cpu()
        sync()
        return n / (time.perf_counter() - start)

    return nhwc, nchw


# -------------------------------------------------------------------------------------------- cuda_check
def cuda_check(quick: bool):
    """Training steps/s of the photo sweep's scratch arm (small_cnn, batch 16, 64 px, the stages' precision and
    layout, fused Adam) with the CUDA check the training code leaves (pipeline.training.fit drops Lightning's NVML
    check where libnvidia-ml cannot be loaded) / with Lightning's NVML check on. On a GPU machine both sides keep
    the NVML check: about 1 there."""
    from pipeline.models import cnn

    steps = 60 if quick else 150
    model = layout(cnn.build(cnn.preset("small_cnn"), 3, 64, 5))
    opt = torch.optim.Adam(model.parameters(), 1e-3, fused=True)
    x = torch.rand(16, 3, 64, 64, device=DEVICE).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (16,), device=DEVICE)
    left = os.environ.get(NVML_CHECK)

    def timed(check: str | None) -> float:
        set_check(check)
        try:
            return steps_per_s(model, opt, x, y, steps)
        finally:
            set_check(left)

    return (lambda: timed(left)), (lambda: timed("1"))


def set_check(value: str | None) -> None:
    if value is None:
        os.environ.pop(NVML_CHECK, None)
    else:
        os.environ[NVML_CHECK] = value


# -------------------------------------------------------------------------------------------- sweep_pool
def _pool_context():
    return data()


def _pool_job(prepared, job) -> float:
    from pipeline.claims import train

    recipe, seed, trainer = job
    return train(recipe, seed, prepared, None, trainer).train_time_s


def sweep_pool(quick: bool):
    """Trainings per second of a batch of independent short trainings (the seed CNN in the claims' base recipe,
    as the claims and the transfer sweeps run theirs): through `trainer.sweep_workers: auto` (on the CPU one
    one-thread process per core, started and stopped inside the timing) / the same trainings in this process on
    all its threads (`sweep_workers: 1`). On a GPU auto is one process: about 1."""
    from pipeline.params import ClaimRecipe
    from pipeline.training import pool

    trainer = defaults().trainer
    recipe = ClaimRecipe(epochs=2, steps_per_epoch=20 if quick else 40)
    jobs = [(recipe, seed, trainer) for seed in range(4 if quick else 12)]
    workers = pool.workers_for(trainer, len(jobs))

    def timed(processes: int) -> float:
        start = time.perf_counter()
        list(pool.run(_pool_job, jobs, processes, _pool_context))
        return len(jobs) / (time.perf_counter() - start)

    return (lambda: timed(workers)), (lambda: timed(1))
