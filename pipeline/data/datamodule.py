"""The LightningDataModule: stored uint8 splits in, float [0, 1] (N, C, H, W) batches on the training device out.

One batch builder (`ImageDataset.take`), one place for batched augmentation (`on_after_batch_transfer`, on the
device the batch is on) and one in-process loader (`Batches`) whose randomness is its own:

- In-memory splits that fit (FLOAT_CACHE_BYTES) are converted to float once and placed on the training device
  when fitting starts (`setup`): a batch is then one `index_select` there, no copy from the host.
- The training split's augmentation runs on whole batches after they reach the device (augment.BatchAugment), with
  a per-image draw. A pipeline the batched form does not cover, or `trainer.batched_augment: false` (or `auto` on
  the CPU for large images, where cv2 is faster), runs albumentations image by image while batches are built.
- Batch order: epoch e of a training split is `torch.randperm(n)` of a generator seeded with (seed, e) (Lightning
  tells the loader the epoch, also after a resume); val and test keep their stored order. With loader worker
  processes or under DDP the batches come from torch's DataLoader over the same data set (under DDP with
  Lightning's distributed sampler) and its seeded generator.

Normalization lives in the model (`pipeline.models.cnn.Classifier`), so exported models take plain pixels.
"""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset, default_collate, get_worker_info

from pipeline.data.augment import BatchAugment, apply
from pipeline.predict import to_float

# In-memory data sets up to this size are held as one float tensor (4 bytes per value) on the training device.
# Larger ones are converted batch by batch.
FLOAT_CACHE_BYTES = 2 * 1024**3

# trainer.batched_augment: auto on the CPU batches images of up to this many values (C x H x W; 64x64x3 is
# 12,288). Per image on 2 CPU cores, batched vs albumentations: 28x28x1 13 vs 223 us, 64x64x3 88 vs 169 us,
# 96x96x3 228 vs 212 us, 224x224x1 536 vs 345 us (cv2's uint8 warps win on large images). On a GPU: always.
BATCHED_MAX_VALUES = 16_384


def values_per_image(images: np.ndarray, image_size: int | None) -> int:
    """C x H x W of uint8 (N, H, W, C) images once resized to image_size (None: as they are)."""
    return images.shape[-1] * (image_size or images.shape[1]) ** 2


