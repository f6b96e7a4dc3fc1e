"""Figures people would rather look at than read: grids, curves, confusion matrices, filters, feature maps."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.atomic import save_figure  # noqa: E402


def _show(ax, img: np.ndarray, title: str | None = None, cmap: str | None = None) -> None:
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    ax.imshow(img, cmap=cmap or ("gray" if img.ndim == 2 else None), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str], path: Path, cols: int = 8,
               suptitle: str = "", cell: float = 1.3) -> Path:
    """Images in a grid with a short title each."""
    rows = max(1, math.ceil(len(images) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell, rows * cell + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images, titles, strict=False):
        ax.axis("on")
        _show(ax, img, title)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return save_figure(fig, path)


def sample_grid(x: np.ndarray, y: np.ndarray, class_names: list[str], per_class: int, path: Path) -> Path:
    """`per_class` training images of every class, one row per class."""
    n = len(class_names)
    fig, axes = plt.subplots(n, per_class, figsize=(per_class * 1.0, n * 1.0 + 0.3), squeeze=False)
    for c in range(n):
        idx = np.flatnonzero(y == c)[:per_class]
        for j in range(per_class):
            ax = axes[c, j]
            ax.axis("off")
            if j < len(idx):
                _show(ax, x[idx[j]])
        axes[c, 0].text(-0.3, 0.5, class_names[c], transform=axes[c, 0].transAxes, ha="right", va="center",
                        fontsize=9)
    fig.suptitle("Training samples by class", fontsize=10)
    return save_figure(fig, path)


def augmentation_preview(originals: Sequence[np.ndarray], views: Sequence[Sequence[np.ndarray]],
                         path: Path) -> Path:
    """Each row: the original image, then its augmented views."""
    rows, cols = len(originals), 1 + max(len(v) for v in views)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.2, rows * 1.2 + 0.3), squeeze=False)
    for r, (orig, row_views) in enumerate(zip(originals, views, strict=True)):
        _show(axes[r, 0], orig, "original" if r == 0 else None)
        for c, view in enumerate(row_views, start=1):
            _show(axes[r, c], view, f"aug {c}" if r == 0 else None)
    fig.suptitle("Augmentation preview (albumentations pipeline from params.augment)", fontsize=9)
    return save_figure(fig, path)


def learning_curves(rows: list[dict[str, float]], path: Path, title: str) -> Path:
    """Loss and accuracy per epoch, train against val."""
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, ax in (("loss", ax_loss), ("acc", ax_acc)):
        for split, style in (("train", "-o"), ("val", "-s")):
            values = [r.get(f"{split}_{key}") for r in rows]
            if any(v is not None for v in values):
                ax.plot(epochs, values, style, label=split, markersize=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def confusion_matrix(cm: np.ndarray, class_names: list[str], path: Path, title: str,
                     normalize: bool = False) -> Path:
    values = cm.astype(float)
    if normalize:
        values = values / np.maximum(values.sum(axis=1, keepdims=True), 1)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n, 0.8 + 0.5 * n))
    im = ax.imshow(values, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=45 if n > 10 else 0)
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = values.max() / 2 if values.size else 0
    for i in range(n):
        for j in range(n):
            text = f"{values[i, j]:.2f}" if normalize else f"{int(values[i, j])}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if values[i, j] > threshold else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def bubble_chart(rows: list[dict], path: Path) -> Path:
    """Test accuracy against parameters (log x), bubble area by multiply-accumulates."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    macs = np.array([max(r["macs"], 1) for r in rows], dtype=float)
    sizes = 60 + 900 * (macs / macs.max())
    ax.scatter([r["params"] for r in rows], [r["test_acc"] for r in rows], s=sizes, alpha=0.5)
    for r in rows:
        ax.annotate(r["architecture"], (r["params"], r["test_acc"]), fontsize=8, ha="center", va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel("parameters (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy vs parameters (bubble area = MACs per image)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    return save_figure(fig, path)


def filter_grid(weights: np.ndarray, path: Path, title: str, max_filters: int = 32) -> Path:
    """First-layer filters (out, in, k, k) as images, each scaled to its own range."""
    w = weights[:max_filters]
    imgs = []
    for f in w:
        img = f.transpose(1, 2, 0) if f.shape[0] == 3 else f.mean(axis=0)
        img = (img - img.min()) / (img.max() - img.min() + 1e-8)
        imgs.append(img)
    return image_grid(imgs, [f"#{i}" for i in range(len(imgs))], path, cols=min(8, len(imgs)),
                      suptitle=title, cell=1.0)


def feature_maps(blocks: list[tuple[str, np.ndarray]], image: np.ndarray, path: Path, max_maps: int) -> Path:
    """One row per conv block: the first `max_maps` channels of its output for one image."""
    cols = max_maps + 1
    fig, axes = plt.subplots(len(blocks), cols, figsize=(cols * 0.9, len(blocks) * 1.0 + 0.4), squeeze=False)
    for r, (name, maps) in enumerate(blocks):
        _show(axes[r, 0], image, "input" if r == 0 else None)
        axes[r, 0].set_ylabel(name, fontsize=7)
        for c in range(1, cols):
            ax = axes[r, c]
            ax.axis("off")
            if c - 1 < len(maps):
                ax.imshow(maps[c - 1], cmap="viridis", interpolation="nearest")
        axes[r, 1].set_title(f"{name}: {maps.shape[0]} maps of {maps.shape[1]}x{maps.shape[2]}", fontsize=7,
                             loc="left")
    fig.suptitle("Feature maps: edges -> patterns -> objects", fontsize=10)
    return save_figure(fig, path)


def crossover(summary: dict[str, dict[str, dict]], strategies: list[str], path: Path, title: str) -> Path:
    """Test accuracy against labelled images per class, one line per strategy, error bars = std over seeds."""
    ns = sorted(int(n) for n in summary)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for strategy in strategies:
        means = [summary[str(n)][strategy]["mean"] for n in ns]
        stds = [summary[str(n)][strategy]["std"] for n in ns]
        ax.errorbar(ns, means, yerr=stds, marker="o", capsize=4, label=strategy)
    ax.set_xscale("log")
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.set_xlabel("labelled training images per class (log scale)")
    ax.set_ylabel("test accuracy (mean +- std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def predictions_grid(images: np.ndarray, truth: Sequence[str], predicted: dict[str, Sequence[str]], path: Path,
                     title: str) -> Path:
    """Test images in columns, one row per model: each cell its predicted label, green when right, red when
    wrong; the true label above the first row."""
    rows, cols = len(predicted), len(images)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.5, rows * 1.55 + 0.6), squeeze=False)
    for r, (model, labels) in enumerate(predicted.items()):
        for c, (image, label) in enumerate(zip(images, labels, strict=True)):
            ax = axes[r, c]
            _show(ax, image)
            right = label == truth[c]
            ax.set_xlabel(label, fontsize=7, color="green" if right else "red")
            if r == 0:
                ax.set_title(f"true: {truth[c]}", fontsize=7)
        axes[r, 0].set_ylabel(model, fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def claim_bars(arms: dict[str, list[float]], metric: str, title: str, path: Path) -> Path:
    """One bar per arm (the mean over seeds, the std as error bar), each seed a dot."""
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(arms), 3.6))
    for i, values in enumerate(arms.values()):
        values = np.asarray(values, dtype=float)
        ax.bar(i, values.mean(), yerr=values.std(ddof=1) if len(values) > 1 else 0, capsize=5, alpha=0.6)
        ax.scatter(np.full(len(values), i), values, color="black", s=12, zorder=3)
    ax.set_xticks(range(len(arms)), list(arms))
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(title, fontsize=8, wrap=True)
    return save_figure(fig, path)


