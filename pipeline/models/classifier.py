"""The deployable model: input adaptation (channels, normalization) in front of any network.

It takes float images in [0, 1] shaped (N, C, H, W) as the data pipeline and users give them, so a model
loaded from MLflow or a checkpoint needs no separate preprocessing step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


class Classifier(nn.Module):
    """Pixels in [0, 1] -> (grey repeated to 3 channels) -> (resized to `input_size`) -> normalized -> net."""

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
