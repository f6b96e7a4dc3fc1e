"""Feature extraction: the head trained on cached base features vs the naive loop through the frozen base.

The stage's own pieces and defaults (backbone, image size, head_steps, batch size) on the embedded digits,
N labelled images per class. The cached time includes computing the features. Prints both times, the
speed-up and the accuracies (which must agree: the cached path is exact, see tests/test_transfer.py).

    .venv/bin/python benchmarks/feature_cache.py [--per-class 100]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from pipeline import params as params_mod
from pipeline.data.datamodule import ImageDataModule, TensorDataModule
from pipeline.data.fewshot import class_subset, per_class_indices
from pipeline.data.prepared import build_prepared
from pipeline.data.sources import load_embedded
from pipeline.evaluation import predict_proba
from pipeline.models import registry
from pipeline.models.classifier import Classifier
from pipeline.models.transfer import HeadOnly, TransferNet, extract_features, freeze_base, load_imagenet_base
from pipeline.training.fit import FitConfig, fit, seed_all
from pipeline.training.module import ClassifierModule, OptimConfig
from pipeline.training.transfer import epochs_for

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=100)
    args = parser.parse_args()
    tp = params_mod.load(REPO / "params.yaml").transfer
    raw = load_embedded(28, 1)
    data = build_prepared(raw.images, raw.labels, raw.class_names, (0.7, 0.15, 0.15), 0, 5)
    splits = class_subset(data, list(range(10)))
    idx = per_class_indices(splits["train"][1], args.per_class, 0, "per_class")
    val_idx = per_class_indices(splits["val"][1], tp.val_per_class, 0, "val")
    train, val = (splits["train"][0][idx], splits["train"][1][idx]), (splits["val"][0][val_idx], splits["val"][1][val_idx])
    arch = registry.get(tp.backbone)
    epochs = epochs_for(tp.head_steps, len(idx), tp.batch_size)
    os.chdir(tempfile.mkdtemp())
    results = {}
    for cached in (False, True, False, True):  # alternating rounds: the second of each is the one reported
        seed_all(0)
        net = TransferNet(tp.backbone, 10, tp.head_units, tp.head_dropout, tp.image_size, 3)
        load_imagenet_base(net)
        model = Classifier(net, *arch.imagenet_norm, 3, tp.image_size)
        freeze_base(model.net, 0)
        start = time.perf_counter()
        if cached:
            feats = {k: extract_features(model, v[0]) for k, v in (("train", train), ("val", val))}
            module = ClassifierModule(HeadOnly(model.net.head), 10, OptimConfig.from_params(lr=tp.lr, scheduler="none", warmup_epochs=0))
            dm = TensorDataModule((feats["train"], torch.as_tensor(train[1])),
                                  (feats["val"], torch.as_tensor(val[1])), tp.batch_size, 0)
        else:
            module = ClassifierModule(model, 10, OptimConfig.from_params(lr=tp.lr, scheduler="none", warmup_epochs=0))
            dm = ImageDataModule({"train": train, "val": val}, tp.batch_size, 0, 0)
        fit(module, dm, FitConfig(params_mod.TrainerParams(), epochs, val_every=max(1, epochs // 5), quiet=True))
        seconds = time.perf_counter() - start
        acc = (predict_proba(model, splits["test"][0], 28).argmax(1) == splits["test"][1]).mean()
        results[cached] = (seconds, float(acc))
    (naive_s, naive_acc), (cached_s, cached_acc) = results[False], results[True]
    print(f"{tp.backbone} at {tp.image_size}px, {len(idx)} train images, head_steps {tp.head_steps} "
          f"({epochs} epochs), {len(splits['test'][1])} test images")
    print(f"naive frozen loop : {naive_s:7.1f} s  test acc {naive_acc:.4f}")
    print(f"cached features   : {cached_s:7.1f} s  test acc {cached_acc:.4f}  (feature computation included)")
    print(f"benchmark feature_cache: ratio {naive_s / cached_s:.3f} (goal >= 10) "
          f"{'met' if naive_s / cached_s >= 10 else 'not met'}")


if __name__ == "__main__":
    main()