def claim_curves(arms: dict[str, list[tuple[list, list]]], xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    """One line per arm: the mean over seeds of its curve, the band between the seeds' lowest and highest."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for arm, curves in arms.items():
        xs = curves[0][0]
        ys = np.array([[np.nan if v is None else v for v in c[1]] for c in curves if len(c[1]) == len(xs)], float)
        ax.plot(xs, np.nanmean(ys, 0), marker="o", markersize=3, label=f"{arm} ({len(ys)} seeds)")
        ax.fill_between(xs, np.nanmin(ys, 0), np.nanmax(ys, 0), alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=8, wrap=True)
    return save_figure(fig, path)


def gradcam_grid(rows: dict[str, tuple[list[np.ndarray], list[np.ndarray], list[str]]], path: Path,
                 title: str) -> Path:
    """A row per group (right, wrong): each image with its Grad-CAM map over it (red: where the class's
    evidence is), its caption below."""
    cols = max(1, max(len(images) for images, _, _ in rows.values()))
    fig, axes = plt.subplots(len(rows), cols, figsize=(cols * 1.6, len(rows) * 1.8 + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, (label, (images, maps, captions)) in enumerate(rows.items()):
        for c, (image, heat, caption) in enumerate(zip(images, maps, captions, strict=True)):
            ax = axes[r, c]
            ax.axis("on")
            _show(ax, image)
            ax.imshow(heat, cmap="jet", alpha=0.45, interpolation="bilinear",
                      extent=(-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5))
            ax.set_xlabel(caption, fontsize=6)
        axes[r, 0].set_ylabel(label, fontsize=8)
        axes[r, 0].axis("on")
        axes[r, 0].set_xticks([])
        axes[r, 0].set_yticks([])
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)
