"""Datasets and the LightningDataModule: uint8 arrays in, float [0, 1] CHW tensors out.

Augmentation runs on the train split only, each image with its own random draw (on whole batches as tensor
operations when the pipeline allows, pipeline.data.batch_augment); val and test get only the resize. Normalization lives
in the model (`pipeline.models.classifier.Classifier`), so exported models take plain pixels.
"""

from __future__ import annotations

from functools import cache

import albumentations as A
import cv2
import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate, get_worker_info

from pipeline.data.augment import apply
from pipeline.data.batch_augment import BatchAugment

# In-memory data sets up to this size are also held as one float tensor (4 bytes per pixel): a batch is then one
# indexing, without the per-batch uint8 -> float conversion. Larger ones convert batch by batch.
FLOAT_CACHE_BYTES = 2 * 1024**3


def values_per_image(images: np.ndarray, image_size: int | None) -> int:
    """C x H x W of uint8 (N, H, W, C) images once resized to image_size (None: as they are)."""
    return images.shape[-1] * (image_size or images.shape[1]) ** 2


class ImageDataset(Dataset):
    """uint8 (N, H, W, C) images and labels as float (C, H, W) tensors in [0, 1], resized to image_size.

    `transform` augments: an albumentations Compose runs image by image; a BatchAugment (the same pipeline as
    tensor operations) runs once per batch on the float tensors."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: A.Compose | BatchAugment | None = None,
                 image_size: int | None = None) -> None:
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.transform = transform if transform is not None and len(transform.transforms) else None
        self.image_size = image_size if image_size and image_size != images.shape[1] else None
        self.per_image = isinstance(self.transform, A.Compose)
        self.rank = 0  # the DDP process that loads it: its workers seed their augmentation with it
        self.image_bytes = 4 * values_per_image(images, self.image_size)  # as a float tensor
        fits = len(images) * self.image_bytes <= FLOAT_CACHE_BYTES
        self.tensor = _to_float(self._resized(images)) if fits and not self.per_image else None

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices) -> Batch:
        """A whole batch at once (the DataLoader asks for it so)."""
        return Batch(*self.take(torch.as_tensor(indices, dtype=torch.long)))

    def take(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """[images, labels] of a batch by index tensor. In memory: one indexing of the float tensor, then the
        batched augmentation if any. With an albumentations Compose: the transform image by image (same images,
        same random draws, in the same order as one image at a time), converted in one go."""
        if self.tensor is not None:  # (never with a per-image transform)
            images = torch.index_select(self.tensor, 0, idx)  # a copy (4x faster than tensor[idx] here)
        elif self.per_image:
            resized = self._resized(self.images[idx.numpy()])
            images = _to_float(np.stack([apply(self.transform, img) for img in resized]))
        else:
            images = _to_float(self._resized(self.images[idx.numpy()]))
        if self.transform is not None and not self.per_image:
            images = self.transform(images)
        return [images, torch.index_select(self.labels, 0, idx)]

    def _resized(self, images: np.ndarray) -> np.ndarray:
        if not self.image_size or not len(images):
            return images
        size = (self.image_size, self.image_size)
        return np.stack([cv2.resize(img, size, interpolation=cv2.INTER_LINEAR).reshape(*size, -1) for img in images])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.__getitems__([i])
        return images[0], labels[0]


def _to_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


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
    worker and every epoch still draws different augmentations; the data set's `rank` (the DDP process)
    makes every process's workers draw their own.
    """
    info = get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info else None
    if transform is not None:
        transform.set_random_seed((torch.initial_seed() + getattr(info.dataset, "rank", 0)) % 2**32)


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
        self.pin = _cuda()

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.dataset)
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)  # DataLoader's per-epoch draw
        if self.shuffle:  # RandomSampler's draws: its permutation, and a second one after its last index
            order = torch.randperm(n, generator=self.generator)
            torch.randperm(n, generator=self.generator)
        else:
            order = torch.arange(n)
        get, size, pin = fetcher(self.dataset), self.batch_size, self.pin
        stop, chunk = len(self) * size, size * chunk_batches(self.dataset, size)
        if chunk == size:  # batch by batch, in its own loop: at 13 us a batch, splitting or nesting shows
            for start in range(0, stop, size):
                batch = get(order[start : start + size])
                yield [t.pin_memory() for t in batch] if pin else batch
            return
        for start in range(0, stop, chunk):
            images, labels = get(order[start : min(start + chunk, stop)])
            for batch in zip(images.split(size), labels.split(size), strict=True):
                yield [t.pin_memory() for t in batch] if pin else list(batch)


