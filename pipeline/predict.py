"""Images in, predictions out: the one conversion of stored uint8 images to model inputs, and batched prediction.

Training (the data module), evaluation, the champion check and the transfer sweep all turn images into tensors
here, so every stage feeds a model the same pixels. Only torch and NumPy: evaluate and compare need no data
module, no augmentation library.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def device_for(accelerator: str = "auto") -> torch.device:
    """The device params.trainer.accelerator means on this machine (auto: the GPU when there is one)."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def to_float(images: np.ndarray | torch.Tensor, image_size: int | None = None) -> torch.Tensor:
    """uint8 (N, H, W, C) images as float (N, C, H, W) in [0, 1], resized (bilinear) to image_size when given.
    A torch uint8 tensor stays on its device."""
    x = torch.as_tensor(images)
    x = x.permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    if image_size and x.shape[-1] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x


@contextlib.contextmanager
def served_layout(model: nn.Module):
    """The model's convolution weights channels-last (NHWC: oneDNN's and cuDNN's fast layout; the same fp32 math,
    1.5-3x faster here than NCHW, benchmarks/README.md) for the block, their own layout given back afterwards.
    Predictions, latency, throughput and peak memory all run the model this way, so evaluate's speed figures are
    those of the predictions it makes."""
    convs = [w for w in model.parameters() if w.dim() == 4]
    restore = not all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    model.to(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        if restore:
            model.to(memory_format=torch.contiguous_format)


def as_served(x: torch.Tensor) -> torch.Tensor:
    """A batch of images in the layout served_layout's model takes (channels-last)."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


@torch.no_grad()
def predict_logits(model: nn.Module, images: np.ndarray, image_size: int, batch_size: int = 64,
                   device: torch.device | None = None) -> np.ndarray:
    """The model's outputs (logits, float32) for uint8 (N, H, W, C) images, resized to image_size, in batches on
    `device`, channels-last (served_layout)."""
    device = device or torch.device("cpu")
    model = model.to(device).eval()
    with served_layout(model):
        out = [model(as_served(to_float(images[i : i + batch_size], image_size).to(device))).float().cpu()
               for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def predict_proba(model: nn.Module, images: np.ndarray, image_size: int, batch_size: int = 64,
                  device: torch.device | None = None) -> np.ndarray:
    """Class probabilities (softmax of predict_logits) for uint8 (N, H, W, C) images."""
    return softmax(predict_logits(model, images, image_size, batch_size, device))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, C) logits, as torch computes it."""
    return torch.softmax(torch.from_numpy(logits), dim=1).numpy() if logits.size else logits


def accuracy(probs_or_pred: np.ndarray, y_true: np.ndarray) -> float:
    """Share of correct predictions, from class probabilities (N, C) or predicted labels (N,)."""
    pred = probs_or_pred.argmax(axis=1) if probs_or_pred.ndim == 2 else probs_or_pred
    return float((pred == y_true).mean())
