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


def build(
    enabled: bool, rotation_range: float, width_shift_range: float, height_shift_range: float,
    zoom_range: float, affine_p: float, horizontal_flip: bool, flip_p: float, brightness: float,
    contrast: float, brightness_contrast_p: float, dropout_p: float, dropout_max_holes: int,
    dropout_max_size: float, seed: int,
) -> A.Compose:
    """An A.Compose in the seed's (Keras ImageDataGenerator) terms; empty when disabled."""
    transforms: list[A.BasicTransform] = []
    if enabled:
        if rotation_range or width_shift_range or height_shift_range or zoom_range:
            transforms.append(A.Affine(
                rotate=(-rotation_range, rotation_range),
                translate_percent={"x": (-width_shift_range, width_shift_range),
                                   "y": (-height_shift_range, height_shift_range)},
                scale=(1.0 - zoom_range, 1.0 + zoom_range),
                border_mode=0, fill=0, p=affine_p,
            ))
        if horizontal_flip:
            transforms.append(A.HorizontalFlip(p=flip_p))
        if brightness or contrast:
            transforms.append(A.RandomBrightnessContrast(
                brightness_limit=brightness, contrast_limit=contrast, p=brightness_contrast_p))
        if dropout_p > 0:
            transforms.append(A.CoarseDropout(
                num_holes_range=(1, dropout_max_holes),
                hole_height_range=(0.1, dropout_max_size), hole_width_range=(0.1, dropout_max_size),
                fill=0, p=dropout_p,
            ))
    return A.Compose(transforms, seed=seed)


def from_params(p, seed: int) -> A.Compose:
    """Build from a params.augment section."""
    return build(
        p.enabled, p.rotation_range, p.width_shift_range, p.height_shift_range, p.zoom_range, p.affine_p,
        p.horizontal_flip, p.flip_p, p.brightness, p.contrast, p.brightness_contrast_p,
        p.coarse_dropout.p, p.coarse_dropout.max_holes, p.coarse_dropout.max_size, seed,
    )


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