# Batched augmentation runs on up to this many bytes of images at once (several batches; the loader then hands
# them out batch by batch): its per-call overhead, about 0.6 ms, is paid once per chunk instead of per batch.
AUGMENT_CHUNK_BYTES = 32 * 1024**2


def chunk_batches(dataset: Dataset, batch_size: int) -> int:
    """Batches fetched together: several when a batched augmentation runs over them, else one."""
    if not isinstance(dataset, ImageDataset) or dataset.transform is None or dataset.per_image:
        return 1
    return max(1, AUGMENT_CHUNK_BYTES // (dataset.image_bytes * batch_size))


def fetcher(dataset: Dataset):
    """One batch by index tensor: ImageDataset's batched fetch, or tensor indexing (TensorDataset)."""
    if isinstance(dataset, ImageDataset) and dataset.tensor is not None and dataset.transform is None:
        images, labels = dataset.tensor, dataset.labels  # plain in-memory data: two indexings, nothing else
        return lambda idx: [torch.index_select(images, 0, idx), torch.index_select(labels, 0, idx)]
    if isinstance(dataset, ImageDataset):
        return dataset.take
    return lambda idx: [torch.index_select(t, 0, idx) for t in dataset.tensors]


@cache
def _cuda() -> bool:
    return torch.cuda.is_available()


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
        pin_memory=_cuda(),
    )


# trainer.batched_augment: auto runs the augmentation on whole batches for images of up to this many values
# (C x H x W; 64x64x3 is 12,288). Per image on 2 CPU cores, batched vs albumentations: 28x28x1 13 vs 223 us,
# 64x64x3 88 vs 169 us, 96x96x3 228 vs 212 us, 224x224x1 536 vs 345 us (cv2's uint8 warps win on large images).
BATCHED_MAX_VALUES = 16_384


class ImageDataModule(pl.LightningDataModule):
    """Train/val/test splits of uint8 arrays; the train split gets the augmentation, on whole batches when
    `batched` (auto: for small images, BATCHED_MAX_VALUES) and the pipeline's transforms allow it
    (pipeline.data.batch_augment), else image by image."""

    def __init__(self, splits: dict[str, tuple[np.ndarray, np.ndarray]], batch_size: int, num_workers: int,
                 seed: int, train_transform: A.Compose | None = None, image_size: int | None = None,
                 batched: bool | str = "auto") -> None:
        super().__init__()
        self.splits = splits
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        if batched == "auto":
            batched = values_per_image(splits["train"][0], image_size) <= BATCHED_MAX_VALUES
        self.train_transform = (BatchAugment.of(train_transform, seed) if batched else None) or train_transform
        self.image_size = image_size
        self._datasets: dict[tuple[str, bool], ImageDataset] = {}
        self.rank = 0  # the DDP process (setup)

    def setup(self, stage: str) -> None:
        """Under DDP each process draws its own augmentations (same seed: every process the same draws)."""
        self.rank = self.trainer.global_rank if self.trainer is not None else 0
        for dataset in self._datasets.values():  # built before setup
            dataset.rank = self.rank
        if self.rank and self.train_transform is not None:
            self.train_transform.set_random_seed(self.seed + self.rank)

    def dataset(self, split: str, augment: bool = False) -> ImageDataset:
        """The split's data set, built once (its float tensor is made once, however often loaders are asked)."""
        if (split, augment) not in self._datasets:
            x, y = self.splits[split]
            dataset = ImageDataset(x, y, self.train_transform if augment else None, self.image_size)
            dataset.rank = self.rank  # for the loader's workers (seed_worker)
            self._datasets[split, augment] = dataset
        return self._datasets[split, augment]

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
