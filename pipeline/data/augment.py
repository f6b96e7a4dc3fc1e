"""Augmentation: the albumentations pipeline built from params.augment, saved in albumentations' own format, and
run on whole batches as tensor operations.

The `augment` stage writes data/augmented/pipeline.json; the training stages load that file, so what ran is exactly
what was saved (and logged to MLflow).

albumentations transforms one image per call. At 28x28 the call costs more than the pixels (the Affine takes 65-87 us
per image on 2 CPU cores, benchmarks/README.md). `BatchAugment` reads the transforms of the loaded `A.Compose` (the
one pipeline.json holds: one source of truth) and applies each to a whole float batch on the batch's device (the
GPU's, after the batch is there): every image still gets its own random draw, with albumentations' ranges,
probabilities and formulas (tests/test_augment.py compares both at fixed draws). The draws come from the
BatchAugment's own seeded generator, on the CPU, in float64. A pipeline with a transform or an option not
implemented here runs image by image through albumentations instead (the data module's fallback).

Batched: Affine (rotate, scale, translate, shear; linear or nearest interpolation; constant border), HorizontalFlip,
VerticalFlip, RandomBrightnessContrast (brightness by max, no safe range), CoarseDropout (constant fill). Images are
float tensors in [0, 1], (N, C, H, W).
"""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F

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
        raise PipelineError(f"{path}: no augmentation pipeline (run `dvc repro` first: the augment stages write it)")
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


def artifacts(pipeline: Path = PIPELINE_PATH, preview: Path = PREVIEW_PATH) -> list[tuple[Path, str]]:
    """What every training run logs about its augmentation: the pipeline file and its preview."""
    return [(p, "augmentation") for p in (pipeline, preview) if p.exists()]


# ------------------------------------------------------------------------------- batched, as tensor operations
class Unsupported(Exception):
    """A transform or option that only albumentations' per-image path runs."""


def _range(value) -> tuple[float, float]:
    return (float(value), float(value)) if isinstance(value, int | float) else (float(value[0]), float(value[1]))


