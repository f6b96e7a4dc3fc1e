"""One registry of architectures, by name, shared by compare, transfer_learn and the calculators.

Each entry knows how to build the classifier, where its convolutional base ends (for transfer learning),
its canonical input, and what the seed's table says about it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torchvision
from torch import nn

from pipeline.errors import PipelineError
from pipeline.models.cnn import CNN, PRESETS


@dataclass(frozen=True)
class Architecture:
    name: str
    display: str
    year: int
    key_idea: str
    seed_params: str  # the rounded figure the seed's table gives
    channels: int  # input channels the network itself expects
    canonical_size: int
    canonical_classes: int
    torchvision: bool

    def build(self, num_classes: int, image_size: int | None = None, in_channels: int | None = None) -> nn.Module:
        """The full classifier with `num_classes` outputs and random weights."""
        if self.torchvision:
            kwargs = {"aux_logits": False, "init_weights": True} if self.name == "googlenet" else {}
            return torchvision.models.get_model(self.name, weights=None, num_classes=num_classes, **kwargs)
        return CNN(PRESETS[self.name], in_channels or self.channels, image_size or self.canonical_size, num_classes)

    def build_canonical(self) -> nn.Module:
        return self.build(self.canonical_classes, self.canonical_size, self.channels)


def _tv(name, display, year, idea, seed):
    return Architecture(name, display, year, idea, seed, 3, 224, 1000, True)


REGISTRY: dict[str, Architecture] = {a.name: a for a in [
    Architecture("lenet5", "LeNet-5", 1998, "convolution + subsampling, trained end to end on digits", "60K",
                 1, 32, 10, False),
    _tv("alexnet", "AlexNet", 2012, "ReLU, dropout and GPU training; won ImageNet 2012", "60M"),
    _tv("vgg16", "VGG16", 2014, "depth from stacks of small 3x3 convolutions", "138M"),
    _tv("googlenet", "GoogLeNet", 2014, "Inception modules: parallel 1x1/3x3/5x5 branches", "6.8M"),
    _tv("resnet18", "ResNet18", 2015, "residual (skip) connections, 18 layers", "11.7M"),
    _tv("resnet50", "ResNet50", 2015, "residual (skip) connections make 50+ layers trainable", "25M"),
    _tv("mobilenet_v2", "MobileNetV2", 2018, "inverted residuals with depthwise separable convolutions",
        "3.4M"),
    _tv("efficientnet_b0", "EfficientNet-B0", 2019, "compound scaling of depth, width and resolution", "5.3M"),
    Architecture("seed_mnist", "Our CNN (seed_mnist)", 2026, "two conv blocks 32 -> 64, dense 128, for 28x28",
                 "421,642", 1, 28, 10, False),
]}


def get(name: str, key: str = "architecture") -> Architecture:
    """The registry entry for `name`, or the one-line error listing the known names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise PipelineError(f"{key}: unknown architecture {name!r}; known: {', '.join(REGISTRY)}") from None


def parse_seed_figure(text: str) -> float:
    """'60K' -> 60_000, '6.8M' -> 6_800_000, '421,642' -> 421_642."""
    text = text.replace(",", "")
    scale = {"K": 1e3, "M": 1e6, "B": 1e9}.get(text[-1], 1.0)
    return float(text[:-1] if text[-1] in "KMB" else text) * scale


# ------------------------------------------------------------------------------- convolutional bases
def _resnet_base(m) -> nn.Module:
    return nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)


def _googlenet_base(m) -> nn.Module:
    parts = [m.conv1, m.maxpool1, m.conv2, m.conv3, m.maxpool2, m.inception3a, m.inception3b, m.maxpool3,
             m.inception4a, m.inception4b, m.inception4c, m.inception4d, m.inception4e, m.maxpool4,
             m.inception5a, m.inception5b]
    return nn.Sequential(*parts)


_BASES: dict[str, Callable[[nn.Module], nn.Module]] = {
    "resnet18": _resnet_base,
    "resnet50": _resnet_base,
    "googlenet": _googlenet_base,
}


def conv_base(name: str, model: nn.Module) -> nn.Module:
    """The part of a built classifier that maps images to feature maps (everything before pooling + head)."""
    if name in _BASES:
        return _BASES[name](model)
    return model.features  # alexnet, vgg16, mobilenet_v2, efficientnet_b0 and our CNNs


def base_blocks(base: nn.Module) -> list[nn.Module]:
    """The base's top-level blocks that hold parameters, first to last: the units that fine-tuning unfreezes."""
    return [child for child in base.children() if any(True for _ in child.parameters())]
