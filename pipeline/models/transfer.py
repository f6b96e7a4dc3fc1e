"""Transfer learning: a registry backbone's conv base under the seed's head, freezing, and weights.

Head (as the seed writes it): global average pooling -> Dense(head_units) -> ReLU -> Dropout -> Dense(classes).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from pipeline.errors import PipelineError
from pipeline.models import registry


class TransferNet(nn.Module):
    def __init__(self, backbone: str, num_classes: int, head_units: int, head_dropout: float,
                 image_size: int, in_channels: int = 3) -> None:
        super().__init__()
        arch = registry.get(backbone, "transfer.backbone")
        full = arch.build(num_classes=10, image_size=image_size, in_channels=in_channels)
        self.backbone_name = backbone
        self.base = registry.conv_base(backbone, full)
        with torch.no_grad():
            channels = _probe_channels(self.base, backbone, arch.channels if arch.torchvision else in_channels,
                                       image_size)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(
            nn.Linear(channels, head_units), nn.ReLU(), nn.Dropout(head_dropout), nn.Linear(head_units, num_classes),
        )
        self.feature_dim = channels

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


def set_frozen_eval(model: nn.Module) -> None:
    """Frozen parts run in inference mode: BatchNorm keeps its running statistics, dropout and stochastic
    depth are off, so a frozen base is a fixed function (and its features can be cached)."""
    for m in model.modules():
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            m.eval()


# --------------------------------------------------------------------------------------------- weights
def imagenet_weights_file(backbone: str) -> tuple[object, Path]:
    """torchvision's ImageNet weights enum for `backbone` and the file it is cached as under $TORCH_HOME."""
    arch = registry.get(backbone, "transfer.backbone")
    if not arch.torchvision:
        raise PipelineError(f"transfer.weights=imagenet: {backbone} has no ImageNet weights "
                            "(use source_task, none or a checkpoint path)")
    weights = torchvision.models.get_model_weights(backbone).DEFAULT
    filename = os.path.basename(urlparse(weights.url).path)
    return weights, Path(torch.hub.get_dir()) / "checkpoints" / filename


def load_imagenet_base(model: TransferNet) -> None:
    """Load torchvision's ImageNet weights into the conv base: from the cache, else a download, else one line."""
    weights, path = imagenet_weights_file(model.backbone_name)
    if path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(15)
        try:
            state = weights.get_state_dict(progress=True)
        except Exception as exc:
            raise PipelineError(
                f"transfer.weights=imagenet: {path.name} is not cached and could not be downloaded "
                f"({type(exc).__name__}); put {path.name} into {path.parent}/ (or set TORCH_HOME)"
            ) from None
        finally:
            socket.setdefaulttimeout(previous)
    full = registry.get(model.backbone_name).build(num_classes=1000)
    full.load_state_dict(state, strict=False)
    model.base.load_state_dict(registry.conv_base(model.backbone_name, full).state_dict())


def load_base_from_checkpoint(model: TransferNet, path: Path) -> None:
    """Load the conv base from a checkpoint of this pipeline; a shape mismatch names the first bad layer."""
    from pipeline.models.checkpoint import read_state_dict

    state = read_state_dict(path)
    prefixes = ("net.base.", "base.", "net.features.", "features.")
    prefix = next((p for p in prefixes if any(k.startswith(p) for k in state)), None)
    if prefix is None:
        raise PipelineError(f"transfer.weights={path}: no convolutional base in this checkpoint")
    base_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    own = model.base.state_dict()
    for key, tensor in own.items():
        theirs = base_state.get(key)
        if theirs is None:
            raise PipelineError(f"transfer.weights={path}: layer {key} is missing "
                                f"(checkpoint of another backbone than {model.backbone_name}?)")
        if tuple(theirs.shape) != tuple(tensor.shape):
            raise PipelineError(f"transfer.weights={path}: layer {key} has shape {tuple(theirs.shape)}, "
                                f"{model.backbone_name} needs {tuple(tensor.shape)}")
    model.base.load_state_dict({k: base_state[k] for k in own})
