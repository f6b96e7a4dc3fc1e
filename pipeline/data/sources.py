"""Where raw images come from: scikit-learn's bundled digits, torchvision data sets, or an image folder.

Every source returns uint8 images shaped (N, H, W, C) at the requested size and channel count, labels, and
class names.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import PipelineError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

# The files torchvision looks for, so that an offline user knows exactly what to place where.
TORCHVISION_FILES = {
    "mnist": ("MNIST/raw", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                            "t10k-labels-idx1-ubyte"]),
    "fashion_mnist": ("FashionMNIST/raw", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                           "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
    "cifar10": (".", ["cifar-10-python.tar.gz (or its extracted folder cifar-10-batches-py/)"]),
}


@dataclass
class RawImages:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,)
    class_names: list[str]
    skipped: list[str] = field(default_factory=list)  # unreadable files, by path


def to_uint8_image(img: Image.Image, size: int, channels: int) -> np.ndarray:
    """Normalize any PIL image (L, RGB, RGBA, P, I;16, ...) to a uint8 (size, size, channels) array."""
    if img.mode in ("RGBA", "LA", "P"):
        # Composite transparency onto black, which is what a plain convert would do to the colour channels.
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def resize_batch(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """Resize a uint8 (N, H, W) or (N, H, W, C) batch and convert its channel count."""
    if images.ndim == 3:
        images = images[..., None]
    out = np.empty((len(images), size, size, channels), dtype=np.uint8)
    for i, img in enumerate(images):
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        out[i] = to_uint8_image(pil, size, channels)
    return out


def load_embedded(size: int, channels: int) -> RawImages:
    """scikit-learn's handwritten digits: 1,797 real 8x8 scans in 10 classes, shipped with the package."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    return RawImages(
        images=resize_batch(images, size, channels),
        labels=digits.target.astype(np.int64),
        class_names=[str(c) for c in digits.target_names],
    )


def load_torchvision(name: str, raw_dir: Path, size: int, channels: int) -> RawImages:
    """MNIST, Fashion-MNIST or CIFAR-10 through torchvision; downloads into raw_dir where there is internet."""
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}[name]
    parts = []
    for train in (True, False):
        try:
            ds = cls(root=str(raw_dir), train=train, download=False)
        except RuntimeError:
            ds = _download(cls, name, raw_dir, train)
        parts.append(ds)
    data = np.concatenate([np.asarray(p.data) for p in parts])
    labels = np.concatenate([np.asarray(p.targets) for p in parts]).astype(np.int64)
    return RawImages(resize_batch(data, size, channels), labels, list(parts[0].classes))


def _download(cls, name: str, raw_dir: Path, train: bool):
    folder, files = TORCHVISION_FILES[name]
    where = (raw_dir / folder).as_posix()
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(15)  # never hang on a closed network
    try:
        return cls(root=str(raw_dir), train=train, download=True)
    except Exception as exc:  # torchvision raises several kinds on a failed download
        raise PipelineError(
            f"data.source={name}: not found in {raw_dir} and the download failed ({type(exc).__name__}); "
            f"offline, put {', '.join(files)} into {where}/"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def load_folder(root: Path, size: int, channels: int, on_corrupt: str) -> RawImages:
    """An ImageFolder tree root/<class>/*.png|jpg; unreadable files are listed and skipped (or fail)."""
    if not root.is_dir():
        raise PipelineError(f"data.raw_dir={root.as_posix()}: folder not found (expected {root}/<class>/*.png)")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise PipelineError(f"data.raw_dir={root.as_posix()}: no class folders (expected {root}/<class>/*.png)")
    images, labels, skipped = [], [], []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(
            p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise PipelineError(f"data.raw_dir: class folder {class_dir.as_posix()} has no images "
                                f"({', '.join(IMAGE_EXTENSIONS)})")
        for path in files:
            try:
                with Image.open(path) as img:
                    img.load()
                    arr = to_uint8_image(img, size, channels)
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
                if on_corrupt == "fail":
                    raise PipelineError(f"corrupt image {path.as_posix()}: {exc} "
                                        "(set data.on_corrupt: skip to leave it out)") from None
                skipped.append(path.as_posix())
                continue
            images.append(arr)
            labels.append(label)
    if not images:
        raise PipelineError(f"data.raw_dir={root.as_posix()}: no readable images")
    return RawImages(np.stack(images), np.asarray(labels, dtype=np.int64), [d.name for d in class_dirs], skipped)
