"""compare: the seed's architecture table made real, counted and trained side by side.

1. Static: every architecture in params.compare.static built from the real torchvision/pipeline code at its
   canonical input: exact parameters beside the seed's rounded figure, MACs per image, size, year, key idea.
2. Trained: params.compare.trained on the prepared data with the same budget and augmentation:
   test accuracy, train time, latency, parameters.
One MLflow parent run `compare` with a nested run per architecture. Writes reports/compare.md,
reports/compare.csv, plots/compare/accuracy_vs_params.png and metrics/compare.json.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import params as params_mod
from pipeline import plots, tracking
from pipeline.atomic import atomic_set, write_csv, write_json, write_text
from pipeline.data import augment as aug
from pipeline.data.datamodule import ImageDataModule
from pipeline.data.prepared import PreparedData
from pipeline.errors import stage_main
from pipeline.evaluation import latency_ms, macs_per_image
from pipeline.fundamentals.summary import param_counts
from pipeline.models import registry
from pipeline.models.cnn import Classifier
from pipeline.outputs import check_writable
from pipeline.predict import accuracy, device_for, predict_proba
from pipeline.rank import is_rank_zero
from pipeline.report import compare_markdown
from pipeline.training.fit import FitConfig, fit, seed_all
from pipeline.training.module import ClassifierModule


def static_row(name: str) -> dict:
    arch = registry.get(name, "compare.static")
    model = arch.build_canonical()
    params = sum(p.numel() for p in model.parameters())
    seed = registry.parse_seed_figure(arch.seed_says)
    shape = (arch.channels, arch.canonical_size, arch.canonical_size)
    return {
        "architecture": arch.display, "name": name, "year": arch.year,
        "input": f"{arch.canonical_size}x{arch.canonical_size}x{arch.channels}",
        "params": params, "seed_says": arch.seed_says or "",
        "rel_diff_vs_seed": round((params - seed) / seed, 4) if seed else None,
        "macs": macs_per_image(model, shape), "size_mb": round(params * 4 / 2**20, 2), "key_idea": arch.key_idea,
        "note": arch.note,
    }


def counted(names: list[str], parent_id: str, p) -> list[dict]:
    """The static table; architectures that are only counted get a nested run with their counts."""
    rows = []
    for name in names:
        row = static_row(name)
        rows.append(row)
        print(f"compare: {row['architecture']}: {row['params']:,} params (seed: {row['seed_says'] or '-'}), "
              f"{row['macs']:,} MACs", flush=True)
        if name not in p.compare.trained:
            run_id = tracking.start_run(p.mlflow.experiment, f"compare/{name}", {"stage": "compare", "model": name},
                                        parent_id=parent_id)
            with tracking.ended(run_id):
                tracking.log_params(run_id, {"architecture": name, "input": row["input"]})
                tracking.log_metrics(run_id, {"params_total": row["params"], "macs": row["macs"],
                                              "size_mb": row["size_mb"]})
    return rows


def train_one(name: str, data: PreparedData, augmentation, parent_id: str, p) -> dict:
    """One architecture trained on the prepared data at an input size it can use (params.compare is its recipe);
    its test accuracy and speed. Its run gets its results after the stage's outputs are written."""
    c = p.compare
    arch = registry.get(name)
    seed_all(p.seed)
    channels = arch.input_channels(data.channels)
    size = max(c.image_size, arch.min_size)
    limited = (f"needs >= {arch.min_size}px (its downsampling), trained at {size}px" if size > c.image_size
               else f"{c.epochs} epochs from scratch at {size}px")
    model = Classifier(arch.build(data.num_classes, size, channels), data.mean, data.std, channels)
    splits = {s: (data.x[s], data.y[s]) for s in ("train", "val", "test")}
    datamodule = ImageDataModule(splits, c.batch_size, p.seed, augmentation, size, p.trainer.batched_augment,
                                 p.trainer.num_workers)
    logged = params_mod.flatten({"seed": p.seed, "compare": c, "trainer": p.trainer}) | {"architecture": name,
                                                                                        "trained_at": size}
    run = tracking.RunInfo(p.mlflow.experiment, f"compare/{name}", tracking.run_tags("compare", name, data.data_hash),
                           logged, parent_id=parent_id)
    result = fit(ClassifierModule(model, c), datamodule,
                 FitConfig(p.trainer, c.epochs, monitor=c.monitor, gradient_clip_val=c.gradient_clip_val,
                           label=f"{name} "), run)
    if not is_rank_zero():
        return {}
    device = device_for(p.trainer.accelerator)
    test_acc = accuracy(predict_proba(model, data.x["test"], size, device=device), data.y["test"])
    speed = latency_ms(model, (data.channels, size, size), c.latency_runs, 3, device)
    row = {"architecture": arch.display, "name": name, "input": f"{size}x{size}x{data.channels}",
           "params": param_counts(model.net)["total"], "macs": macs_per_image(model.cpu(), (data.channels, size, size)),
           "test_acc": round(test_acc, 6), "best_val_acc": round(result.best_val_acc, 6),
           "train_time_s": round(result.train_time_s, 2), "latency_ms_p50": round(speed["latency_ms_p50"], 4),
           "limited_by": limited, "mlflow_run_id": result.run_id}
    print(f"compare: {name}: test acc {test_acc:.4f} in {result.train_time_s:.1f}s", flush=True)
    return row | {"_model": model, "_input": (channels, size, size), "_epochs": result.epochs_run}


