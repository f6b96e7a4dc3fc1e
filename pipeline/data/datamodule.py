"""Datasets and the LightningDataModule: uint8 arrays in, float [0, 1] CHW tensors out.

Augmentation runs per sample on the train split only; val and test get only the resize. Normalization lives
in the model (`pipeline.models.classifier.Classifier`), so exported models take plain pixels.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate, get_worker_info

from pipeline.data.augment import apply


class ImageDataset(Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: A.Compose | None = None,
                 image_size: int | None = None) -> None:
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.transform = transform if transform is not None and len(transform.transforms) else None
        self.image_size = image_size if image_size and image_size != images.shape[1] else None

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices) -> Batch:
        """A whole batch at once (the DataLoader asks for it so), converted to a tensor in one go: without
        augmentation or resize one indexing of the uint8 array; with them the per-image work is the transform
        alone (same images, same random draws, in the same order as one image at a time)."""
        idx = np.asarray(indices, dtype=np.int64)
        if self.transform is None and not self.image_size:
            images = self.images[idx]
        else:
            images = np.stack([self._transformed(self.images[i]) for i in idx])
        tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
        return Batch(tensor, self.labels[torch.from_numpy(idx)])

    def _transformed(self, img: np.ndarray) -> np.ndarray:
        if self.image_size:
            img = cv2.resize(img, (self.image_size, self.image_size), interpolation=cv2.INTER_LINEAR)
            img = img if img.ndim == 3 else img[:, :, None]
        return apply(self.transform, img) if self.transform is not None else img

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.__getitems__([i])
        return images[0], labels[0]


class Batch(tuple):
    """A batch already stacked by ImageDataset.__getitems__ (images, labels): collate passes it through."""

    def __new__(cls, images: torch.Tensor, labels: torch.Tensor) -> Batch:
        return super().__new__(cls, (images, labels))


def collate(samples):
    """Stacked batches pass through; lists of samples are stacked by torch's default collate."""
    return list(samples) if isinstance(samples, Batch) else default_collate(samples)


def seed_worker(_worker_id: int) -> None:
    """Each loader worker reseeds its copy of the augmentation from torch's per-worker seed.

    torch derives that seed from the main process's generator, so runs repeat exactly, while every
    worker and every epoch still draws different augmentations.
    """
    info = get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info else None
    if transform is not None:
        transform.set_random_seed(torch.initial_seed() % 2**32)


class InMemoryLoader:
    """Batches of an in-memory data set in the main process, without the DataLoader's per-batch machinery: the
    same batches in the same order as `DataLoader(dataset, batch_size, shuffle, generator=..., drop_last=...)`,
    because it draws from the generator exactly as that DataLoader and its RandomSampler do (a seed per epoch,
    then the permutations; tests/test_augment.py compares the two). What `make_loader` gives when there are no
    worker processes and no distributed training."""

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool,
                 generator: torch.Generator) -> None:
        self.dataset, self.batch_size, self.drop_last, self.generator = dataset, batch_size, drop_last, generator
        self.shuffle = shuffle
        self.pin = torch.cuda.is_available()

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.dataset)
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)  # DataLoader's per-epoch draw
        if self.shuffle:  # RandomSampler's draws: its permutation, and a second one after its last index
            order = torch.randperm(n, generator=self.generator).numpy()
            torch.randperm(n, generator=self.generator)
        else:
            order = np.arange(n)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            batch = fetch(self.dataset, order[start : start + self.batch_size])
            yield [t.pin_memory() for t in batch] if self.pin else batch


def fetch(dataset: Dataset, idx: np.ndarray) -> list[torch.Tensor]:
    """One batch by index: ImageDataset's batched fetch, or tensor indexing (TensorDataset)."""
    if isinstance(dataset, ImageDataset):
        return list(dataset.__getitems__(idx))
    return list(dataset[torch.from_numpy(idx)])


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int,
                seed: int) -> DataLoader | InMemoryLoader:
    """The project's one way to build a loader: its own seeded generator (never the global RNG), per-worker
    augmentation seeding, and no size-1 last training batch. Without worker processes and outside distributed
    training the batches come from InMemoryLoader (the same batches, without the DataLoader's overhead); under
    DDP Lightning puts its distributed sampler into the DataLoader."""
    generator = torch.Generator().manual_seed(seed)
    # A last training batch of one sample breaks BatchNorm (one value per channel on small maps): drop it.
    drop_last = shuffle and len(dataset) > batch_size
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if num_workers == 0 and not distributed and isinstance(dataset, ImageDataset | TensorDataset):
        return InMemoryLoader(dataset, batch_size, shuffle, drop_last, generator)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, generator=generator,
        drop_last=drop_last,
        worker_init_fn=seed_worker if num_workers else None, persistent_workers=num_workers > 0, collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
    )


class ImageDataModule(pl.LightningDataModule):
    """Train/val/test splits of uint8 arrays; the train split gets the augmentation."""

    def __init__(self, splits: dict[str, tuple[np.ndarray, np.ndarray]], batch_size: int, num_workers: int,
                 seed: int, train_transform: A.Compose | None = None, image_size: int | None = None) -> None:
        super().__init__()
        self.splits = splits
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_transform = train_transform
        self.image_size = image_size

    def dataset(self, split: str, augment: bool = False) -> ImageDataset:
        x, y = self.splits[split]
        return ImageDataset(x, y, self.train_transform if augment else None, self.image_size)

    def train_dataloader(self) -> DataLoader | InMemoryLoader:
        return make_loader(self.dataset("train", augment=True), self.batch_size, True, self.num_workers,
                           self.seed)

    def val_dataloader(self) -> DataLoader | InMemoryLoader:
        return make_loader(self.dataset("val"), self.batch_size, False, self.num_workers, self.seed)

    def test_dataloader(self) -> DataLoader | InMemoryLoader:
        return make_loader(self.dataset("test"), self.batch_size, False, self.num_workers, self.seed)


class TensorDataModule(pl.LightningDataModule):
    """Ready tensors (e.g. cached features) as train/val loaders, through the same seeded `make_loader`."""

    def __init__(self, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                 batch_size: int, seed: int) -> None:
        super().__init__()
        self.train_set, self.val_set = TensorDataset(*train), TensorDataset(*val)
        self.batch_size, self.seed = batch_size, seed

    def train_dataloader(self) -> DataLoader | InMemoryLoader:
        return make_loader(self.train_set, self.batch_size, True, 0, self.seed)

    def val_dataloader(self) -> DataLoader | InMemoryLoader:
        return make_loader(self.val_set, self.batch_size, False, 0, self.seed)
