"""The albumentations pipeline, built from params.augment and serialized with albumentations' own format.

The `augment` stage writes data/augmented/pipeline.json; the training stages load that file, so what ran is
exactly what was saved (and logged to MLflow).
"""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import numpy as np

from pipeline.atomic import atomic_path
from pipeline.errors import PipelineError

PIPELINE_PATH = Path("data/augmented/pipeline.json")
OFFLINE_PATH = Path("data/augmented/offline.npz")
PREVIEW_PATH = Path("plots/augment/preview.png")


def build(p, seed: int) -> A.Compose:
    """An A.Compose from a params.augment section, in the seed's (Keras ImageDataGenerator) terms; empty when
    augmentation is disabled."""
    transforms: list[A.BasicTransform] = []
    if p.enabled:
        if p.rotation_range or p.width_shift_range or p.height_shift_range or p.zoom_range:
            transforms.append(A.Affine(
                rotate=(-p.rotation_range, p.rotation_range),
                translate_percent={"x": (-p.width_shift_range, p.width_shift_range),
                                   "y": (-p.height_shift_range, p.height_shift_range)},
                scale=(1.0 - p.zoom_range, 1.0 + p.zoom_range),
                border_mode=0, fill=0, p=p.affine_p,
            ))
        if p.horizontal_flip:
            transforms.append(A.HorizontalFlip(p=p.flip_p))
        if p.brightness or p.contrast:
            transforms.append(A.RandomBrightnessContrast(
                brightness_limit=p.brightness, contrast_limit=p.contrast, p=p.brightness_contrast_p))
        cut = p.coarse_dropout
        if cut.p > 0:
            transforms.append(A.CoarseDropout(
                num_holes_range=(1, cut.max_holes), hole_height_range=(0.1, cut.max_size),
                hole_width_range=(0.1, cut.max_size), fill=0, p=cut.p,
            ))
    return A.Compose(transforms, seed=seed)


def save(transform: A.Compose, path: Path = PIPELINE_PATH) -> None:
    with atomic_path(path) as tmp:
        A.save(transform, str(tmp), data_format="json")


def load(path: Path = PIPELINE_PATH, seed: int | None = None) -> A.Compose:
    """Load a serialized pipeline; `seed` makes its random draws reproducible (albumentations does not store it)."""
    if not Path(path).exists():
        raise PipelineError(f"{path}: no augmentation pipeline (run `dvc repro augment` first)")
    try:
        transform = A.load(str(path), data_format="json")
    except Exception as exc:
        raise PipelineError(f"{path}: not a valid albumentations pipeline ({exc})") from None
    transform.set_random_seed(seed)
    return transform


def apply(transform: A.Compose, image: np.ndarray) -> np.ndarray:
    """Augment one uint8 (H, W, C) image, keeping its shape."""
    out = transform(image=image)["image"]
    return out if out.ndim == 3 else out[:, :, None]


def load_offline_copies(path: Path = OFFLINE_PATH) -> tuple[np.ndarray, np.ndarray] | None:
    """The materialized augmented copies of the train split, when augment.offline_copies wrote them."""
    if not Path(path).exists():
        return None
    with np.load(path) as f:
        return f["x"], f["y"]


def artifacts() -> list[tuple[Path, str]]:
    """What every training run logs about its augmentation: the pipeline file and its preview."""
    return [(p, "augmentation") for p in (PIPELINE_PATH, PREVIEW_PATH) if p.exists()]
