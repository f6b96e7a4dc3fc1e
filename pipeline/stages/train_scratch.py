"""train_scratch: the configurable CNN (default: the seed's MNIST CNN) trained from scratch with Lightning.

Reads params: seed, model, train, trainer, mlflow (and the augmentation pipeline the `augment` stage saved).
Writes models/scratch/ (model.pt, best.ckpt), metrics/train_scratch.json (with the MLflow run id),
plots/train_scratch.csv and the learning-curve PNG; logs all of it, and the model, to MLflow.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from pipeline import params as params_mod
from pipeline import plots, tracking
from pipeline.atomic import atomic_dir, write_csv, write_json
from pipeline.data import augment as aug
from pipeline.data.datamodule import ImageDataModule
from pipeline.data.prepared import PreparedData
from pipeline.errors import stage_main
from pipeline.models import checkpoint
from pipeline.models.classifier import Classifier
from pipeline.models.cnn import CNN, spec_from_params
from pipeline.stages.common import fit, is_rank_zero, seed_all
from pipeline.training.module import ClassifierModule, OptimConfig

MODEL_DIR = Path("models/scratch")


def run(p: params_mod.Params, extra_callbacks: list | None = None) -> dict:
    """Train the CNN from params.model with params.train; write models/scratch/, metrics and curves.

    `extra_callbacks` (Lightning callbacks) let benchmarks watch the same training the stage runs.
    """
    m, t = p.model, p.train
    data = PreparedData.load()
    transform = aug.load(aug.PIPELINE_PATH, seed=p.seed)
    tracking.check_store()
    seed_all(p.seed)

    spec = spec_from_params(m.preset, m.blocks, m.head, m.dense, m.dropout)
    net = CNN(spec, data.channels, data.image_size, data.num_classes)  # impossible stacks fail here
    model = Classifier(net, data.mean, data.std, data.channels)
    splits = {s: (data.x[s], data.y[s]) for s in ("train", "val", "test")}
    offline = aug.load_offline_copies()
    if offline is not None:
        # Augmentation-bound users materialize copies once (augment.offline_copies); train on them plus the
        # originals, and skip the online pipeline.
        splits["train"] = (np.concatenate([data.x["train"], offline[0]]), np.concatenate([data.y["train"], offline[1]]))
        transform = None
        print(f"train_scratch: training on {len(splits['train'][1])} images (offline augmented copies)", flush=True)
    datamodule = ImageDataModule(splits, t.batch_size, p.trainer.num_workers, p.seed, transform)
    optim = OptimConfig(t.optimizer, t.lr, t.momentum, t.weight_decay, t.label_smoothing, t.scheduler,
                        t.warmup_epochs, t.step_size, t.gamma, t.early_stopping.monitor)
    module = ClassifierModule(model, data.num_classes, optim)
    run_name = f"train_scratch/{spec.name}"
    logged = params_mod.flatten({"seed": p.seed, "data": p.data, "augment": p.augment, "model": m, "train": t,
                                 "trainer": p.trainer})
    logged |= {"model.resolved": str(spec.to_dict())[:5000], "data.num_classes": data.num_classes}

    result = fit(
        module, datamodule, trainer_params=p.trainer, epochs=t.epochs, experiment=p.mlflow.experiment,
        run_name=run_name, tags=tracking.run_tags("train_scratch", spec.name, data.data_hash),
        log_params=logged, input_shape=(data.channels, data.image_size, data.image_size),
        checkpoint_name="train_scratch", monitor=t.early_stopping.monitor,
        patience=t.early_stopping.patience if t.early_stopping.enabled else None,
        gradient_clip_val=t.gradient_clip_val, limit_train_batches=t.limit_train_batches,
        artifacts=aug.artifacts(), extra_callbacks=extra_callbacks,
    )
    if not is_rank_zero():
        return {}

    arch = checkpoint.cnn_arch(spec, data.channels, data.image_size, data.num_classes)
    meta = {"stage": "train_scratch", "name": spec.name, "class_names": data.class_names,
            "class_ids": list(range(data.num_classes)), "image_size": data.image_size,
            "mlflow_run_id": result.run_id, "model_uri": result.model_uri}
    with atomic_dir(MODEL_DIR) as tmp:
        checkpoint.save(tmp / "model.pt", model, arch, meta)
        if result.best_checkpoint is not None:
            shutil.copy2(result.best_checkpoint, tmp / "best.ckpt")
    write_csv("plots/train_scratch.csv", result.rows)
    plots.learning_curves(result.rows, Path("plots/train_scratch/learning_curves.png"),
                          f"{run_name}: learning curves")
    final = result.rows[-1] if result.rows else {}
    metrics = {
        "model": spec.name, "best_val_acc": round(result.best_val_acc, 6),
        "best_val_loss": round(result.best_val_loss, 6), "final_train_acc": final.get("train_acc"),
        "final_train_loss": final.get("train_loss"), "epochs_run": result.epochs_run,
        "train_time_s": round(result.train_time_s, 2), "params_total": result.counts.get("total"),
        "params_trainable": result.counts.get("trainable"), "mlflow_run_id": result.run_id,
    }
    write_json("metrics/train_scratch.json", metrics)
    print(f"train_scratch: best val_acc {result.best_val_acc:.4f} after {result.epochs_run} epochs "
          f"({result.train_time_s:.1f}s); MLflow run {result.run_id}", flush=True)
    return metrics


@stage_main
def main() -> None:
    run(params_mod.load())


if __name__ == "__main__":
    main()
