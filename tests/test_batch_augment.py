"""Batched augmentation: albumentations' transforms, ranges and probabilities on whole batches."""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import pytest
import torch

from pipeline.data import augment as aug
from pipeline.data.batch_augment import BatchAugment
from pipeline.data.datamodule import ImageDataModule, ImageDataset
from pipeline.params import AugmentParams


@pytest.fixture(scope="session")
def mnist(digits):
    return digits.images[:48]  # real MNIST digits, uint8 (N, 28, 28, 1)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def both(transform: A.BasicTransform, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The transform through albumentations image by image, and through BatchAugment, in gray levels."""
    compose = A.Compose([transform], seed=0)
    per_image = np.stack([compose(image=img)["image"].reshape(img.shape) for img in images]).astype(np.float64)
    batched = BatchAugment(compose, 0)(to_tensor(images)).permute(0, 2, 3, 1).double().numpy() * 255
    return per_image, batched


@pytest.mark.parametrize("transform", [
    A.Affine(rotate=(12, 12), scale={"x": (1.1, 1.1), "y": (0.92, 0.92)},
             translate_percent={"x": (0.1, 0.1), "y": (-0.07, -0.07)}, shear={"x": (5, 5), "y": (-3, -3)},
             border_mode=cv2.BORDER_CONSTANT, fill=0, p=1),
    A.Affine(rotate=(-20, -20), translate_px={"x": (3, 3), "y": (-2, -2)}, border_mode=cv2.BORDER_CONSTANT,
             fill=40, p=1),
    A.Affine(rotate=(-30, -30), interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_CONSTANT, p=1),
    A.RandomBrightnessContrast(brightness_limit=(0.1, 0.1), contrast_limit=(0.25, 0.25), p=1),
    A.RandomBrightnessContrast(brightness_limit=(-0.3, -0.3), contrast_limit=(-0.1, -0.1), p=1),
    A.HorizontalFlip(p=1),
    A.VerticalFlip(p=1),
], ids=["affine", "affine-px-fill", "affine-nearest", "brighter", "darker", "hflip", "vflip"])
def test_fixed_draws_give_albumentations_pixels(mnist, transform):
    """With each range collapsed to one value, every image equals albumentations' own output up to its
    rounding to whole gray levels (cv2 warps in fixed point and stores uint8)."""
    per_image, batched = both(transform, mnist)
    assert np.abs(per_image - batched).max() <= 1.0
    assert not np.array_equal(per_image, mnist)  # the transform did something


def test_affine_draws_match_albumentations_distribution():
    """The matrices drawn per image: each entry's mean and spread as albumentations draws them (2,000 each)."""
    t = aug.build(AugmentParams(), 0).transforms[0]
    assert type(t).__name__ == "Affine"
    theirs = np.stack([t.get_params_dependent_on_data({"shape": (28, 28)}, {})["matrix"][:2] for _ in range(2000)])
    step = BatchAugment(A.Compose([t]), 0).steps[0]
    ours = step.matrices(2000, 28, 28, torch.Generator().manual_seed(1))[:, :2]
    spread = theirs.std(0)
    assert np.all(np.abs(ours.mean(0) - theirs.mean(0)) <= 0.1 * spread + 1e-9)
    assert np.allclose(ours.std(0), spread, rtol=0.1)
    # whole-pixel shifts, as albumentations truncates translate_percent * size
    shift = ours[:, :, 2] - (np.eye(2) - ours[:, :, :2]) @ np.array([13.5, 13.5])
    assert np.allclose(shift, np.round(shift)) and np.round(np.abs(shift).max()) == 2


