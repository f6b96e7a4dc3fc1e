"""Time to accuracy: the seed's CNN on full MNIST (the mnist_full profile) to >= 99.2% test accuracy.

Runs the real stages (prepare, augment, train_scratch) in a temporary folder with the project's params and the
profile on top, and measures test accuracy on MNIST's official 10,000-image test split after every epoch (a
callback on the stage's own Trainer). Prints epochs and seconds of training to the target, on whatever machine
runs it; `python -m benchmarks` (full mode) runs the recipe before this project's speed work and today's side by
side and prints their ratio.

    .venv/bin/python benchmarks/time_to_accuracy.py [--profile mnist_full] [--target 0.992] [--set seed=1 ...]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import yaml

from pipeline import params as params_mod
from pipeline.data.prepared import PreparedData
from pipeline.errors import PipelineError, stage_main
from pipeline.predict import device_for, predict_proba
from pipeline.stages import augment, prepare, train_scratch

REPO = Path(__file__).resolve().parents[1]
# The full-MNIST recipe before the bf16 work, for the side-by-side: 3 epochs of one-cycle (1 warm-up) at batch 128
# and lr 0.003, fp32.
BEFORE = {"train.epochs": 3, "train.batch_size": 128, "train.lr": 0.003, "train.warmup_epochs": 1,
          "train.label_smoothing": 0.0, "trainer.precision": "32-true"}


class TestAccuracy(pl.Callback):
    """Test accuracy after every training epoch, and the training time since fitting started."""

    def __init__(self, data: PreparedData) -> None:
        self.data, self.rows, self.start, self.eval_time = data, [], 0.0, 0.0

    def on_fit_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        t0 = time.perf_counter()
        model = pl_module.model
        was_training = model.training
        probs = predict_proba(model, self.data.x["test"], self.data.image_size, 1024, pl_module.device)
        model.train(was_training)
        acc = float((probs.argmax(1) == self.data.y["test"]).mean())
        self.eval_time += time.perf_counter() - t0
        train_time = time.perf_counter() - self.start - self.eval_time
        self.rows.append({"epoch": trainer.current_epoch + 1, "test_acc": acc, "train_time_s": train_time})
        print(f"time_to_accuracy: epoch {trainer.current_epoch + 1}: test acc {acc:.4f} after {train_time:.1f}s "
              f"of training", flush=True)


def recipe(profile: str = "mnist_full", overrides: dict | None = None) -> params_mod.Params:
    """params.yaml with the profile and `overrides` (dotted keys, as `dvc exp run -S`) on top; the repository's
    downloaded files reused."""
    raw = params_mod.with_profile(profile, REPO / "params.yaml").model_dump(mode="json")
    for key, value in (overrides or {}).items():
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:  # a missing section is one line naming it (a new leaf is checked by parse)
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and isinstance(node.get(part), dict | list):
                node = node[part]
            else:
                near = sorted((k for k in params_mod.flatten(raw) if k.split(".")[-1] == leaf),
                              key=lambda k: (k.count("."), k))
                raise PipelineError(f"--set {key}: no such params key" + (
                    f"; did you mean {', '.join(near[:5])}?" if near else
                    " (keys as in params.yaml, dotted: train.lr, seed, model.blocks.0.filters, ...)"))
        if isinstance(node, list):
            if not (leaf.isdigit() and int(leaf) < len(node)):
                raise PipelineError(f"--set {key}: {'.'.join(parents)} has {len(node)} items (0-{len(node) - 1})")
            node[int(leaf)] = value
        else:
            node[leaf] = value
    p = params_mod.parse(raw, source=f"profile {profile} + {overrides or {}}")
    return p.model_copy(update={"data": p.data.model_copy(update={"raw_dir": str((REPO / p.data.raw_dir).resolve())})})


@contextlib.contextmanager
def workspace():
    """A temporary folder with its own MLflow store, the working directory while the block runs."""
    before = Path.cwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        previous = os.environ.get("MLFLOW_TRACKING_URI")
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        try:
            yield Path(tmp)
        finally:
            os.chdir(before)
            if previous is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = previous


def measure(p: params_mod.Params, target: float) -> dict:
    """One training of `p` in the working directory (prepare and augment first when their outputs are missing):
    the epoch and training seconds at which test accuracy first reached `target` (None: not reached)."""
    if not Path("data/prepared/meta.json").exists():
        prepare.run(p)
    augment.run(p)
    data = PreparedData.load()
    watch = TestAccuracy(data)
    start = time.perf_counter()
    train_scratch.run(p, extra_callbacks=[watch])
    reached = next((r for r in watch.rows if r["test_acc"] >= target), None)
    return {"epoch": reached["epoch"] if reached else None, "seconds": reached["train_time_s"] if reached else None,
            "accs": [round(r["test_acc"], 4) for r in watch.rows], "stage_s": time.perf_counter() - start,
            "train_images": len(data.y["train"]), "test_images": len(data.y["test"])}


def describe(name: str, m: dict, target: float) -> str:
    where = (f"reached {target:.3f} at epoch {m['epoch']} after {m['seconds']:.1f}s of training"
             if m["epoch"] else f"did not reach {target:.3f} in {len(m['accs'])} epochs")
    return f"time_to_accuracy: {name}: {where}; per-epoch test acc {m['accs']}; whole stage {m['stage_s']:.0f}s"


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="mnist_full")
    parser.add_argument("--target", type=float, default=0.992)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a params key on top of the profile, as dvc exp run -S (e.g. seed=1)")
    args = parser.parse_args(argv)
    bad = [item for item in args.set if "=" not in item]
    if bad:
        parser.error(f"--set {bad[0]!r}: expected KEY=VALUE (e.g. --set seed=1)")
    overrides = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in args.set)}
    with workspace():
        m = measure(recipe(args.profile, overrides), args.target)
    print(f"time_to_accuracy: {m['train_images']} training images, {m['test_images']} test images, device "
          f"{device_for().type}, {os.cpu_count()} CPU cores")
    print(describe(args.profile, m, args.target))
    print(f"time_to_accuracy: per-epoch test acc {np.round(m['accs'], 4).tolist()}")


if __name__ == "__main__":
    main()
