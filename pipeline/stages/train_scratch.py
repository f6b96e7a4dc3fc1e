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
from pipeline.atomic import atomic_set, write_csv, write_json
from pipeline.data import augment as aug
from pipeline.data.datamodule import ImageDataModule
from pipeline.data.prepared import PreparedData
from pipeline.deps import check_outputs_writable
from pipeline.errors import stage_main
from pipeline.models import checkpoint
from pipeline.models.classifier import Classifier
from pipeline.models.cnn import CNN, spec_from_params
from pipeline.rank import is_rank_zero
from pipeline.training.callbacks import RunSpec
from pipeline.training.fit import FitConfig, FitResult, fit, seed_all
from pipeline.training.module import ClassifierModule, OptimConfig

MODEL_DIR = Path("models/scratch")


def training_splits(data: PreparedData, transform):
    """The splits and the online augmentation; with offline augmented copies (augment.offline_copies) the
    train split grows by them and the online pipeline is skipped."""
    splits = {s: (data.x[s], data.y[s]) for s in ("train", "val", "test")}
    offline = aug.load_offline_copies()
    if offline is None:
        return splits, transform
    splits["train"] = (np.concatenate([data.x["train"], offline[0]]), np.concatenate([data.y["train"], offline[1]]))
    print(f"train_scratch: training on {len(splits['train'][1])} images (offline augmented copies)", flush=True)
    return splits, None


def run(p: params_mod.Params, extra_callbacks: list | None = None) -> dict:
    """Train the CNN from params.model with params.train; write models/scratch/, metrics and curves.

    `extra_callbacks` (Lightning callbacks) let benchmarks watch the same training the stage runs.
    """
    data = PreparedData.load()
    transform = aug.load(aug.PIPELINE_PATH, seed=p.seed)
    tracking.check_store()
    seed_all(p.seed)
    m, t = p.model, p.train
    spec = spec_from_params(m)
    net = CNN(spec, data.channels, data.image_size, data.num_classes)  # impossible stacks fail here
    model = Classifier(net, data.mean, data.std, data.channels)
    splits, transform = training_splits(data, transform)
    datamodule = ImageDataModule(splits, t.batch_size, p.trainer.num_workers, p.seed, transform,
                                 batched=p.trainer.batched_augment)
    logged = params_mod.flatten({"seed": p.seed, "data": p.data, "augment": p.augment, "model": m, "train": t,
                                 "trainer": p.trainer})
    logged |= {"model.resolved": str(spec.to_dict())[:5000], "data.num_classes": data.num_classes}
    run_spec = RunSpec(p.mlflow.experiment, f"train_scratch/{spec.name}",
                       tracking.run_tags("train_scratch", spec.name, data.data_hash), logged,
                       (data.channels, data.image_size, data.image_size), artifacts=aug.artifacts(),
                       datasets=tracking.dataset_inputs(data), register_as=p.mlflow.scratch_model)
    # Same params and data: a killed training resumes from its last epoch (see FitConfig.resume_key).
    key = tracking.params_hash(logged, data.data_hash)
    config = FitConfig.from_params(t, p.trainer, keep_checkpoint=True, callbacks=tuple(extra_callbacks or ()),
                                   resume_key=f"train_scratch-{key}")
    result = fit(ClassifierModule(model, data.num_classes, OptimConfig.from_params(t)), datamodule, config,
                 run_spec)
    if not is_rank_zero():
        return {}
    return write_outputs(model, spec, data, result, p.mlflow.scratch_model)


def write_outputs(model: Classifier, spec, data: PreparedData, result: FitResult, registered: str) -> dict:
    """The model folder, curves and metrics, published as one set."""
    arch = checkpoint.cnn_arch(spec, data.channels, data.image_size, data.num_classes)
    meta = {"stage": "train_scratch", "name": spec.name, "class_names": data.class_names,
            "class_ids": list(range(data.num_classes)), "image_size": data.image_size,
            "mlflow_run_id": result.run_id, "model_uri": result.model_uri,
            "registered_model": registered if result.model_version else None, "model_version": result.model_version}
    final = result.rows[-1] if result.rows else {}
    metrics = {
        "model": spec.name, "best_val_acc": round(result.best_val_acc, 6),
        "best_val_loss": round(result.best_val_loss, 6), "final_train_acc": final.get("train_acc"),
        "final_train_loss": final.get("train_loss"), "epochs_run": result.epochs_run,
        "train_time_s": round(result.train_time_s, 2), "params_total": result.counts.get("total"),
        "params_trainable": result.counts.get("trainable"), "world_size": result.world_size,
        "mlflow_run_id": result.run_id,
    }
    with atomic_set() as stage:
        models = stage(MODEL_DIR, folder=True)
        checkpoint.save(models / "model.pt", model, arch, meta)
        if result.best_checkpoint is not None:
            shutil.copy2(result.best_checkpoint, models / "best.ckpt")
        write_csv(stage("plots/train_scratch.csv"), result.rows)
        plots.learning_curves(result.rows, stage("plots/train_scratch/learning_curves.png"),
                              f"train_scratch/{spec.name}: learning curves")
        write_json(stage("metrics/train_scratch.json"), metrics)
    if result.best_checkpoint is not None:
        shutil.rmtree(result.best_checkpoint.parent, ignore_errors=True)
    print(f"train_scratch: best val_acc {result.best_val_acc:.4f} after {result.epochs_run} epochs "
          f"({result.train_time_s:.1f}s); MLflow run {result.run_id}", flush=True)
    return metrics


@stage_main
def main() -> None:
    p = params_mod.load()
    check_outputs_writable("train_scratch")
    run(p)


if __name__ == "__main__":
    main()
