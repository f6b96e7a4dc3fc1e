"""Class subsets and few-shot samples of the prepared data: what transfer learning trains and tests on."""

from __future__ import annotations

import numpy as np

from pipeline.data.prepared import SPLITS, PreparedData
from pipeline.errors import PipelineError

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
