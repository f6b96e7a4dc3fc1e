"""Train-loader throughput (images/s) without augmentation, with the pipeline on whole batches (the default,
trainer.batched_augment) and with albumentations image by image, and augmentation's cost per image, on 28x28
grayscale and 224x224 RGB, at the default num_workers; then what each albumentations transform of the pipeline
costs per image, alone and inside the Compose (at its own probability), against the Compose as a whole."""

from __future__ import annotations

import argparse
import time

import numpy as np

from pipeline.data import augment as aug
from pipeline.data.datamodule import ImageDataModule
from pipeline.params import load


def images_per_second(x: np.ndarray, transform, workers: int, batch: int, epochs: int = 2,
                      batched: bool = True) -> float:
    from types import SimpleNamespace

    import torch

    y = np.zeros(len(x), dtype=np.int64)
    dm = ImageDataModule({"train": (x, y)}, batch, 0, transform, batched=batched, num_workers=workers)
    dm.trainer = SimpleNamespace(global_rank=0, training=True, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    dm.setup("fit")  # as Lightning does before fitting
    loader = dm.train_dataloader()
    next(iter(loader))  # start workers outside the timing
    start = time.perf_counter()
    n = 0
    for _ in range(epochs):
        for batch in loader:
            images, _ = dm.on_after_batch_transfer(batch, 0)  # the batched augmentation runs here in training
            n += len(images)
    return n / (time.perf_counter() - start)


def per_image_us(call, images: np.ndarray, n: int = 3000) -> float:
    call(images[0])  # warm-up
    start = time.perf_counter()
    for i in range(n):
        call(images[i % len(images)])
    return (time.perf_counter() - start) / n * 1e6


def per_transform(transform, images: np.ndarray) -> None:
    import albumentations as A

    print(f"{'Compose (all)':>26}: {per_image_us(lambda im: transform(image=im), images):6.1f} us/image")
    empty = A.Compose([], seed=0)
    print(f"{'Compose (empty)':>26}: {per_image_us(lambda im: empty(image=im), images):6.1f} us/image")
    for t in transform.transforms:
        inside = A.Compose([t], seed=0)
        always = type(t)(**t.get_transform_init_args())
        always.p = 1.0
        print(f"{type(t).__name__:>20} p={t.p:<4}: {per_image_us(lambda im, c=inside: c(image=im), images):6.1f} "
              f"us/image in a Compose; {per_image_us(lambda im, a=always: a(image=im), images):6.1f} us when applied")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    params = load()  # the project's params.yaml: its augmentation and its default num_workers
    parser.add_argument("--workers", type=int, default=params.trainer.num_workers)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    transform = aug.build(params.augment, seed=0)
    print(f"num_workers={args.workers}; pipeline: {', '.join(type(t).__name__ for t in transform.transforms)}")
    for name, shape, n in (("28x28x1", (28, 28, 1), 4096), ("224x224x3", (224, 224, 3), 512)):
        x = rng.integers(0, 255, size=(n, *shape), dtype=np.uint8)  # image content does not change the cost
        plain = images_per_second(x, None, args.workers, 64)
        for engine, batched in (("batched", True), ("per image", False)):
            augmented = images_per_second(x, transform, args.workers, 64, batched=batched)
            cost_us = (1 / augmented - 1 / plain) * 1e6
            print(f"{name:>10}: without {plain:9.0f} img/s | with, {engine:>9}: {augmented:9.0f} img/s | "
                  f"ratio {augmented / plain:.3f} | augmentation {cost_us:.1f} us/image")
    print("28x28x1 digits, per transform:")
    from pipeline.data.sources import load_embedded

    per_transform(transform, load_embedded(28, 1).images[:500])


if __name__ == "__main__":
    main()