class ImageDataset(Dataset):
    """uint8 (N, H, W, C) images and labels as float (C, H, W) tensors in [0, 1], resized to image_size.

    `per_image` (an albumentations Compose) augments image by image while a batch is built; without it the whole
    set is one float tensor when it fits (`to` places it on a device)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, per_image: A.Compose | None = None,
                 image_size: int | None = None) -> None:
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.per_image = per_image if per_image is not None and len(per_image.transforms) else None
        self.image_size = image_size if image_size and image_size != images.shape[1] else None
        self.rank = 0  # the DDP process that loads it: its loader workers seed their augmentation with it
        fits = len(images) * 4 * values_per_image(images, self.image_size) <= FLOAT_CACHE_BYTES
        self.tensor = to_float(images, self.image_size) if fits and self.per_image is None else None

    def to(self, device: torch.device) -> ImageDataset:
        """The float tensor and the labels on `device` (once, before the first batch)."""
        if self.tensor is not None:
            self.tensor = self.tensor.to(device)
            self.labels = self.labels.to(device)
        return self

    def __len__(self) -> int:
        return len(self.images)

    def take(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """[images, labels] of a batch by index tensor: one `index_select` of the float tensor where there is
        one, else the stored images converted (and augmented image by image, in order) in one go."""
        if self.tensor is not None:
            idx = idx.to(self.tensor.device)
            return [torch.index_select(self.tensor, 0, idx), torch.index_select(self.labels, 0, idx)]
        images = self.images[idx.cpu().numpy()]
        if self.per_image is not None:
            images = np.stack([apply(self.per_image, img) for img in images])
        return [to_float(images, self.image_size), torch.index_select(self.labels, 0, idx.cpu())]

    def __getitems__(self, indices) -> Batch:
        """A whole batch at once (torch's DataLoader asks for it so)."""
        return Batch(*self.take(torch.as_tensor(indices, dtype=torch.long)))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.take(torch.tensor([i]))
        return images[0], labels[0]


class Batch(tuple):
    """A batch already stacked by ImageDataset.__getitems__ (images, labels): collate passes it through."""

    def __new__(cls, images: torch.Tensor, labels: torch.Tensor) -> Batch:
        return super().__new__(cls, (images, labels))


def collate(samples):
    """Stacked batches pass through; lists of samples are stacked by torch's default collate."""
    return list(samples) if isinstance(samples, Batch) else default_collate(samples)


def seed_worker(_worker_id: int) -> None:
    """Each loader worker reseeds its copy of the per-image augmentation from torch's per-worker seed (derived
    from the loader's seeded generator: runs repeat, workers and epochs differ) and the data set's DDP rank."""
    info = get_worker_info()
    transform = getattr(info.dataset, "per_image", None) if info else None
    if transform is not None:
        transform.set_random_seed((torch.initial_seed() + getattr(info.dataset, "rank", 0)) % 2**32)


class Batches:
    """The in-process loader: batches of `take` in the order of its own seeded permutation.

    Epoch e shuffles with `torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + e))`,
    so a run repeats exactly and a resumed one sees the epochs it would have seen. Lightning sets the epoch
    through `sampler.set_epoch`, as it does for a DataLoader's sampler. A shuffled split drops a short last batch
    (a batch of one breaks BatchNorm). `passes` > 1 makes an epoch that many passes over the data, each its own
    permutation (a few labelled images per class: an epoch of a useful length, not one step)."""

    def __init__(self, dataset: ImageDataset | TensorDataset, batch_size: int, shuffle: bool, seed: int,
                 passes: int = 1) -> None:
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, batch_size, shuffle, seed
        self.drop_last = shuffle and len(dataset) > batch_size
        self.passes = passes if shuffle else 1
        self.epoch = 0
        self.sampler, self.batch_sampler = self, None  # where Lightning looks for set_epoch (as on a DataLoader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def per_pass(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        return self.per_pass() * self.passes

    def index_batches(self):
        """The epoch's batches as index tensors: `passes` seeded permutations, each cut into batches."""
        n = len(self.dataset)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        for _ in range(self.passes):
            order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
            for start in range(0, self.per_pass() * self.batch_size, self.batch_size):
                yield order[start : start + self.batch_size]

    def __iter__(self):
        take = self.dataset.take if isinstance(self.dataset, ImageDataset) else self._take_tensors
        for idx in self.index_batches():
            yield take(idx)

    def _take_tensors(self, idx: torch.Tensor) -> list[torch.Tensor]:
        return [torch.index_select(t, 0, idx.to(t.device)) for t in self.dataset.tensors]


class BatchOrder(Sampler):
    """Batches' own order (the same seeded permutations, passes and dropped short batches) as a batch sampler
    for torch's DataLoader with worker processes: the same batches as in process. Lightning sets its epoch
    through `batch_sampler.sampler.set_epoch`."""

    def __init__(self, order: Batches) -> None:
        self.order, self.sampler = order, self

    def set_epoch(self, epoch: int) -> None:
        self.order.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        for idx in self.order.index_batches():
            yield idx.tolist()


class Repeated(Dataset):
    """`passes` copies of a data set end to end (index i reads item i mod n): under DDP, where Lightning shards
    the data with its DistributedSampler, an epoch of that many passes. `per_image` and `rank` are the inner data
    set's (loader workers seed their augmentation from them)."""

    def __init__(self, dataset: ImageDataset | TensorDataset, passes: int) -> None:
        self.dataset, self.passes, self.n = dataset, passes, len(dataset)
        self.per_image, self.rank = getattr(dataset, "per_image", None), getattr(dataset, "rank", 0)

    def __len__(self) -> int:
        return self.n * self.passes

    def __getitems__(self, indices):
        inner = [i % self.n for i in indices]
        if hasattr(self.dataset, "__getitems__"):
            return self.dataset.__getitems__(inner)
        return [self.dataset[i] for i in inner]

    def __getitem__(self, i: int):
        return self.dataset[i % self.n]


def on_host(dataset: ImageDataset | TensorDataset) -> bool:
    """Whether a data set's batches are built in host memory (then a GPU's loader pins them)."""
    if isinstance(dataset, ImageDataset):
        return dataset.tensor is None or dataset.tensor.device.type == "cpu"
    return all(t.device.type == "cpu" for t in getattr(dataset, "tensors", ()))


def make_loader(dataset: ImageDataset | TensorDataset, batch_size: int, shuffle: bool, seed: int,
                num_workers: int = 0, passes: int = 1) -> Batches | DataLoader:
    """Batches in process; torch's DataLoader with worker processes (Batches' own order as its batch sampler,
    per-worker augmentation seeds) or under distributed training, where Lightning puts its distributed sampler
    into it (a seeded shuffle; `passes` > 1 repeats the data set that many times there)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    order = Batches(dataset, batch_size, shuffle, seed, passes)
    if num_workers == 0 and not distributed:
        return order
    common = {"num_workers": num_workers, "worker_init_fn": seed_worker if num_workers else None,
              "generator": torch.Generator().manual_seed(seed),  # the workers' seeds derive from it
              "persistent_workers": num_workers > 0, "collate_fn": collate,
              "pin_memory": torch.cuda.is_available() and on_host(dataset)}
    if not distributed:
        return DataLoader(dataset, batch_sampler=BatchOrder(order), **common)
    return DataLoader(Repeated(dataset, passes) if shuffle and passes > 1 else dataset, batch_size=batch_size,
                      shuffle=shuffle, drop_last=shuffle and len(dataset) > batch_size, **common)


class ImageDataModule(pl.LightningDataModule):
    """Train/val/test splits of uint8 arrays; the train split gets the augmentation (see the module's docstring).

    `batched`: true, false or auto (on a GPU always; on the CPU for images up to BATCHED_MAX_VALUES)."""

    def __init__(self, splits: dict[str, tuple[np.ndarray, np.ndarray]], batch_size: int, seed: int,
                 augment: A.Compose | None = None, image_size: int | None = None, batched: bool | str = "auto",
                 num_workers: int = 0, passes: int = 1) -> None:
        super().__init__()
        self.splits, self.batch_size, self.seed, self.num_workers = splits, batch_size, seed, num_workers
        self.passes = passes
        self.augment = augment if augment is not None and len(augment.transforms) else None
        self.image_size, self.batched = image_size, batched
        self.device, self.rank = torch.device("cpu"), 0
        self.batch_augment: BatchAugment | None = None
        self._datasets: dict[str, ImageDataset] = {}

    def setup(self, stage: str) -> None:
        """The training device and process are known now: data sets go there, each process draws its own
        augmentations (rank 0 keeps the seed's)."""
        if self.trainer is not None:
            self.rank = self.trainer.global_rank
            if self.num_workers == 0:  # worker processes read host memory
                self.device = self.trainer.strategy.root_device
        for dataset in self._datasets.values():  # built before fitting started
            dataset.rank = self.rank
            dataset.to(self.device)
        for augmentation in (self.batch_augment, getattr(self._datasets.get("train"), "per_image", None)):
            if augmentation is not None:
                augmentation.set_random_seed(self.seed + self.rank)

    def _batched(self) -> BatchAugment | None:
        if self.augment is None or self.batched is False:
            return None
        if self.batched == "auto" and self.device.type == "cpu" and values_per_image(
                self.splits["train"][0], self.image_size) > BATCHED_MAX_VALUES:
            return None
        return BatchAugment.of(self.augment, self.seed + self.rank)

    def dataset(self, split: str) -> ImageDataset:
        """The split's data set, built once, on the training device."""
        if split not in self._datasets:
            per_image = None
            if split == "train":
                self.batch_augment = self._batched()
                if self.batch_augment is None and self.augment is not None:
                    per_image = self.augment
                    per_image.set_random_seed(self.seed + self.rank)
            x, y = self.splits[split]
            dataset = ImageDataset(x, y, per_image, self.image_size)
            dataset.rank = self.rank
            self._datasets[split] = dataset.to(self.device)
        return self._datasets[split]

    def train_dataloader(self) -> Batches | DataLoader:
        return make_loader(self.dataset("train"), self.batch_size, True, self.seed + self.rank, self.num_workers,
                           self.passes)

    def val_dataloader(self) -> Batches | DataLoader:
        return make_loader(self.dataset("val"), self.batch_size, False, self.seed, self.num_workers)

    def test_dataloader(self) -> Batches | DataLoader:
        return make_loader(self.dataset("test"), self.batch_size, False, self.seed, self.num_workers)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Training batches, now on the device, get the batched augmentation there."""
        if self.batch_augment is not None and self.trainer is not None and self.trainer.training:
            images, labels = batch
            return [self.batch_augment(images), labels]
        return batch


class TensorDataModule(pl.LightningDataModule):
    """Ready tensors (e.g. cached features) as train/val loaders, through the same seeded `make_loader`."""

    def __init__(self, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                 batch_size: int, seed: int, passes: int = 1) -> None:
        super().__init__()
        self.train_set, self.val_set = TensorDataset(*train), TensorDataset(*val)
        self.batch_size, self.seed, self.passes = batch_size, seed, passes

    def setup(self, stage: str) -> None:
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        for data in (self.train_set, self.val_set):
            data.tensors = tuple(t.to(device) for t in data.tensors)

    def train_dataloader(self) -> Batches | DataLoader:
        return make_loader(self.train_set, self.batch_size, True, self.seed, passes=self.passes)

    def val_dataloader(self) -> Batches | DataLoader:
        return make_loader(self.val_set, self.batch_size, False, self.seed)
