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
from pipeline.atomic import write_csv, write_json, write_text
from pipeline.data import augment as aug
from pipeline.data.datamodule import ImageDataModule
from pipeline.data.prepared import PreparedData
from pipeline.errors import stage_main
from pipeline.evaluation import device_for, latency_ms, macs_per_image, predict_proba
from pipeline.models import registry
from pipeline.models.classifier import Classifier
from pipeline.stages.common import fit, is_rank_zero, seed_all
from pipeline.training.module import ClassifierModule, OptimConfig


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


def markdown(static: list[dict], trained: list[dict]) -> str:
    lines = ["# Architectures side by side", "",
             "## Static: the seed's table, counted from the real models", "",
             "\"Seed says\" quotes the seed's table; a dash where the seed gives no figure.", "",
             "| Architecture | Year | Input | Parameters | Seed says | Diff | MACs/image | Size (MB) | Key idea |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in static:
        diff = f"{r['rel_diff_vs_seed']:+.1%}" if r["rel_diff_vs_seed"] is not None else "—"
        idea = r["key_idea"] + (f" ({r['note']})" if r["note"] else "")
        lines.append(f"| {r['architecture']} | {r['year']} | {r['input']} | {r['params']:,} | "
                     f"{r['seed_says'] or '—'} | {diff} | {r['macs']:,} | {r['size_mb']} | {idea} |")
    if trained:
        lines += ["", "## Trained on the prepared data (same epochs, optimizer and augmentation)", "",
                  "Each architecture trains at compare.image_size or, where its downsampling needs more, at its "
                  "own smallest useful input (the Input column says which, and why).", "",
                  "| Architecture | Input | Parameters | MACs/image | Test acc | Train time (s) | Latency p50 (ms) | "
                  "Limited by |", "|---|---|---:|---:|---:|---:|---:|---|"]
        for r in trained:
            lines.append(f"| {r['architecture']} | {r['input']} | {r['params']:,} | {r['macs']:,} | "
                         f"{r['test_acc']:.4f} | {r['train_time_s']:.1f} | {r['latency_ms_p50']:.2f} | "
                         f"{r['limited_by']} |")
    return "\n".join(lines) + "\n"


@stage_main
def main() -> None:
    p = params_mod.load()
    c = p.compare
    for name in [*c.static, *c.trained]:
        registry.get(name, "compare")  # unknown names fail before any work
    data = PreparedData.load()
    transform = aug.load(aug.PIPELINE_PATH, seed=p.seed)
    tracking.check_store()
    experiment_id = tracking.ensure_experiment(p.mlflow.experiment)
    client = tracking.client()
    parent = client.create_run(experiment_id, run_name="compare",
                               tags=tracking.run_tags("compare", "all", data.data_hash))
    parent_id = parent.info.run_id
    tracking.log_params(parent_id, params_mod.flatten({"compare": c, "seed": p.seed}))

    static = []
    for name in c.static:
        row = static_row(name)
        static.append(row)
        print(f"compare: {row['architecture']}: {row['params']:,} params (seed: {row['seed_says'] or '-'}), "
              f"{row['macs']:,} MACs", flush=True)
        if name not in c.trained:
            run = client.create_run(experiment_id, run_name=f"compare/{name}",
                                    tags={"mlflow.parentRunId": parent_id, "stage": "compare", "model": name})
            tracking.log_params(run.info.run_id, {"architecture": name, "input": row["input"]})
            tracking.log_metrics(run.info.run_id, {"params_total": row["params"], "macs": row["macs"],
                                                   "size_mb": row["size_mb"]})
            client.set_terminated(run.info.run_id)

    trained = []
    device = device_for(p.trainer.accelerator)
    splits = {s: (data.x[s], data.y[s]) for s in ("train", "val", "test")}
    for name in c.trained:
        arch = registry.get(name)
        seed_all(p.seed)
        channels = arch.input_channels(data.channels)
        size = max(c.image_size, arch.min_size)
        limited = (f"needs >= {arch.min_size}px (its downsampling), trained at {size}px" if size > c.image_size
                   else f"{c.epochs} epochs from scratch at {size}px")
        net = arch.build(data.num_classes, size, channels)
        model = Classifier(net, data.mean, data.std, channels)
        datamodule = ImageDataModule(splits, c.batch_size, p.trainer.num_workers, p.seed, transform, size)
        result = fit(
            ClassifierModule(model, data.num_classes, OptimConfig(lr=c.lr, scheduler="cosine")), datamodule,
            trainer_params=p.trainer, epochs=c.epochs, experiment=p.mlflow.experiment,
            run_name=f"compare/{name}", tags=tracking.run_tags("compare", name, data.data_hash),
            log_params={"architecture": name, "image_size": size, "epochs": c.epochs, "lr": c.lr,
                        "batch_size": c.batch_size}, input_shape=(channels, size, size),
            checkpoint_name=f"compare_{name}", label=f"{name} ", log_model=False, parent_run_id=parent_id,
            artifacts=aug.artifacts(),
        )
        if not is_rank_zero():
            continue
        probs = predict_proba(model, data.x["test"], size, device=device)
        test_acc = float((probs.argmax(1) == data.y["test"]).mean())
        speed = latency_ms(model, (data.channels, size, size), c.latency_runs, 3, device)
        row = {"architecture": registry.get(name).display, "name": name, "input": f"{size}x{size}x{data.channels}",
               "params": result.counts["total"], "macs": macs_per_image(model.cpu(), (data.channels, size, size)),
               "test_acc": round(test_acc, 6), "best_val_acc": round(result.best_val_acc, 6),
               "train_time_s": round(result.train_time_s, 2), "latency_ms_p50": round(speed["latency_ms_p50"], 4),
               "limited_by": limited}
        trained.append(row)
        tracking.log_metrics(result.run_id, {"test_acc": test_acc, "macs": row["macs"],
                                             "latency_ms_p50": row["latency_ms_p50"]})
        print(f"compare: {name}: test acc {test_acc:.4f} in {result.train_time_s:.1f}s", flush=True)
    if not is_rank_zero():
        return

    report = Path("reports")
    write_text(report / "compare.md", markdown(static, trained))
    write_csv(report / "compare.csv", [{"section": "static"} | r for r in static]
              + [{"section": "trained"} | r for r in trained])
    chart = Path("plots/compare/accuracy_vs_params.png")
    if trained:
        plots.bubble_chart(trained, chart)
        write_csv("plots/compare/trained.csv", trained)
        tracking.log_artifact(parent_id, chart, "compare")
    tracking.log_artifact(parent_id, report / "compare.md", "compare")
    tracking.log_artifact(parent_id, report / "compare.csv", "compare")
    write_json("metrics/compare.json", {
        "static": {r["name"]: {"params": r["params"], "macs": r["macs"]} for r in static},
        "trained": {r["name"]: {k: r[k] for k in ("test_acc", "params", "train_time_s", "latency_ms_p50")}
                    for r in trained},
        "mlflow_parent_run_id": parent_id,
    })
    client.set_terminated(parent_id)


if __name__ == "__main__":
    main()
