"""The prepared data set: stratified splits stored as uint8 arrays, with class names and train statistics; its class
subsets and few-shot samples (what transfer learning trains and tests on)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_path
from pipeline.errors import PipelineError

PREPARED_DIR = Path("data/prepared")
SPLITS = ("train", "val", "test")


def stratified_split(
    labels: np.ndarray, ratios: tuple[float, float, float], seed: int, official_test: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Indices per split, class by class, so that every split keeps the class proportions. Deterministic.

    With `official_test` (a mask of the data set's own test images) those images are the test split and the
    validation split is carved from the rest at val / (train + val).
    """
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    train_ratio, val_ratio, test_ratio = ratios
    for cls in np.unique(labels):
        members = labels == cls
        if official_test is not None:
            out["test"].append(np.flatnonzero(members & official_test))
            idx = rng.permutation(np.flatnonzero(members & ~official_test))
            n_test, n_val = 0, max(1, int(round(len(idx) * val_ratio / (train_ratio + val_ratio))))
        else:
            idx = rng.permutation(np.flatnonzero(members))
            n_test = max(1, int(round(len(idx) * test_ratio)))
            n_val = max(1, int(round(len(idx) * val_ratio)))
            out["test"].append(idx[:n_test])
        out["val"].append(idx[n_test : n_test + n_val])
        out["train"].append(idx[n_test + n_val :])
    # Sorted so that the stored order does not depend on class order; shuffling is the loader's job.
    return {s: np.sort(np.concatenate(parts)) for s, parts in out.items()}


@dataclass
class PreparedData:
    """Train/val/test arrays (uint8, N x H x W x C) plus what the stages need to know about them."""

    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    class_names: list[str]
    mean: list[float]
    std: list[float]
    data_hash: str
    source: str = "unknown"  # where the images came from: embedded, mnist, folder:data/raw, ...

    @property
    def image_size(self) -> int:
        return int(self.x["train"].shape[1])

    @property
    def channels(self) -> int:
        return int(self.x["train"].shape[3])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def save(self, directory: Path = PREPARED_DIR) -> None:
        arrays = {f"x_{s}": self.x[s] for s in SPLITS} | {f"y_{s}": self.y[s] for s in SPLITS}
        with atomic_path(directory / "dataset.npz") as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        meta = {"class_names": self.class_names, "mean": self.mean, "std": self.std,
                "image_size": self.image_size, "channels": self.channels, "data_hash": self.data_hash,
                "source": self.source}
        with atomic_path(directory / "meta.json") as tmp:
            tmp.write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path = PREPARED_DIR) -> PreparedData:
        npz, meta_path = directory / "dataset.npz", directory / "meta.json"
        if not npz.exists() or not meta_path.exists():
            raise PipelineError(f"{directory.as_posix()}: no prepared data (run `dvc repro prepare` first)")
        try:
            meta = json.loads(meta_path.read_text())
            with np.load(npz) as f:
                x = {s: f[f"x_{s}"] for s in SPLITS}
                y = {s: f[f"y_{s}"] for s in SPLITS}
        except (OSError, ValueError, KeyError) as exc:
            raise PipelineError(f"{directory.as_posix()}: prepared data is unreadable ({exc}); "
                                "rerun `dvc repro -f prepare`") from None
        return cls(x, y, meta["class_names"], meta["mean"], meta["std"], meta["data_hash"],
                   meta.get("source", "unknown"))


def build_prepared(
    images: np.ndarray, labels: np.ndarray, class_names: list[str],
    ratios: tuple[float, float, float], seed: int, min_per_class: int,
    max_per_class: int | None = None, official_test: np.ndarray | None = None,
) -> PreparedData:
    """Check class counts, optionally cap them, split, and compute the train split's per-channel mean/std.

    `official_test` marks the data set's own test images (used as the test split). The cap keeps up to
    `max_per_class` images per class; with an official split it is shared between the two parts by `ratios`.
    """
    counts = np.bincount(labels, minlength=len(class_names))
    for name, count in zip(class_names, counts, strict=True):
        if count < min_per_class:
            raise PipelineError(f"class {name!r} has {count} images; data.min_per_class is {min_per_class}")
    if max_per_class is not None:
        rng = np.random.default_rng(seed)
        pools = [np.ones(len(labels), dtype=bool)] if official_test is None else [~official_test, official_test]
        caps = [max_per_class] if official_test is None else [
            max_per_class - max(1, round(max_per_class * ratios[2])), max(1, round(max_per_class * ratios[2]))]
        keep = np.sort(np.concatenate([
            rng.permutation(np.flatnonzero((labels == c) & pool))[:cap]
            for pool, cap in zip(pools, caps, strict=True) for c in range(len(class_names))
        ]))
        images, labels = images[keep], labels[keep]
        official_test = official_test[keep] if official_test is not None else None
    idx = stratified_split(labels, ratios, seed, official_test)
    x = {s: np.ascontiguousarray(images[idx[s]]) for s in SPLITS}
    y = {s: labels[idx[s]].astype(np.int64) for s in SPLITS}
    train = x["train"].astype(np.float64) / 255.0
    mean = train.mean(axis=(0, 1, 2))
    std = np.maximum(train.std(axis=(0, 1, 2)), 1e-3)
    digest = hashlib.sha256()
    for s in SPLITS:
        digest.update(x[s].tobytes())
        digest.update(y[s].tobytes())
    return PreparedData(x, y, list(class_names), [round(float(m), 6) for m in mean],
                        [round(float(v), 6) for v in std], digest.hexdigest()[:16])


def class_counts(data: PreparedData) -> dict[str, dict[str, int]]:
    """Images per class for every split, by class name."""
    return {
        s: {name: int((data.y[s] == i).sum()) for i, name in enumerate(data.class_names)} for s in SPLITS
    }


# ------------------------------------------------------------------------------- subsets and few-shot samples
Split = tuple[np.ndarray, np.ndarray]


def remap_labels(labels: np.ndarray, class_ids: list[int]) -> np.ndarray:
    """Data set class ids -> 0..k-1 in the order of `class_ids` (labels must all be among them)."""
    lookup = np.full(int(max(class_ids)) + 1, -1, dtype=np.int64)
    lookup[np.asarray(class_ids)] = np.arange(len(class_ids))
    return lookup[labels]


def class_subset(data: PreparedData, classes: list[int]) -> dict[str, Split]:
    """Every split restricted to `classes`, labels remapped to 0..k-1."""
    for c in classes:
        if not 0 <= c < data.num_classes:
            raise PipelineError(f"transfer: class id {c} is out of range (the data has classes "
                                f"0..{data.num_classes - 1}: {', '.join(data.class_names)})")
    out = {}
    for split in SPLITS:
        keep = np.isin(data.y[split], classes)
        out[split] = (data.x[split][keep], remap_labels(data.y[split][keep], classes))
    return out


def per_class_indices(labels: np.ndarray, n: int, seed: int, what: str) -> np.ndarray:
    """Sorted indices of `n` images per class, drawn by `seed` (the same seed gives the same images)."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < n:
            raise PipelineError(f"{what}={n}: class {c} has only {len(members)} images in this split")
        picked.append(rng.permutation(members)[:n])
    return np.sort(np.concatenate(picked))
