"""train_scratch: the configurable CNN (default: the seed's MNIST CNN) trained from scratch with Lightning.

Reads params: seed, model, train, trainer, mlflow (and the augmentation pipeline the `augment` stage saved).
Writes models/scratch/ (model.pt, best.ckpt), metrics/train_scratch.json (with the MLflow run id),
plots/train_scratch.csv and the learning-curve PNG; then publishes all of it, and the model, to its MLflow run.
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
from pipeline.errors import stage_main
from pipeline.fundamentals.summary import param_counts
from pipeline.models import checkpoint
from pipeline.models.cnn import CNN, Classifier, spec_from_params
from pipeline.outputs import check_writable
from pipeline.predict import to_float
from pipeline.rank import is_rank_zero
from pipeline.training.fit import FitConfig, FitResult, fit, seed_all
from pipeline.training.module import ClassifierModule

MODEL_DIR = Path("models/scratch")
CURVES, CURVES_PNG, METRICS = (Path("plots/train_scratch.csv"), Path("plots/train_scratch/learning_curves.png"),
                               Path("metrics/train_scratch.json"))


def training_splits(data: PreparedData, augmentation):
    """The splits and the online augmentation; with offline augmented copies (augment.offline_copies) the
    train split grows by them and the online pipeline is skipped."""
    splits = {s: (data.x[s], data.y[s]) for s in ("train", "val", "test")}
    offline = aug.load_offline_copies()
    if offline is None:
        return splits, augmentation
    splits["train"] = (np.concatenate([data.x["train"], offline[0]]), np.concatenate([data.y["train"], offline[1]]))
    print(f"train_scratch: training on {len(splits['train'][1])} images (offline augmented copies)", flush=True)
    return splits, None


def run(p: params_mod.Params, extra_callbacks: list | None = None) -> dict:
    """Train the CNN from params.model with params.train; write models/scratch/, metrics and curves, then
    publish them to the training's MLflow run. `extra_callbacks` let benchmarks watch the same training."""
    data = PreparedData.load()
    augmentation = aug.load(aug.PIPELINE_PATH, seed=p.seed)
    tracking.check_store()
    seed_all(p.seed)
    spec = spec_from_params(p.model)
    model = Classifier(CNN(spec, data.channels, data.image_size, data.num_classes), data.mean, data.std,
                       data.channels)  # an impossible layer stack fails here, in one line
    splits, augmentation = training_splits(data, augmentation)
    datamodule = ImageDataModule(splits, p.train.batch_size, p.seed, augmentation,
                                 batched=p.trainer.batched_augment, num_workers=p.trainer.num_workers)
    logged = params_mod.flatten({"seed": p.seed, "data": p.data, "augment": p.augment, "model": p.model,
                                 "train": p.train, "trainer": p.trainer})
    logged |= {"model.resolved": str(spec.to_dict())[:5000], "data.num_classes": data.num_classes}
    run = tracking.RunInfo(p.mlflow.experiment, f"train_scratch/{spec.name}",
                           tracking.run_tags("train_scratch", spec.name, data.data_hash), logged)
    # Same params and data: a killed training resumes from its last epoch.
    key = f"train_scratch-{tracking.params_hash(logged, data.data_hash)}"
    config = FitConfig.from_train(p.train, p.trainer, resume_key=key, callbacks=tuple(extra_callbacks or ()))
    result = fit(ClassifierModule(model, p.train), datamodule, config, run, keep_checkpoint=True)
    if not is_rank_zero():
        return {}
    metrics = write_outputs(model, spec, data, result, p.mlflow.scratch_model)
    tracking.publish_training(result.run_id, tracking.Publication(
        model=model, input_shape=(data.channels, data.image_size, data.image_size),
        summary={"best_val_acc": result.best_val_acc, "best_val_loss": result.best_val_loss,
                 "epochs_run": result.epochs_run, "train_time_s": result.train_time_s},
        files=[(CURVES, "curves"), (CURVES_PNG, "curves"), (MODEL_DIR / "best.ckpt", "checkpoints"),
               *aug.artifacts()],
        datasets=tracking.dataset_inputs(data), example=to_float(data.x["val"][:4]),
        register_as=p.mlflow.scratch_model,
        version_tags=tracking.version_tags(run.tags, tracking.params_hash(logged))))
    result.discard_checkpoints()
    print(f"train_scratch: best val_acc {result.best_val_acc:.4f} after {result.epochs_run} epochs "
          f"({result.train_time_s:.1f}s); MLflow run {result.run_id}", flush=True)
    return metrics


def write_outputs(model: Classifier, spec, data: PreparedData, result: FitResult, registered: str) -> dict:
    """The model folder, curves and metrics, published as one set."""
    arch = checkpoint.cnn_arch(spec, data.channels, data.image_size, data.num_classes)
    meta = checkpoint.ModelMeta(stage="train_scratch", name=spec.name, task="digits", class_names=data.class_names,
                                class_ids=list(range(data.num_classes)), image_size=data.image_size,
                                mlflow_run_id=result.run_id, registered_model=registered)
    final = result.rows[-1] if result.rows else {}
    counts = param_counts(model.net)
    metrics = {
        "model": spec.name, "best_val_acc": round(result.best_val_acc, 6),
        "best_val_loss": round(result.best_val_loss, 6), "best_epoch": result.best.get("epoch"),
        "final_train_acc": final.get("train_acc"), "final_train_loss": final.get("train_loss"),
        "epochs_run": result.epochs_run, "train_time_s": round(result.train_time_s, 2),
        "params_total": counts["total"], "params_trainable": counts["trainable"],
        "world_size": result.world_size, "mlflow_run_id": result.run_id,
    }
    with atomic_set() as stage:
        models = stage(MODEL_DIR, folder=True)
        checkpoint.save(models / "model.pt", model, arch, meta)
        if result.best_checkpoint is not None:
            shutil.copy2(result.best_checkpoint, models / "best.ckpt")
        write_csv(stage(CURVES), result.rows)
        plots.learning_curves(result.rows, stage(CURVES_PNG), f"train_scratch/{spec.name}: learning curves")
        write_json(stage(METRICS), metrics)
    return metrics


@stage_main
def main() -> None:
    p = params_mod.load()
    check_writable("train_scratch")
    run(p)


if __name__ == "__main__":
    main()
