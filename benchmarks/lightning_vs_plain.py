"""Steps/s of the project's Lightning module vs a hand-written PyTorch loop: same data, model, device, steps."""

from __future__ import annotations

import argparse
import time

import pytorch_lightning as pl
import torch

from pipeline.data.datamodule import ImageDataModule
from pipeline.data.prepared import build_prepared
from pipeline.data.sources import load_embedded
from pipeline.models.classifier import Classifier
from pipeline.models.cnn import CNN, PRESETS
from pipeline.training.module import ClassifierModule, OptimConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    raw = load_embedded(28, 1)
    data = build_prepared(raw.images, raw.labels, raw.class_names, (0.7, 0.15, 0.15), 0, 5)
    splits = {s: (data.x[s], data.y[s]) for s in ("train", "val", "test")}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def new_model():
        torch.manual_seed(0)
        return Classifier(CNN(PRESETS["seed_mnist"], 1, 28, 10), data.mean, data.std, 1)

    dm = ImageDataModule(splits, args.batch_size, 0, 0, None)

    # Plain PyTorch loop.
    model = new_model().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    steps, start = 0, time.perf_counter()
    while steps < args.steps:
        for x, y in dm.train_dataloader():
            x, y = x.to(device), y.to(device)
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
            steps += 1
            if steps == args.steps:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    plain = args.steps / (time.perf_counter() - start)

    # The project's LightningModule through a Trainer (no logger/checkpoint/progress bar: the step itself).
    module = ClassifierModule(new_model(), 10, OptimConfig.from_params(scheduler="none", warmup_epochs=0))
    trainer = pl.Trainer(max_steps=args.steps, accelerator="auto", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=dm.train_dataloader())
    lightning = args.steps / (time.perf_counter() - start)

    print(f"device: {device.type}, {args.steps} steps of batch {args.batch_size}, seed_mnist (421,642 params)")
    print(f"plain PyTorch loop : {plain:8.1f} steps/s")
    print(f"Lightning module   : {lightning:8.1f} steps/s")
    print(f"ratio Lightning / plain: {lightning / plain:.3f}")


if __name__ == "__main__":
    main()
