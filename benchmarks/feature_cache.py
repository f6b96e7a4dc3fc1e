"""Feature extraction: the head trained on cached base features vs the naive frozen-backbone loop.
Same data, epochs and head; prints images/s, total time and the speed-up."""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from pipeline.data.prepared import build_prepared
from pipeline.data.sources import load_embedded
from pipeline.models.classifier import Classifier
from pipeline.models.transfer import TransferNet
from pipeline.params import TrainerParams
from pipeline.stages.common import fit, seed_all
from pipeline.stages.transfer_learn import feature_extraction_setup, task_splits
from pipeline.training.module import OptimConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=50)
    args = parser.parse_args()
    raw = load_embedded(28, 1)
    data = build_prepared(raw.images, raw.labels, raw.class_names, (0.7, 0.15, 0.15), 0, 5)
    target = task_splits(data, [5, 6, 7, 8, 9], args.per_class, seed=0)
    os.chdir(tempfile.mkdtemp())
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{os.getcwd()}/mlflow.db"
    results = {}
    for cached in (False, True):
        seed_all(0)
        model = Classifier(TransferNet(args.backbone, 5, 128, 0.3, args.image_size, 3), data.mean, data.std, 3)
        start = time.perf_counter()
        module, dm, example = feature_extraction_setup(model, target, args.image_size, 32, 0, 0,
                                                       OptimConfig(lr=1e-3), cached)
        result = fit(module, dm, trainer_params=TrainerParams(), epochs=args.epochs, experiment="benchmark",
                     run_name=f"fe_cached={cached}", tags={}, log_params={}, input_shape=(3, args.image_size,
                     args.image_size), checkpoint_name=f"bench_{cached}", tracked=model, example=example,
                     log_model=False)
        seconds = time.perf_counter() - start  # includes computing the cache
        images = args.epochs * len(target["train"][1])
        results[cached] = (seconds, images / seconds, result.best_val_acc)
    (naive_s, naive_ips, naive_acc), (cached_s, cached_ips, cached_acc) = results[False], results[True]
    print(f"{args.backbone} at {args.image_size}px, {len(target['train'][1])} train images, {args.epochs} epochs")
    print(f"naive frozen loop : {naive_s:7.1f} s  {naive_ips:8.1f} img/s  best val acc {naive_acc:.4f}")
    print(f"cached features   : {cached_s:7.1f} s  {cached_ips:8.1f} img/s  best val acc {cached_acc:.4f}")
    print(f"speed-up cached / naive: {naive_s / cached_s:.2f}x; accuracy difference "
          f"{abs(naive_acc - cached_acc) * 100:.2f} points")


if __name__ == "__main__":
    main()
