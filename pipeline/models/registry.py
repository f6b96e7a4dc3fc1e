"""One registry of architectures, by name, shared by compare, transfer_learn and the calculators.

Each entry knows how to build the classifier, where its convolutional base ends (for transfer learning),
where its ImageNet weights come from and how they expect pixels to be normalized, its canonical input, and
what the seed says about it (only what the seed says: None where it gives no figure).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torchvision
from torch import nn

from pipeline.errors import PipelineError
from pipeline.models.cnn import CNN, PRESETS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TensorFlow's Lite models were trained on pixels scaled to [-1, 1]; measured on scikit-learn's two sample
# photos, this normalization gives their ImageNet classes (bell cote/palace, daisy) and ImageNet's mean/std
# does not (daisy drops out of flower.jpg's top 5).
MINUS_ONE_TO_ONE = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

Builder = Callable[[int, int, int], nn.Module]  # (num_classes, image_size, in_channels) -> classifier


@dataclass(frozen=True)
class Architecture:
    name: str
    display: str
    year: int
    key_idea: str
    seed_says: str | None  # the seed's own words for the size, None where the seed gives none
    channels: int  # input channels the network itself expects (3 for ImageNet models, else the data's)
    canonical_size: int
    canonical_classes: int
    builder: Builder
    base: Callable[[nn.Module], nn.Module]  # the part of a built classifier before pooling + head
    imagenet: Callable[[], dict] | None = None  # loads the full model's ImageNet state dict, or None
    imagenet_norm: tuple[tuple[float, ...], tuple[float, ...]] = (IMAGENET_MEAN, IMAGENET_STD)
    min_size: int = 16  # the smallest input at which the base still leaves a feature map worth pooling
    note: str = ""  # what the count includes, where it differs from other tables

    @property
    def fixed_channels(self) -> bool:
        """ImageNet-style networks always take 3 channels; grey images are repeated by the Classifier."""
        return self.channels == 3 and self.canonical_classes == 1000

    def input_channels(self, data_channels: int) -> int:
        return self.channels if self.fixed_channels else data_channels

    def build(self, num_classes: int, image_size: int | None = None, in_channels: int | None = None) -> nn.Module:
        """The full classifier with `num_classes` outputs and random weights."""
        return self.builder(num_classes, image_size or self.canonical_size, in_channels or self.channels)

    def build_canonical(self) -> nn.Module:
        return self.build(self.canonical_classes, self.canonical_size, self.channels)


# ------------------------------------------------------------------------------------------ builders
def _torchvision(name: str, **kwargs) -> Builder:
    def build(num_classes: int, _image_size: int, _in_channels: int) -> nn.Module:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)

    return build


def _pipeline_cnn(preset: str) -> Builder:
    return lambda num_classes, image_size, in_channels: CNN(PRESETS[preset], in_channels, image_size, num_classes)


def _efficientnet_lite(variant: int) -> Builder:
    def build(num_classes: int, image_size: int, _in_channels: int) -> nn.Module:
        from efficientnet_lite_pytorch import EfficientNet

        # image_size fixes its TensorFlow-style "same" padding to the input the model will see.
        return EfficientNet.from_name(f"efficientnet-lite{variant}", num_classes=num_classes, image_size=image_size)

    return build


# ------------------------------------------------------------------------------- convolutional bases
def _features(m) -> nn.Module:
    return m.features  # alexnet, vgg16, mobilenet_v2, efficientnet_b0 and our CNNs


def _resnet_base(m) -> nn.Module:
    return nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)


def _googlenet_base(m) -> nn.Module:
    parts = [m.conv1, m.maxpool1, m.conv2, m.conv3, m.maxpool2, m.inception3a, m.inception3b, m.maxpool3,
             m.inception4a, m.inception4b, m.inception4c, m.inception4d, m.inception4e, m.maxpool4,
             m.inception5a, m.inception5b]
    return nn.Sequential(*parts)


def _inception_v3_base(m) -> nn.Module:
    parts = [m.Conv2d_1a_3x3, m.Conv2d_2a_3x3, m.Conv2d_2b_3x3, m.maxpool1, m.Conv2d_3b_1x1, m.Conv2d_4a_3x3,
             m.maxpool2, m.Mixed_5b, m.Mixed_5c, m.Mixed_5d, m.Mixed_6a, m.Mixed_6b, m.Mixed_6c, m.Mixed_6d,
             m.Mixed_6e, m.Mixed_7a, m.Mixed_7b, m.Mixed_7c]
    return nn.Sequential(*parts)


def _efficientnet_lite_base(m) -> nn.Module:
    # The blocks run without drop-connect here (they get drop_connect_rate=None from nn.Sequential).
    return nn.Sequential(m._conv_stem, m._bn0, nn.ReLU6(), *m._blocks, m._conv_head, m._bn1, nn.ReLU6())


# ----------------------------------------------------------------------------------- ImageNet weights
def _torchvision_imagenet(name: str) -> Callable[[], dict]:
    def load() -> dict:
        from pipeline.models.weights import torchvision_imagenet_state

        return torchvision_imagenet_state(name)

    return load


def _lite_imagenet(variant: int) -> Callable[[], dict]:
    def load() -> dict:
        from pipeline.models.weights import efficientnet_lite_state

        return efficientnet_lite_state(variant)

    return load


def _lite(variant: int, size: int, idea: str) -> Architecture:
    return Architecture(f"efficientnet_lite{variant}", f"EfficientNet-Lite{variant}", 2020, idea, None, 3, size, 1000,
                        _efficientnet_lite(variant), _efficientnet_lite_base, _lite_imagenet(variant),
                        MINUS_ONE_TO_ONE, min_size=32)


def _tv(name, display, year, idea, seed, base=_features, min_size=32, note="", size=224, **kw) -> Architecture:
    return Architecture(name, display, year, idea, seed, 3, size, 1000, _torchvision(name, **kw), base,
                        _torchvision_imagenet(name), min_size=min_size, note=note)


REGISTRY: dict[str, Architecture] = {a.name: a for a in [
    Architecture("lenet5", "LeNet-5", 1998, "convolution + subsampling, trained end to end on digits", "60K",
                 1, 32, 10, _pipeline_cnn("lenet5"), _features, min_size=28),
    _tv("alexnet", "AlexNet", 2012, "ReLU, dropout and GPU training; won ImageNet 2012", "60M", min_size=64),
    _tv("vgg16", "VGG16", 2014, "depth from stacks of small 3x3 convolutions", "138M"),
    _tv("googlenet", "GoogLeNet", 2014, "Inception modules: parallel 1x1/3x3/5x5 branches", "6.8M",
        base=_googlenet_base, aux_logits=False, init_weights=True),
    _tv("inception_v3", "InceptionV3", 2015, "factorized Inception modules (1xn + nx1), 299x299 input", None,
        base=_inception_v3_base, min_size=75, size=299, aux_logits=False, init_weights=True,
        note="counted without the auxiliary classifier, 27,161,264 with it; Keras' InceptionV3: 23,851,784"),
    _tv("resnet18", "ResNet18", 2015, "residual (skip) connections, 18 layers", None, base=_resnet_base),
    _tv("resnet50", "ResNet50", 2015, "residual (skip) connections make 50+ layers trainable", "25M",
        base=_resnet_base),
    _tv("mobilenet_v2", "MobileNetV2", 2018, "inverted residuals with depthwise separable convolutions",
        "Lightweight", min_size=64),
    _tv("efficientnet_b0", "EfficientNet-B0", 2019, "compound scaling of depth, width and resolution", "5.3M",
        min_size=64),
    _lite(0, 224, "EfficientNet-B0 without squeeze-excite, ReLU6: mobile-friendly"),
    _lite(1, 240, "Lite0 scaled up in depth, width and input (240x240)"),
    _lite(2, 260, "Lite0 scaled up further (260x260 input)"),
    Architecture("seed_mnist", "Our CNN (seed_mnist)", 2026, "two conv blocks 32 -> 64, dense 128, for 28x28",
                 "421,642", 1, 28, 10, _pipeline_cnn("seed_mnist"), _features, min_size=28),
]}


def get(name: str, key: str = "architecture") -> Architecture:
    """The registry entry for `name`, or the one-line error listing the known names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise PipelineError(f"{key}: unknown architecture {name!r}; known: {', '.join(REGISTRY)}") from None


def parse_seed_figure(text: str | None) -> float | None:
    """'60K' -> 60_000, '6.8M' -> 6_800_000, '421,642' -> 421_642; None for words ('Lightweight') or None."""
    if not text:
        return None
    text = text.replace(",", "")
    scale = {"K": 1e3, "M": 1e6, "B": 1e9}.get(text[-1], 1.0)
    try:
        return float(text[:-1] if text[-1] in "KMB" else text) * scale
    except ValueError:
        return None


def conv_base(name: str, model: nn.Module) -> nn.Module:
    """The part of a built classifier that maps images to feature maps (everything before pooling + head)."""
    return get(name).base(model)


def base_blocks(base: nn.Module) -> list[nn.Module]:
    """The base's top-level blocks that hold parameters, first to last: the units that fine-tuning unfreezes."""
    return [child for child in base.children() if any(True for _ in child.parameters())]
