"""The course's claims, measured: every arm of a claim trained (or probed) over seeds on the digits, its metric.

A claim is data (params.claims.lesson): what the seed says, two or more arms (the claims' base recipe with a few
keys changed), the metric and the direction that would confirm it. Arms that resolve to the same training share
it (the dense network of the weight-sharing claim is the one the shift claim tests); the verdict rule is
`pipeline.evaluation.verdict`, the one the transfer sweeps use.

Metrics
  test_acc               accuracy on the test split (the arm's checkpoint: its last epoch, or its best val_acc)
  shift_drop             test accuracy lost when the test digits move by the last of claims.shift_pixels
                         (each image shifted left, right, up and down, zero fill), against the first shift
  generalization_gap     accuracy on the arm's own training images minus test accuracy
  grad_norm_first_layer  the gradient norm reaching the first convolution at initialization (one batch)
  peak_memory_mb         the peak memory of one training step at the arm's batch size
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from pipeline import tracking
from pipeline.data import augment as aug
from pipeline.data.datamodule import ImageDataModule
from pipeline.data.prepared import PreparedData, per_class_indices
from pipeline.evaluation import training_memory_mb
from pipeline.fundamentals.summary import param_counts
from pipeline.models.cnn import Classifier, CNNSpec, build, preset
from pipeline.params import ClaimRecipe, TrainerParams
from pipeline.predict import accuracy, device_for, predict_proba, to_float
from pipeline.training.fit import FitConfig, fit, seed_all
from pipeline.training.module import ClassifierModule


def shift(images: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """uint8 (N, H, W, C) images moved dx pixels right and dy down (negative: left, up); what leaves the frame
    is lost and what enters is 0. Shapes are kept."""
    out = np.zeros_like(images)
    h, w = images.shape[1:3]
    if abs(dx) >= w or abs(dy) >= h:
        return out
    src_y, dst_y = slice(max(0, -dy), h - max(0, dy)), slice(max(0, dy), h - max(0, -dy))
    src_x, dst_x = slice(max(0, -dx), w - max(0, dx)), slice(max(0, dx), w - max(0, -dx))
    out[:, dst_y, dst_x] = images[:, src_y, src_x]
    return out


def network(recipe: ClaimRecipe, data: PreparedData) -> nn.Module:
    """The arm's network: its preset, with the recipe's dropout and BatchNorm where it sets them."""
    spec = preset(recipe.model, "claims: model")
    if isinstance(spec, CNNSpec):
        blocks = spec.blocks
        if recipe.batch_norm is not None:
            blocks = tuple(type(b)(**(vars(b) | {"batch_norm": recipe.batch_norm})) for b in blocks)
        spec = CNNSpec(blocks, spec.head, spec.dense, spec.dropout if recipe.dropout is None else recipe.dropout,
                       spec.dense_activation, spec.name)
    return build(spec, data.channels, data.image_size, data.num_classes)


def training_key(recipe: ClaimRecipe, seed: int) -> str:
    """Arms with the same key are the same training (the checkpoint tested is not part of it)."""
    return json.dumps([recipe.model_dump(exclude={"checkpoint"}), seed], sort_keys=True)


@dataclass
class Trained:
    """One training of an arm's recipe with one seed: its weights at the best and at the last epoch."""

    model: Classifier
    best: dict
    last: dict
    rows: list[dict]
    train_images: np.ndarray
    train_labels: np.ndarray
    train_time_s: float
    run_params: dict = field(default_factory=dict)  # what its run gets from the Trainer (precision used, ...)


@dataclass
class Result:
    """One (claim, arm, seed): the claim's metric and what else was measured."""

    value: float
    test_acc: float | None = None
    params: int = 0
    train_time_s: float = 0.0
    rows: list[dict] = field(default_factory=list)
    shifted: dict[int, float] = field(default_factory=dict)  # shift (pixels) -> test accuracy
    steps_to_target: int | None = None
    run_params: dict = field(default_factory=dict)  # of the training (none for a probe: nothing trained)


def train(recipe: ClaimRecipe, seed: int, data: PreparedData, augmentation, trainer: TrainerParams) -> Trained:
    """The arm's training: its images (train_per_class drawn by the seed), its recipe, Lightning."""
    seed_all(seed)
    x, y = data.x["train"], data.y["train"]
    if recipe.train_per_class is not None:
        idx = per_class_indices(y, recipe.train_per_class, seed, "claims: train_per_class")
        x, y = x[idx], y[idx]
    model = Classifier(network(recipe, data), data.mean, data.std, data.channels)
    dm = ImageDataModule({"train": (x, y), "val": (data.x["val"], data.y["val"])}, recipe.batch_size, seed,
                         augmentation if recipe.augment else None, batched=trainer.batched_augment,
                         num_workers=trainer.num_workers)
    config = FitConfig(trainer, recipe.epochs, monitor=recipe.monitor, gradient_clip_val=recipe.gradient_clip_val,
                       limit_train_batches=recipe.steps_per_epoch or 1.0, quiet=True)
    start = time.perf_counter()
    result = fit(ClassifierModule(model, recipe), dm, config)  # best and last weights in memory
    elapsed = time.perf_counter() - start
    best = {k: v.clone() for k, v in model.state_dict().items()}
    return Trained(model.cpu(), best, result.last_state, result.rows, x, y, elapsed, result.run_params)