class _Step:
    def __init__(self, transform: A.BasicTransform) -> None:
        self.p = float(transform.p)

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Each image is transformed with probability p (one draw per image, then that image's parameters)."""
        chosen = torch.nonzero(torch.rand(len(x), generator=g) < self.p).flatten().to(x.device)
        if len(chosen):
            x[chosen] = self.apply(x[chosen], g)
        return x

    def apply(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


def _uniform(n: int, bounds: tuple[float, float], g: torch.Generator) -> np.ndarray:
    """n draws uniform in [low, high), float64, from the torch generator (reproducible by seed)."""
    low, high = bounds
    return torch.rand(n, generator=g, dtype=torch.float64).numpy() * (high - low) + low


class _Affine(_Step):
    """A.Affine: matrix = shift_back @ translate @ shear @ rotate @ scale @ shift_to_centre (albumentations'
    create_affine_transformation_matrix, centre (W/2 - 0.5, H/2 - 0.5)), sampled as cv2.warpAffine samples it:
    each output pixel reads the input at the inverse matrix times its own coordinates."""

    MODES = {cv2.INTER_LINEAR: "bilinear", cv2.INTER_NEAREST: "nearest"}

    def __init__(self, t: A.Affine) -> None:
        super().__init__(t)
        if t.fit_output or t.balanced_scale or t.border_mode != cv2.BORDER_CONSTANT or t.interpolation not in self.MODES:
            raise Unsupported("Affine with fit_output, balanced_scale, a non-constant border or interpolation "
                              f"{t.interpolation}")
        if not isinstance(t.fill, int | float):
            raise Unsupported("Affine with a per-channel fill")
        self.mode, self.fill = self.MODES[t.interpolation], float(t.fill) / 255.0
        self.rotate = _range(t.rotate)
        self.scale = (_range(t.scale["x"]), _range(t.scale["y"]))
        self.keep_ratio = t.keep_ratio
        self.shear = (_range(t.shear["x"]), _range(t.shear["y"]))
        self.translate_px = t.translate_px and (_range(t.translate_px["x"]), _range(t.translate_px["y"]))
        self.translate_percent = t.translate_percent and (_range(t.translate_percent["x"]),
                                                          _range(t.translate_percent["y"]))

    def draw(self, n: int, height: int, width: int, g: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        """n draws as albumentations makes them: the linear part L = shear @ rotate @ scale, (n, 2, 2), and the
        shift in whole pixels (albumentations truncates translate_percent * size), (n, 2); float64."""
        if self.translate_px:
            shift = np.stack([torch.randint(int(lo), int(hi) + 1, (n,), generator=g).double().numpy()
                              for lo, hi in self.translate_px], -1)
        elif self.translate_percent:
            shift = np.stack([np.trunc(_uniform(n, r, g) * size)
                              for r, size in zip(self.translate_percent, (width, height), strict=True)], -1)
        else:
            shift = np.zeros((n, 2))
        shear_x, shear_y = (np.tan(np.deg2rad(-_uniform(n, r, g))) for r in self.shear)
        scale_x, scale_y = (_uniform(n, r, g) for r in self.scale)
        if self.keep_ratio:
            scale_y = scale_x
        angle = np.deg2rad(_uniform(n, self.rotate, g) % 360)
        cos, sin = np.cos(angle), np.sin(angle)
        rs = np.array([[cos * scale_x, sin * scale_y], [-sin * scale_x, cos * scale_y]])  # rotate @ scale
        linear = np.array([[rs[0, 0] + shear_x * rs[1, 0], rs[0, 1] + shear_x * rs[1, 1]],
                           [shear_y * rs[0, 0] + rs[1, 0], shear_y * rs[0, 1] + rs[1, 1]]])
        return linear.transpose(2, 0, 1), shift

    def apply(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, _, height, width = x.shape
        linear, shift = self.draw(n, height, width, g)
        # output pixel q reads the input at p = L^-1 (q - c - t) + c (the 2x2 inverse in closed form)
        a, b, c, d = linear[:, 0, 0], linear[:, 0, 1], linear[:, 1, 0], linear[:, 1, 1]
        inverse = np.array([[d, -b], [-c, a]]).transpose(2, 0, 1) / (a * d - b * c)[:, None, None]
        centre = np.array([width / 2 - 0.5, height / 2 - 0.5])
        offset = centre[:, None] - inverse @ (centre + shift)[:, :, None]  # (n, 2, 1)
        # pixel centres to grid_sample's [-1, 1] (align_corners=False: -1 and 1 are the outer edges): fold
        # x_norm = (2 x + 1) / W - 1 into the map: each grid coordinate is then a x + b y + c
        size = np.array([[width], [height]])
        theta = np.concatenate([inverse * 2 / size[None], (2 * offset + 1) / size[None] - 1], -1)  # (n, 2, 3)
        t = torch.from_numpy(theta).to(device=x.device, dtype=x.dtype)[:, :, :, None, None]  # (n, 2, 3, 1, 1)
        xs = torch.arange(width, dtype=x.dtype, device=x.device)
        ys = torch.arange(height, dtype=x.dtype, device=x.device)[:, None]
        grid = (t[:, :, 0] * xs + t[:, :, 1] * ys + t[:, :, 2]).permute(0, 2, 3, 1)  # (n, H, W, 2)
        if self.fill:  # zeros padding around x - fill, then + fill: the border reads fill (linear in x)
            return F.grid_sample(x - self.fill, grid, self.mode, "zeros", align_corners=False) + self.fill
        return F.grid_sample(x, grid, self.mode, "zeros", align_corners=False)


class _Flip(_Step):
    def __init__(self, t: A.BasicTransform, dim: int) -> None:
        super().__init__(t)
        self.dim = dim

    def apply(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return x.flip(self.dim)


class _BrightnessContrast(_Step):
    """A.RandomBrightnessContrast: x * (1 + c) + b * max, clipped; c and b uniform in their limits."""

    def __init__(self, t: A.RandomBrightnessContrast) -> None:
        super().__init__(t)
        if not t.brightness_by_max or t.ensure_safe_range:
            raise Unsupported("RandomBrightnessContrast without brightness_by_max or with ensure_safe_range")
        self.brightness, self.contrast = _range(t.brightness_limit), _range(t.contrast_limit)

    def apply(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n = len(x)
        alpha = torch.from_numpy(1.0 + _uniform(n, self.contrast, g)).to(x.device, x.dtype).view(n, 1, 1, 1)
        beta = torch.from_numpy(_uniform(n, self.brightness, g)).to(x.device, x.dtype).view(n, 1, 1, 1)
        return (x * alpha + beta).clamp_(0.0, 1.0)


class _CoarseDropout(_Step):
    """A.CoarseDropout: 1..max holes per image, each of a height and width drawn in its range (fractions of
    the side, truncated to whole pixels, or pixels), at a uniform position inside the image; filled with fill."""

    def __init__(self, t: A.CoarseDropout) -> None:
        super().__init__(t)
        if not isinstance(t.fill, int | float):
            raise Unsupported(f"CoarseDropout with fill {t.fill!r}")
        self.fill = float(t.fill) / 255.0
        self.holes = tuple(int(v) for v in t.num_holes_range)
        self.height, self.width = _range(t.hole_height_range), _range(t.hole_width_range)
        self.fractions = all(0 < v <= 1 and isinstance(v, float) for v in (*t.hole_height_range,
                                                                            *t.hole_width_range))

    def _sizes(self, bounds: tuple[float, float], side: int, shape: tuple[int, int],
               g: torch.Generator) -> np.ndarray:
        if self.fractions:
            return (side * _uniform(shape[0] * shape[1], bounds, g)).astype(np.int64).reshape(shape)
        return torch.randint(int(bounds[0]), int(bounds[1]) + 1, shape, generator=g).numpy()

    def apply(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, _, height, width = x.shape
        most = self.holes[1]
        count = torch.randint(self.holes[0], most + 1, (n,), generator=g).numpy()
        h = self._sizes(self.height, height, (n, most), g)
        w = self._sizes(self.width, width, (n, most), g)
        top = (torch.rand(n, most, generator=g, dtype=torch.float64).numpy() * (height - h + 1)).astype(np.int64)
        left = (torch.rand(n, most, generator=g, dtype=torch.float64).numpy() * (width - w + 1)).astype(np.int64)
        used = np.arange(most) < count[:, None]  # (n, most): holes beyond the image's count are not cut
        rows, cols = np.arange(height), np.arange(width)
        inside_rows = (rows >= top[..., None]) & (rows < (top + h)[..., None]) & used[..., None]  # (n, most, H)
        inside_cols = (cols >= left[..., None]) & (cols < (left + w)[..., None])  # (n, most, W)
        holes = (inside_rows[..., :, None] & inside_cols[..., None, :]).any(1)  # (n, H, W)
        return x.masked_fill_(torch.from_numpy(holes)[:, None].to(x.device), self.fill)


STEPS = {
    "Affine": _Affine,
    "HorizontalFlip": lambda t: _Flip(t, -1),
    "VerticalFlip": lambda t: _Flip(t, -2),
    "RandomBrightnessContrast": _BrightnessContrast,
    "CoarseDropout": _CoarseDropout,
}


class BatchAugment:
    """An albumentations Compose as per-image random transforms over whole (N, C, H, W) float batches.

    Draws come from its own seeded generator (on the CPU, whatever the batch's device): the same seed and batches
    give the same output. `set_random_seed` reseeds it, as albumentations' own method does."""

    def __init__(self, compose: A.Compose, seed: int) -> None:
        if not isinstance(compose, A.Compose) or compose.p < 1.0:
            raise Unsupported("a pipeline that is not one A.Compose applied always")
        self.names: list[str] = []
        self.steps: list[_Step] = []
        for t in compose.transforms:
            name = type(t).__name__
            if name not in STEPS:
                raise Unsupported(name)
            self.steps.append(STEPS[name](t))
            self.names.append(name)
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def of(cls, compose: A.Compose | None, seed: int) -> BatchAugment | None:
        """The batched form of `compose`, or None when it has no transforms or one only albumentations runs."""
        if compose is None or not len(compose.transforms):
            return None
        try:
            return cls(compose, seed)
        except Unsupported:
            return None

    def set_random_seed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Augment a float batch in place (and return it)."""
        for step in self.steps:
            x = step(x, self.generator)
        return x

    def __repr__(self) -> str:
        return f"BatchAugment({', '.join(self.names)})"