def write_outputs(static: list[dict], trained: list[dict], parent_id: str) -> dict:
    """The report, the chart and the metrics as one set; then logged to the parent run."""
    report, chart = Path("reports"), Path("plots/compare/accuracy_vs_params.png")
    metrics = {
        "static": {r["name"]: {"params": r["params"], "macs": r["macs"]} for r in static},
        "trained": {r["name"]: {k: r[k] for k in ("test_acc", "params", "train_time_s", "latency_ms_p50")}
                    for r in trained},
        "mlflow_parent_run_id": parent_id,
    }
    with atomic_set() as stage:
        write_text(stage(report / "compare.md"), compare_markdown(static, trained))
        write_csv(stage(report / "compare.csv"), [{"section": "static"} | r for r in static]
                  + [{"section": "trained"} | r for r in trained])
        if trained:
            folder = stage(chart.parent, folder=True)
            plots.bubble_chart(trained, folder / chart.name)
            write_csv(folder / "trained.csv", trained)
        write_json(stage("metrics/compare.json"), metrics)
    for path in ([chart] if trained else []) + [report / "compare.md", report / "compare.csv"]:
        tracking.log_artifact(parent_id, path, "compare")
    return metrics


def run(p: params_mod.Params) -> dict:
    """Count params.compare.static, train params.compare.trained; one parent run with a nested run each."""
    for name in [*p.compare.static, *p.compare.trained]:
        registry.get(name, "compare")  # unknown names fail before any work
    data = PreparedData.load()
    augmentation = aug.load(aug.PIPELINE_PATH, seed=p.seed)
    tracking.check_store()
    parent_id = tracking.start_run(p.mlflow.experiment, "compare", tracking.run_tags("compare", "all", data.data_hash))
    with tracking.ended(parent_id):
        tracking.log_params(parent_id, params_mod.flatten({"compare": p.compare, "seed": p.seed, "trainer": p.trainer}))
        static = counted(p.compare.static, parent_id, p)
        trained = [train_one(name, data, augmentation, parent_id, p) for name in p.compare.trained]
        if not is_rank_zero():
            return {}
        rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in trained]
        metrics = write_outputs(static, rows, parent_id)
        for r in trained:  # each trained architecture's run: its counts, results and the shared augmentation
            tracking.publish_training(r["mlflow_run_id"], tracking.Publication(
                model=r["_model"], input_shape=r["_input"], quiet=True, files=aug.artifacts(),
                datasets=tracking.dataset_inputs(data),
                summary={"test_acc": r["test_acc"], "best_val_acc": r["best_val_acc"], "macs": r["macs"],
                         "latency_ms_p50": r["latency_ms_p50"], "train_time_s": r["train_time_s"],
                         "epochs_run": r["_epochs"]}))
        return metrics


@stage_main
def main() -> None:
    p = params_mod.load()
    check_writable("compare")
    run(p)


if __name__ == "__main__":
    main()
