"""Convolution and pooling by hand, in NumPy, exactly as the course writes them (checked against torch).

Shapes follow torch: images (N, C, H, W), filters (C_out, C_in, K, K).
"""

from __future__ import annotations

import numpy as np

from pipeline.fundamentals.sizes import conv_output_size, resolve_padding


def conv2d(images: np.ndarray, filters: np.ndarray, bias: np.ndarray | None = None, stride: int = 1,
           padding: str | int = 0) -> np.ndarray:
    """Cross-correlation (what deep-learning 'convolution' means): slide each filter, multiply, sum, add bias."""
    images = np.asarray(images, dtype=np.float64)
    filters = np.asarray(filters, dtype=np.float64)
    n, c_in, h, w = images.shape
    c_out, c_in_f, k, _ = filters.shape
    if c_in != c_in_f:
        raise ValueError(f"filters expect {c_in_f} input channels, images have {c_in}")
    pad = resolve_padding(padding, k)
    out_h = conv_output_size(h, k, stride, pad).size
    out_w = conv_output_size(w, k, stride, pad).size
    padded = np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = np.zeros((n, c_out, out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            window = padded[:, :, i * stride:i * stride + k, j * stride:j * stride + k]  # (N, C_in, K, K)
            out[:, :, i, j] = np.tensordot(window, filters, axes=([1, 2, 3], [1, 2, 3]))
    if bias is not None:
        out += np.asarray(bias, dtype=np.float64)[None, :, None, None]
    return out


def pool2d(images: np.ndarray, size: int = 2, stride: int | None = None, mode: str = "max") -> np.ndarray:
    """Max or average pooling over size x size windows (stride defaults to the window size)."""
    images = np.asarray(images, dtype=np.float64)
    stride = stride or size
    n, c, h, w = images.shape
    out_h = conv_output_size(h, size, stride, 0).size
    out_w = conv_output_size(w, size, stride, 0).size
    reduce = np.max if mode == "max" else np.mean
    out = np.zeros((n, c, out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            out[:, :, i, j] = reduce(images[:, :, i * stride:i * stride + size, j * stride:j * stride + size],
                                     axis=(2, 3))
    return out


def global_avg_pool(images: np.ndarray) -> np.ndarray:
    """One number per channel: the mean of its whole map, (N, C, H, W) -> (N, C)."""
    return np.asarray(images, dtype=np.float64).mean(axis=(2, 3))


# The classic worked examples of the course.
EXAMPLE_IMAGE = np.array([[1, 1, 1, 0, 0],
                          [0, 1, 1, 1, 0],
                          [0, 0, 1, 1, 1],
                          [0, 0, 1, 1, 0],
                          [0, 1, 1, 0, 0]])
EXAMPLE_FILTER = np.array([[1, 0, 1],
                           [0, 1, 0],
                           [1, 0, 1]])
EXAMPLE_POOL_INPUT = np.arange(1, 17).reshape(4, 4)  # [[1..4], [5..8], [9..12], [13..16]]