def test_probabilities_and_dropout_area_match_albumentations():
    """Each image is transformed with the transform's p, and CoarseDropout cuts as much as albumentations."""
    ones = np.full((2000, 28, 28, 1), 255, dtype=np.uint8)
    dropout = A.CoarseDropout(num_holes_range=(1, 2), hole_height_range=(0.1, 0.25), hole_width_range=(0.1, 0.25),
                              fill=0, p=0.4)
    per_image, batched = both(dropout, ones)
    cut_theirs, cut_ours = (per_image == 0).mean(axis=(1, 2, 3)), (batched == 0).mean(axis=(1, 2, 3))
    assert abs((cut_ours > 0).mean() - 0.4) < 0.04  # p: 2,000 draws, 4 standard errors
    assert cut_ours[cut_ours > 0].mean() == pytest.approx(cut_theirs[cut_theirs > 0].mean(), rel=0.08)
    assert cut_ours.max() <= 2 * 0.25**2 + 1e-9  # at most two holes of at most a quarter of each side


def test_same_seed_same_batch_and_reseeding(mnist):
    def run(seed, reseed=None):
        batch_aug = BatchAugment(aug.build(AugmentParams(affine_p=1.0), 0), seed)
        if reseed is not None:
            batch_aug(to_tensor(mnist))
            batch_aug.set_random_seed(reseed)
        return batch_aug(to_tensor(mnist))

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))
    assert torch.equal(run(9, reseed=3), run(3))


def test_data_module_uses_batches_unless_the_pipeline_or_params_say_otherwise(tiny_prepared):
    from pipeline.errors import PipelineError
    from pipeline.params import parse

    with pytest.raises(PipelineError, match=r"trainer.batched_augment must be true, false or 'auto' \(got 'x'\)"):
        parse({"trainer": {"batched_augment": "x"}})
    splits = {s: (tiny_prepared.x[s], tiny_prepared.y[s]) for s in ("train", "val")}
    default = aug.build(AugmentParams(), 0)
    assert isinstance(ImageDataModule(splits, 16, 0, 0, default).train_transform, BatchAugment)
    assert ImageDataModule(splits, 16, 0, 0, default, batched=False).train_transform is default
    # auto (the default): large images image by image, where cv2 is faster on the CPU; true forces batches
    big = {"train": (np.zeros((4, 96, 96, 3), dtype=np.uint8), np.zeros(4, dtype=np.int64))}
    assert ImageDataModule(big, 2, 0, 0, default).train_transform is default
    assert ImageDataModule(splits, 16, 0, 0, default, image_size=160).train_transform is default
    assert isinstance(ImageDataModule(big, 2, 0, 0, default, batched=True).train_transform, BatchAugment)
    # a transform only albumentations implements: the whole pipeline runs image by image
    blur = A.Compose([*default.transforms, A.GaussianBlur(p=0.5)], seed=0)
    dm = ImageDataModule(splits, 16, 0, 0, blur)
    assert dm.train_transform is blur
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 1, 28, 28) and images.dtype == torch.float32 and len(labels) == 16


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


@pytest.mark.parametrize(("batched", "workers"), [(True, 0), (False, 0), (True, 2)])
def test_each_ddp_process_draws_its_own_augmentations(tiny_prepared, batched, workers):
    """The same seed on every process: rank 0 keeps the seed's draws, rank 1 draws others (Lightning sets the
    trainer before it calls setup)."""
    from types import SimpleNamespace

    splits = {s: (tiny_prepared.x[s], tiny_prepared.y[s]) for s in ("train", "val")}

    def first_batch(rank):
        dm = ImageDataModule(splits, 16, workers, 3, aug.build(AugmentParams(affine_p=1.0), 3), batched=batched)
        if rank is not None:
            dm.trainer = SimpleNamespace(global_rank=rank)
            dm.setup("fit")
        return next(iter(dm.train_dataloader()))

    (alone, labels), (rank0, labels0), (rank1, labels1) = first_batch(None), first_batch(0), first_batch(1)
    assert torch.equal(alone, rank0) and torch.equal(labels, labels0) and torch.equal(labels, labels1)
    assert not torch.equal(rank0, rank1)
