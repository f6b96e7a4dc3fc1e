"""A CNN built from a list of conv blocks, with the seed's presets, and the deployable Classifier every model of
the pipeline ships in.

seed_mnist      Conv3x3(32, same)+ReLU+MaxPool2 -> Conv3x3(64, same)+ReLU+MaxPool2 -> Flatten -> Dense128 -> Dense10
                421,642 parameters at 28x28x1 (320 + 18,496 + 401,536 + 1,290).
keras_tutorial  Conv3x3(32, valid)+Pool -> Conv3x3(64, valid)+Pool -> Conv3x3(64, valid) -> Dense64 -> Dropout .5
                93,322 parameters at 28x28x1.
lenet5          LeCun et al. 1998: Conv5x5(6)+tanh+AvgPool -> Conv5x5(16)+tanh+AvgPool -> 120 -> 84 -> 10
                (61,706 parameters at 32x32x1).
small_cnn       three 3x3 blocks with BatchNorm (32, 64, 128), global average pooling, Dense128: other images.

The course's claims (the claims stage) compare these, each counted by formula in tests/test_models.py:
dense_mnist        784 -> 512 -> 10, no convolution: 407,050 parameters
seed_mnist_bn      seed_mnist with BatchNorm after each convolution: 421,834
seed_mnist_nopool  seed_mnist without pooling: Flatten of 28x28x64 -> 6,442,762
seed_mnist_gap     seed_mnist with global average pooling instead of Flatten: 28,426
stack_3x3          two stages of two 3x3 convolutions (32, 32 / 64, 64), GAP: 65,642
stack_5x5          two stages of one 5x5 convolution (32 / 80), GAP: 65,722 (the same receptive field and size)
plain20, residual20  a stride-2 stem and 20 3x3 convolutions at width 16, GAP; residual20 adds each pair's
                   input to its output (He et al. 2015): both 46,730
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.errors import PipelineError
from pipeline.fundamentals.sizes import conv_output_size, resolve_padding


@dataclass(frozen=True)
class Block:
    filters: int
    kernel_size: int = 3
    padding: str | int = "same"
    stride: int = 1
    batch_norm: bool = False
    activation: str = "relu"
    pool: str = "max"
    pool_size: int = 2


@dataclass(frozen=True)
class CNNSpec:
    blocks: tuple[Block, ...]
    head: str = "flatten"
    dense: tuple[int, ...] = (128,)
    dropout: float = 0.0
    dense_activation: str = "relu"
    name: str = "custom"

    def to_dict(self) -> dict:
        return {"name": self.name, "head": self.head, "dense": list(self.dense), "dropout": self.dropout,
                "dense_activation": self.dense_activation,
                "blocks": [vars(b).copy() for b in self.blocks]}

    @classmethod
    def from_dict(cls, d: dict) -> CNNSpec:
        return cls(blocks=tuple(Block(**b) for b in d["blocks"]), head=d["head"], dense=tuple(d["dense"]),
                   dropout=d["dropout"], dense_activation=d.get("dense_activation", "relu"), name=d["name"])


PRESETS: dict[str, CNNSpec] = {
    "seed_mnist": CNNSpec(
        name="seed_mnist", blocks=(Block(32), Block(64)), head="flatten", dense=(128,),
    ),
    "keras_tutorial": CNNSpec(
        name="keras_tutorial",
        blocks=(Block(32, padding="valid"), Block(64, padding="valid"), Block(64, padding="valid", pool="none")),
        head="flatten", dense=(64,), dropout=0.5,
    ),
    # The project's small CNN for other images (the photo task's scratch baseline, at 64 px): three 3x3 blocks
    # with BatchNorm, global average pooling, one dense layer. params.model's `custom` stack is the same.
    "small_cnn": CNNSpec(
        name="small_cnn",
        blocks=(Block(32, batch_norm=True), Block(64, batch_norm=True), Block(128, batch_norm=True, pool="none")),
        head="global_avg_pool", dense=(128,), dropout=0.3,
    ),
    "lenet5": CNNSpec(
        name="lenet5",
        blocks=(Block(6, 5, "valid", activation="tanh", pool="avg"),
                Block(16, 5, "valid", activation="tanh", pool="avg")),
        head="flatten", dense=(120, 84), dense_activation="tanh",
    ),
    # the claims'
    "dense_mnist": CNNSpec(name="dense_mnist", blocks=(), head="flatten", dense=(512,)),
    "seed_mnist_bn": CNNSpec(name="seed_mnist_bn", blocks=(Block(32, batch_norm=True), Block(64, batch_norm=True)),
                             head="flatten", dense=(128,)),
    "seed_mnist_nopool": CNNSpec(name="seed_mnist_nopool", blocks=(Block(32, pool="none"), Block(64, pool="none")),
                                 head="flatten", dense=(128,)),
    "seed_mnist_gap": CNNSpec(name="seed_mnist_gap", blocks=(Block(32), Block(64)), head="global_avg_pool",
                              dense=(128,)),
    "stack_3x3": CNNSpec(name="stack_3x3", blocks=(Block(32, pool="none"), Block(32), Block(64, pool="none"),
                                                   Block(64)), head="global_avg_pool", dense=()),
    "stack_5x5": CNNSpec(name="stack_5x5", blocks=(Block(32, 5), Block(80, 5)), head="global_avg_pool", dense=()),
}


@dataclass(frozen=True)
class DeepSpec:
    """A deep stack of 3x3 convolutions at one width (the claims' plain and residual networks)."""

    name: str
    width: int = 16
    depth: int = 20  # convolutions after the stem, in pairs
    residual: bool = False

    def to_dict(self) -> dict:
        return {"kind": "deep", **vars(self)}


DEEP: dict[str, DeepSpec] = {
    "plain20": DeepSpec("plain20"),
    "residual20": DeepSpec("residual20", residual=True),
}


_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


@dataclass
class _Shape:
    channels: int
    size: int
    trail: list[str] = field(default_factory=list)


class CNN(nn.Module):
    """`features` (the conv base, used by transfer learning and feature-map views) then `classifier`."""

    def __init__(self, spec: CNNSpec, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        self.spec = spec
        shape = _Shape(in_channels, image_size)
        layers: list[nn.Module] = []
        for i, block in enumerate(spec.blocks, start=1):
            where = f"model block {i} (conv {block.kernel_size}x{block.kernel_size}, {block.filters} filters)"
            out = conv_output_size(shape.size, block.kernel_size, block.stride, block.padding, layer=where)
            pad = resolve_padding(block.padding, block.kernel_size)
            layers.append(nn.Conv2d(shape.channels, block.filters, block.kernel_size, block.stride, pad))
            if block.batch_norm:
                layers.append(nn.BatchNorm2d(block.filters))
            layers.append(_ACTIVATIONS[block.activation]())
            shape = _Shape(block.filters, out.size)
            if block.pool != "none":
                if block.pool_size > shape.size:
                    raise PipelineError(
                        f"model block {i}: {block.pool} pool {block.pool_size}x{block.pool_size} does not fit its "
                        f"{shape.size}x{shape.size} input (input {image_size}x{image_size}; remove a block, "
                        "use padding 'same' or a larger data.image_size)"
                    )
                pool_cls = nn.MaxPool2d if block.pool == "max" else nn.AvgPool2d
                layers.append(pool_cls(block.pool_size))
                shape = _Shape(shape.channels, shape.size // block.pool_size)
        self.features = nn.Sequential(*layers)
        # A ReLU followed by a max pool: in training the pool runs first (see _train_features)
        self._pool_first = {i for i, (a, b) in enumerate(zip(layers[:-1], layers[1:], strict=True))
                            if type(a) is nn.ReLU and isinstance(b, nn.MaxPool2d)}
        head: list[nn.Module] = []
        if spec.head == "global_avg_pool":
            head += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            width = shape.channels
        else:
            head.append(nn.Flatten())
            width = shape.channels * shape.size * shape.size
        for units in spec.dense:
            head += [nn.Linear(width, units), _ACTIVATIONS[spec.dense_activation]()]
            if spec.dropout > 0:
                head.append(nn.Dropout(spec.dropout))
            width = units
        head.append(nn.Linear(width, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x):
        return self.classifier(self._train_features(x) if self.training else self.features(x))

    def _train_features(self, x: torch.Tensor) -> torch.Tensor:
        """`features` with every ReLU -> max pool pair run as max pool -> ReLU. Max pooling commutes with ReLU
        (ReLU keeps the order of positive values and zeroes the rest, so the window's maximum and the gradient's
        path are the same), so outputs and gradients are equal (the trained weights bit-identical in
        tests/test_models.py; a window whose maximum is -0.0 gives -0.0 instead of +0.0), and ReLU, forward
        and backward, runs on a quarter of the values: the seed CNN's training step 15-35% faster on 2 CPU cores
        (benchmarks/README.md). Evaluation keeps the written order: the explain stage's feature maps and
        Grad-CAM read the ReLU's full-resolution output."""
        layers, i = self.features, 0
        while i < len(layers):
            if i in getattr(self, "_pool_first", ()):  # (a model pickled before it had none)
                x = layers[i](layers[i + 1](x))
                i += 2
            else:
                x = layers[i](x)
                i += 1
        return x


def preset(name: str, key: str = "model.preset") -> CNNSpec | DeepSpec:
    """The preset `name` (a CNNSpec, or a DeepSpec for the deep plain and residual stacks), or one line naming
    the known ones."""
    if name not in PRESETS and name not in DEEP:
        raise PipelineError(f"{key}: unknown CNN preset {name!r}; known: {', '.join([*PRESETS, *DEEP])}")
    return PRESETS.get(name) or DEEP[name]


class _Pair(nn.Module):
    """conv-ReLU-conv, plus its input when residual, then ReLU."""

    def __init__(self, width: int, residual: bool) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(width, width, 3, padding=1), nn.Conv2d(width, width, 3, padding=1)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(torch.relu(self.conv1(x)))
        return torch.relu(x + y if self.residual else y)


class DeepCNN(nn.Module):
    """A stride-2 3x3 stem, depth/2 pairs of 3x3 convolutions at one width (no BatchNorm, so that what reaches
    the first layer is what the depth lets through), global average pooling, one dense layer."""

    def __init__(self, spec: DeepSpec, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        self.spec = spec
        self.features = nn.Sequential(nn.Conv2d(in_channels, spec.width, 3, stride=2, padding=1), nn.ReLU(),
                                      *[_Pair(spec.width, spec.residual) for _ in range(spec.depth // 2)])
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(spec.width, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def build(spec: CNNSpec | DeepSpec, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """The network a spec describes."""
    return (DeepCNN if isinstance(spec, DeepSpec) else CNN)(spec, in_channels, image_size, num_classes)


def spec_from_params(m) -> CNNSpec:
    """From a params.model section: the named preset, or (preset `custom`) the layer stack written there."""
    if m.preset != "custom":
        return PRESETS[m.preset]
    return CNNSpec(
        name="custom",
        blocks=tuple(Block(**b.model_dump()) if hasattr(b, "model_dump") else Block(**b) for b in m.blocks),
        head=m.head, dense=tuple(m.dense), dropout=m.dropout,
    )


class Classifier(nn.Module):
    """The deployable model: pixels in [0, 1] shaped (N, C, H, W) -> (grey repeated to 3 channels) -> (resized to
    `input_size`) -> normalized -> the network. A model loaded from MLflow or a checkpoint needs no separate
    preprocessing step."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], net_channels: int,
                 input_size: int | None = None) -> None:
        super().__init__()
        self.net = net
        self.net_channels = net_channels
        self.input_size = input_size
        if len(mean) == 1 and net_channels == 3:
            mean, std = list(mean) * 3, list(std) * 3
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1 and self.net_channels == 3:
            x = x.expand(-1, 3, -1, -1)  # grayscale repeated for 3-channel backbones
        if self.input_size and x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(x))
