"""The data module: one batch builder, the batched augmentation on the training device, its own seeded order."""

from __future__ import annotations

from types import SimpleNamespace

import albumentations as A
import numpy as np
import pytest
import torch

from pipeline.data import augment as aug
from pipeline.data.augment import BatchAugment
from pipeline.data.datamodule import Batches, ImageDataModule, ImageDataset, make_loader
from pipeline.params import AugmentParams


def pipeline(seed=0, **overrides) -> A.Compose:
    return aug.build(AugmentParams(**overrides), seed)


def splits(data):
    return {s: (data.x[s], data.y[s]) for s in ("train", "val", "test")}


def fitting(dm: ImageDataModule, rank: int = 0, device: str = "cpu") -> ImageDataModule:
    """The data module as Lightning sets it up for fitting (its trainer, the process, the training device)."""
    dm.trainer = SimpleNamespace(global_rank=rank, training=True,
                                 strategy=SimpleNamespace(root_device=torch.device(device)))
    dm.setup("fit")
    return dm


def epoch(dm: ImageDataModule, loader=None) -> list[list[torch.Tensor]]:
    """One epoch of training batches as the training step sees them: after the batch transfer hook."""
    return [dm.on_after_batch_transfer(batch, 0) for batch in (loader or dm.train_dataloader())]


def test_train_batches_are_augmented_and_val_batches_are_not(tiny_prepared):
    """Sample by sample: the augmented training epoch holds the same images in the same order, with the same
    labels, as the plain one, each with other pixels; validation yields the stored pixels untouched."""
    geometric = pipeline(affine_p=1.0, rotation_range=30, brightness=0, contrast=0, coarse_dropout={"p": 0})
    dm = fitting(ImageDataModule(splits(tiny_prepared), 16, 0, geometric))
    plain = fitting(ImageDataModule(splits(tiny_prepared), 16, 0, None))
    augmented, original = epoch(dm), epoch(plain)
    assert [len(y) for _, y in augmented] == [len(y) for _, y in original] == [16] * len(original)
    for (x, y), (x0, y0) in zip(augmented, original, strict=True):
        assert torch.equal(y, y0)  # same samples, same order, batch after batch
        for a, o in zip(x, x0, strict=True):
            assert not torch.equal(a, o)  # every sample changed (affine_p=1.0) ...
            assert abs(float(a.sum() - o.sum())) < 0.35 * float(o.sum())  # ... by a warp of the same digit
    dm.trainer.training = False  # validation: the hook leaves batches alone
    val_x, val_y = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    expected = torch.from_numpy(tiny_prepared.x["val"][:16]).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(val_x, expected) and val_y.tolist() == tiny_prepared.y["val"][:16].tolist()


def test_the_batch_order_is_the_loaders_own_and_documented(tiny_prepared):
    """Epoch e's order is randperm(n) of a generator seeded with seed * 1_000_003 + e: the same seed gives the
    same epochs, epochs differ, and an epoch set by Lightning (a resumed run) is the one it would have been."""
    x, y = tiny_prepared.x["train"], tiny_prepared.y["train"]
    loader = Batches(ImageDataset(x, y), 16, shuffle=True, seed=3)
    first = [labels for _, labels in loader]
    expected = torch.randperm(len(y), generator=torch.Generator().manual_seed(3 * 1_000_003))
    assert torch.equal(torch.cat(first), torch.as_tensor(y)[expected[: len(first) * 16]])
    assert len(first) == len(y) // 16  # a short last batch is dropped when shuffling
    loader.set_epoch(1)
    second = torch.cat([labels for _, labels in loader])
    assert not torch.equal(torch.cat(first), second)
    resumed = Batches(ImageDataset(x, y), 16, shuffle=True, seed=3)
    resumed.sampler.set_epoch(1)  # what Lightning calls at an epoch's start, also after a resume
    assert torch.equal(torch.cat([labels for _, labels in resumed]), second)
    ordered = Batches(ImageDataset(x, y), 16, shuffle=False, seed=3)
    assert torch.equal(torch.cat([labels for _, labels in ordered]), torch.as_tensor(y))  # val/test: stored order


@pytest.mark.parametrize(("n", "batch"), [(40, 8), (45, 8), (5, 8)])
def test_loader_workers_give_the_in_process_epoch(tiny_prepared, n, batch):
    """With loader workers the epoch is the in-process one: the same batches of the same images in the same order,
    `passes` seeded permutations each cut into batches (a short last batch dropped, unless one batch is all),
    the epoch set by Lightning; the images still augmented image by image in the workers."""
    spread = np.linspace(0, len(tiny_prepared.y["train"]) - 1, n).astype(int)  # every class, not the first's
    x, y = tiny_prepared.x["train"][spread], tiny_prepared.y["train"][spread]

    def epoch_of(workers: int, ep: int) -> list[list[torch.Tensor]]:
        dm = fitting(ImageDataModule({"train": (x, y), "val": (x, y)}, batch, 3, pipeline(3, affine_p=1.0),
                                     batched=False, num_workers=workers, passes=3))
        loader = dm.train_dataloader()
        from lightning_fabric.utilities.data import _set_sampler_epoch

        _set_sampler_epoch(loader, ep)  # what Lightning calls at every epoch's start
        batches = epoch(dm, loader)
        assert len(batches) == len(loader)
        return batches

    here, there = epoch_of(0, 1), epoch_of(2, 1)
    per_pass = n // batch if n > batch else 1
    assert len(here) == len(there) == 3 * per_pass
    for a, b in zip(here, there, strict=True):
        assert torch.equal(a[1], b[1])  # the same labels, batch by batch
    assert not torch.equal(torch.cat([b[1] for b in epoch_of(2, 0)]), torch.cat([b[1] for b in there]))
    plain = torch.as_tensor(x).permute(0, 3, 1, 2).float() / 255
    assert not any(torch.equal(img, ref) for img in there[0][0][:3] for ref in plain)  # augmented in the workers
    tensors = make_loader(torch.utils.data.TensorDataset(torch.arange(float(n)), torch.arange(n)), batch, True, 3,
                          num_workers=2, passes=3)
    assert [len(labels) for _, labels in tensors] == [len(b[1]) for b in here]


