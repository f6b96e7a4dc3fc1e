"""Classic hand-made filters: what a first conv layer learns on its own."""

from __future__ import annotations

import numpy as np

from pipeline.fundamentals.ops import conv2d

CLASSIC_FILTERS: dict[str, np.ndarray] = {
    "vertical edge": np.array([[1, 0, -1], [1, 0, -1], [1, 0, -1]], dtype=float),
    "horizontal edge": np.array([[1, 1, 1], [0, 0, 0], [-1, -1, -1]], dtype=float),
    "sobel x": np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], dtype=float),
    "sobel y": np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], dtype=float),
    "blur": np.full((3, 3), 1 / 9),
    "sharpen": np.array([[0, -1, 0], [-1, 5, -1], [0, -1, 0]], dtype=float),
}


def apply_filter(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Convolve one grayscale image (H, W) with one kernel, 'same' padding."""
    return conv2d(image[None, None].astype(float), kernel[None, None], padding="same")[0, 0]


def to_gray(image: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8 or float -> (H, W) float in [0, 1]."""
    img = np.asarray(image, dtype=float)
    if img.max() > 1.0:
        img = img / 255.0
    if img.ndim == 3:
        img = img[..., :3].mean(axis=2) if img.shape[2] >= 3 else img[..., 0]
    return img
