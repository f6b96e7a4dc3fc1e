"""Grad-CAM: where a model looks when it decides (Selvaraju et al. 2017), with Captum's LayerGradCam.

Captum (PyTorch's own attribution library) rather than pytorch-grad-cam: it needs nothing this project does not
already install (pytorch-grad-cam brings ttach and pulls OpenCV, scikit-learn and SciPy into explain), and its
maps equal pytorch-grad-cam's on our CNN (correlation 0.99999998, measured when choosing).

The map of a class is the ReLU of the last convolutional block's feature maps weighted by the gradient of that
class's logit, averaged over each map; upsampled to the stored image's size and scaled to [0, 1] per image.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.predict import to_float

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Tanh, nn.GELU)


def target_layer(model: nn.Module) -> nn.Module:
    """The last convolution's activation in the network's convolutional part (our CNN's features, a transfer
    model's base): its maps, before any pooling, at their finest."""
    net = getattr(model, "net", model)
    part = getattr(net, "base", None) or net.features
    activations = [m for m in part.modules() if isinstance(m, ACTIVATIONS)]
    return activations[-1] if activations else part  # SiLU or functional ReLU bases: their last feature map


def heatmaps(model: nn.Module, images: np.ndarray, targets: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Grad-CAM maps of uint8 (N, H, W, C) images for the classes `targets`: float (N, H, W) in [0, 1]."""
    from captum.attr import LayerAttribution, LayerGradCam

    model = model.cpu().eval()
    cam = LayerGradCam(model, target_layer(model))
    out = []
    for start in range(0, len(images), batch_size):
        x = to_float(images[start : start + batch_size])
        t = torch.as_tensor(targets[start : start + batch_size], dtype=torch.long)
        attribution = cam.attribute(x, target=t, relu_attributions=True)
        up = LayerAttribution.interpolate(attribution, tuple(x.shape[-2:]), interpolate_mode="bilinear")[:, 0]
        low = up.flatten(1).min(1).values[:, None, None]
        high = up.flatten(1).max(1).values[:, None, None]
        out.append(((up - low) / (high - low).clamp_min(1e-12)).detach().numpy())
    return np.concatenate(out) if out else np.zeros((0, *images.shape[1:3]))
