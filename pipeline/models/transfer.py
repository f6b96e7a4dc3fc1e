"""Transfer learning: a registry backbone's conv base under the seed's head, freezing, and weights.

Head (as the seed writes it): global average pooling -> Dense(head_units) -> ReLU -> Dropout -> Dense(classes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.models import registry
from pipeline.models.state import check_fits, read_state_dict


class TransferNet(nn.Module):
    def __init__(self, backbone: str, num_classes: int, head_units: int, head_dropout: float,
                 image_size: int, in_channels: int = 3) -> None:
        super().__init__()
        arch = registry.get(backbone, "transfer.backbone")
        in_channels = arch.input_channels(in_channels)
        full = arch.build(num_classes=10, image_size=image_size, in_channels=in_channels)
        self.backbone_name = backbone
        self.image_size = image_size
        self.base = registry.conv_base(backbone, full)
        with torch.no_grad():
            channels = _probe_channels(self.base, backbone, in_channels, image_size)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(
            nn.Linear(channels, head_units), nn.ReLU(), nn.Dropout(head_dropout), nn.Linear(head_units, num_classes),
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.base(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _probe_channels(base: nn.Module, name: str, channels: int, image_size: int) -> int:
    was_training = base.training
    base.eval()
    try:
        out = base(torch.zeros(1, channels, image_size, image_size))
    except RuntimeError as exc:
        reason = str(exc).splitlines()[0][:120]
        raise PipelineError(f"transfer.image_size={image_size} is too small for {name} ({reason})") from None
    finally:
        base.train(was_training)
    return int(out.shape[1])


def freeze_base(model: TransferNet, trainable_blocks: int | str = 0) -> None:
    """Freeze the conv base except its last `trainable_blocks` blocks ('all' unfreezes everything)."""
    blocks = registry.base_blocks(model.base)
    n = len(blocks) if trainable_blocks == "all" else int(trainable_blocks)
    for p in model.base.parameters():
        p.requires_grad = n >= len(blocks)
    for block in blocks[len(blocks) - n:] if n else []:
        for p in block.parameters():
            p.requires_grad = True
    for p in model.head.parameters():
        p.requires_grad = True


def freeze_batchnorm(module: nn.Module) -> None:
    """BatchNorm layers keep their pretrained statistics and affine weights (frozen parts run in eval mode).

    Keras' transfer-learning guide does the same when fine-tuning: small batches of new images would
    otherwise pull the ImageNet statistics away under the head that was trained on them.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for p in m.parameters():
                p.requires_grad = False


# --------------------------------------------------------------------------------------------- weights
def load_imagenet_base(model: TransferNet) -> None:
    """Load the registry entry's ImageNet weights into the conv base (offline sources first, else one line)."""
    arch = registry.get(model.backbone_name, "transfer.backbone")
    if arch.imagenet is None:
        with_weights = [name for name, a in registry.REGISTRY.items() if a.imagenet is not None]
        raise PipelineError(f"transfer.weights=imagenet: {model.backbone_name} has no ImageNet weights "
                            f"(backbones with them: {', '.join(with_weights)}; or use none or a checkpoint path)")
    full = arch.build(num_classes=1000, image_size=model.image_size)
    # Auxiliary heads (googlenet, inception_v3) are not built; every weight of the base must load.
    missing, _ = full.load_state_dict(arch.imagenet(), strict=False)
    base = registry.conv_base(model.backbone_name, full)
    base_ids = {id(t) for t in [*base.parameters(), *base.buffers()]}
    named = dict(full.named_parameters()) | dict(full.named_buffers())
    lost = [k for k in missing if k in named and id(named[k]) in base_ids]
    if lost:
        raise PipelineError(f"transfer.weights=imagenet: the {model.backbone_name} weights lack {lost[0]}")
    model.base.load_state_dict(base.state_dict())


def load_base_from_checkpoint(model: TransferNet, path: Path) -> None:
    """Load the conv base from a checkpoint of this pipeline; a shape mismatch names the first bad layer."""
    state = read_state_dict(path)
    prefixes = ("net.base.", "base.", "net.features.", "features.")
    prefix = next((p for p in prefixes if any(k.startswith(p) for k in state)), None)
    if prefix is None:
        raise PipelineError(f"transfer.weights={path}: no convolutional base in this checkpoint")
    base_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    own = model.base.state_dict()
    check_fits(own, base_state, f"transfer.weights={path}", model.backbone_name)
    model.base.load_state_dict({k: base_state[k] for k in own})


# ------------------------------------------------------------------------------------ cached features
def frozen_prefix(model: TransferNet) -> int:
    """How many of the base's leading blocks have nothing to train: the part whose output can be computed once
    (all of them when the base is frozen, none when its first block trains)."""
    count = 0
    for child in model.base.children():
        if any(p.requires_grad for p in child.parameters()):
            break
        count += 1
    return count


class HeadOnly(nn.Module):
    """The transfer head as a model of its own, trained on cached pooled features of the frozen base."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)


class Suffix(nn.Module):
    """The trainable end of a network: its base's blocks after the frozen prefix, pooling and head, trained on
    the cached output of the prefix (the same modules as the full network's: training this trains that)."""

    def __init__(self, net: TransferNet, prefix: int) -> None:
        super().__init__()
        self.suffix = nn.Sequential(*list(net.base.children())[prefix:])
        self.pool, self.head = net.pool, net.head

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.suffix(activations)))


@torch.no_grad()
def extract(model: nn.Module, images: np.ndarray, prefix: int | None = None, batch_size: int | None = None,
            device: torch.device | None = None, channels_last: bool = True,
            autocast: torch.dtype | None = None) -> torch.Tensor:
    """What a frozen part of a transfer model computes from uint8 (N, H, W, C) images, through the model's own
    preprocessing (channels, resize, normalization), once: the base's first `prefix` blocks' activations, or
    (prefix None) the whole base's pooled features, what the head sees. `channels_last` (params.trainer): NHWC
    convolutions, as in training (EfficientNet-Lite0 at 64 px: 1.65 s -> 1.0 s for 400 images on 2 cores).
    Batches of 32 on the CPU, where a batch's activations then stay in cache (400 images: 1.0 s at 256, 0.56 s
    at 64, 0.40 s at 32, 0.44 s at 16), 256 on a GPU. `autocast`: the forward in that dtype (bf16 for training
    images' features where trainings run bf16), returned as float32."""
    device = device or torch.device("cpu")
    batch_size = batch_size or (32 if device.type == "cpu" else 256)
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    part = model.net.features if prefix is None else nn.Sequential(*list(model.net.base.children())[:prefix])
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size]).to(device).permute(0, 3, 1, 2).float() / 255.0
        with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            out.append(part(model.preprocess(x)).float().cpu().contiguous())
    model.cpu()
    return torch.cat(out) if out else torch.zeros(0)