def steps_to(rows: list[dict], target: float) -> int | None:
    """The first validated step at which val_acc reached `target` (None: not within the budget)."""
    return next((int(r["step"]) for r in rows if r.get("val_acc", 0.0) >= target), None)


def measure(metric: str, recipe: ClaimRecipe, t: Trained, data: PreparedData, shifts: list[int],
            target: float, device: torch.device) -> Result:
    """A trained arm's metric and its test accuracy (on the checkpoint the arm tests)."""
    t.model.load_state_dict(t.best if recipe.checkpoint == "best" else t.last)
    x, y = data.x["test"], data.y["test"]
    size = data.image_size
    test_acc = accuracy(predict_proba(t.model, x, size, device=device), y)
    result = Result(test_acc, test_acc, param_counts(t.model.net)["total"], t.train_time_s, t.rows,
                    steps_to_target=steps_to(t.rows, target), run_params=t.run_params)
    if metric == "shift_drop":
        for k in shifts:
            moved = [shift(x, dx, dy) for dx, dy in {(k, 0), (-k, 0), (0, k), (0, -k)}]
            result.shifted[k] = float(np.mean([accuracy(predict_proba(t.model, m, size, device=device), y)
                                               for m in moved]))
        result.value = result.shifted[shifts[0]] - result.shifted[shifts[-1]]
    elif metric == "generalization_gap":
        result.value = accuracy(predict_proba(t.model, t.train_images, size, device=device), t.train_labels) - test_acc
    return result


def probe(metric: str, recipe: ClaimRecipe, seed: int, data: PreparedData, device: torch.device) -> Result:
    """An arm measured without training: at its initialization (seeded), on one batch of training images."""
    seed_all(seed)
    net = network(recipe, data)
    model = Classifier(net, data.mean, data.std, data.channels).to(device)
    count = param_counts(net)["total"]
    if metric == "peak_memory_mb":
        return Result(training_memory_mb(model, (data.channels, data.image_size, data.image_size),
                                         recipe.batch_size, device), params=count)
    idx = torch.randperm(len(data.y["train"]), generator=torch.Generator().manual_seed(seed))[: recipe.batch_size]
    x = to_float(data.x["train"][idx.numpy()]).to(device)
    y = torch.as_tensor(data.y["train"][idx.numpy()], device=device)
    nn.functional.cross_entropy(model.train()(x), y).backward()
    first = next(m for m in net.modules() if isinstance(m, nn.Conv2d | nn.Linear))
    return Result(float(first.weight.grad.norm()), params=count)


@dataclass(frozen=True)
class Job:
    """One training (an arm's recipe, a seed) and every (metric, arm recipe) the claims measure on it: arms that
    resolve to the same training share it (the recipe a measure comes with says which checkpoint it tests)."""

    recipe: ClaimRecipe
    seed: int
    measures: tuple[tuple[str, ClaimRecipe], ...]
    trainer: TrainerParams
    shifts: tuple[int, ...]
    target: float


def plan(points: list[tuple[str, ClaimRecipe, int]], trainer: TrainerParams, shifts: list[int],
         target: float) -> tuple[list[Job], list[tuple[int, int]]]:
    """The trainings that `points` (metric, arm recipe, seed) need, one Job per training key in first-seen order,
    and where each point's result will be: (job, measure)."""
    index: dict[str, int] = {}
    jobs: list[Job] = []
    where = []
    for metric, recipe, seed in points:
        key = training_key(recipe, seed)
        if key not in index:
            index[key] = len(jobs)
            jobs.append(Job(recipe, seed, (), trainer, tuple(shifts), target))
        i = index[key]
        jobs[i] = replace(jobs[i], measures=(*jobs[i].measures, (metric, recipe)))
        where.append((i, len(jobs[i].measures) - 1))
    return jobs, where


def context(seed: int) -> tuple[PreparedData, object]:
    """What every training reads: the prepared digits and the augment stage's pipeline."""
    return PreparedData.load(), aug.load(aug.PIPELINE_PATH, seed=seed)


def run_job(ctx: tuple[PreparedData, object], job: Job) -> list[Result]:
    """Train once, measure each of the job's (metric, arm recipe)."""
    data, augmentation = ctx
    trained = train(job.recipe, job.seed, data, augmentation, job.trainer)
    device = device_for(job.trainer.accelerator)
    return [measure(metric, recipe, trained, data, list(job.shifts), job.target, device)
            for metric, recipe in job.measures]


def log_result(run_id: str, metric: str, r: Result) -> None:
    """A (claim, arm, seed) run's numbers: the claim's metric, test accuracy, size, curves."""
    tracking.log_metrics(run_id, {metric: r.value, "test_acc": r.test_acc, "params_total": r.params,
                                  "train_time_s": r.train_time_s, "steps_to_target": r.steps_to_target})
    for row in r.rows:
        tracking.log_metrics(run_id, {k: row[k] for k in ("train_loss", "train_acc", "val_loss", "val_acc")
                                      if k in row}, step=int(row["step"]))
    for k, acc in r.shifted.items():
        tracking.log_metrics(run_id, {"shifted_test_acc": acc}, step=k)