@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_same_augmented_batch(tiny_prepared, workers):
    def first_batch(seed):
        dm = fitting(ImageDataModule(splits(tiny_prepared), 16, seed, pipeline(seed, affine_p=1.0),
                                     num_workers=workers))
        return epoch(dm)[0][0]

    assert torch.equal(first_batch(3), first_batch(3))
    assert not torch.equal(first_batch(3), first_batch(4))


@pytest.mark.parametrize(("batched", "workers"), [(True, 0), (False, 0), (True, 2), (False, 2)])
def test_each_ddp_process_draws_its_own_augmentations(tiny_prepared, batched, workers):
    """The same seed on every process: rank 0 keeps the seed's draws, rank 1 draws others."""
    def first_batch(rank):
        dm = ImageDataModule(splits(tiny_prepared), 16, 3, pipeline(3, affine_p=1.0), batched=batched,
                             num_workers=workers)
        dm = fitting(dm, rank)
        dataset = dm.dataset("train")
        loader = make_loader(dataset, 16, False, 3, workers)  # the same images on both ranks
        return epoch(dm, loader)[0][0]

    assert not torch.equal(first_batch(0), first_batch(1))
    assert torch.equal(first_batch(0), first_batch(0))


def test_batched_unless_the_pipeline_or_params_say_otherwise(tiny_prepared):
    from pipeline.errors import PipelineError
    from pipeline.params import parse

    with pytest.raises(PipelineError, match=r"trainer.batched_augment must be true, false or 'auto' \(got 'x'\)"):
        parse({"trainer": {"batched_augment": "x"}})
    default = pipeline()

    def mode(data, device="cpu", **kwargs):
        dm = ImageDataModule(data, 2, 0, default, **kwargs)
        dm.device = torch.device(device)
        per_image = dm.dataset("train").per_image
        return "batched" if isinstance(dm.batch_augment, BatchAugment) else ("per image" if per_image else "none")

    digits = splits(tiny_prepared)
    big = {"train": (np.zeros((4, 96, 96, 3), dtype=np.uint8), np.zeros(4, dtype=np.int64))}
    assert mode(digits) == "batched" and mode(digits, batched=False) == "per image"
    # auto on the CPU: large images image by image, where cv2 is faster; on a GPU, batches at any size
    assert mode(big) == "per image" and mode(digits, image_size=160) == "per image"
    assert mode(big, batched=True) == "batched" and mode(big, device="meta") == "batched"
    # a transform only albumentations implements: the whole pipeline runs image by image
    blur = A.Compose([*default.transforms, A.GaussianBlur(p=0.5)], seed=0)
    dm = fitting(ImageDataModule(digits, 16, 0, blur))
    images, labels = epoch(dm)[0]
    assert dm.batch_augment is None and dm.dataset("train").per_image is blur
    assert images.shape == (16, 1, 28, 28) and images.dtype == torch.float32 and len(labels) == 16


def test_a_training_on_another_device_gets_its_data_and_augmentation_there(tiny_prepared):
    """Built on the host, fitted on another device (here torch's meta device, which holds shapes only; a GPU
    where there is one): the data sets move there once, batches come from there, and the batched augmentation
    runs there, after the transfer."""
    device = "cuda" if torch.cuda.is_available() else "meta"
    dm = ImageDataModule(splits(tiny_prepared), 16, 0, pipeline(affine_p=1.0, coarse_dropout={"p": 1.0}))
    dm.dataset("val")  # built before fitting started, on the host
    fitting(dm, device=device)
    train, val = dm.dataset("train"), dm.dataset("val")
    assert train.tensor.device.type == val.tensor.device.type == device  # placed once, not per batch
    assert train.labels.device.type == device
    images, labels = epoch(dm)[0]
    assert images.device.type == device and labels.device.type == device and images.shape == (16, 1, 28, 28)
    assert dm.batch_augment is not None  # the batched augmentation ran on the device's batch


def test_float_cache_gives_the_converted_pixels(tiny_prepared, monkeypatch):
    """The data set held as one float tensor yields the same batches as converting each batch."""
    from pipeline.data import datamodule

    x, y = tiny_prepared.x["train"], tiny_prepared.y["train"]
    idx = torch.tensor([5, 0, 17, 3])
    for size in (None, 20):
        cached = ImageDataset(x, y, image_size=size)
        monkeypatch.setattr(datamodule, "FLOAT_CACHE_BYTES", 0)
        converted = ImageDataset(x, y, image_size=size)
        monkeypatch.undo()
        assert cached.tensor is not None and converted.tensor is None
        (a, la), (b, lb) = cached.take(idx), converted.take(idx)
        assert torch.equal(a, b) and torch.equal(la, lb) and a.shape[-1] == (size or 28)


def test_loader_over_tensors():
    from torch.utils.data import TensorDataset

    data = TensorDataset(torch.arange(50.0).reshape(25, 2), torch.arange(25))
    batches = list(make_loader(data, 4, True, 1))
    assert len(batches) == 6 and all(len(y) == 4 for _, y in batches)
    seen = torch.cat([y for _, y in batches])
    assert len(set(seen.tolist())) == 24 and all(torch.equal(x[:, 0] / 2, y.float()) for x, y in batches)
