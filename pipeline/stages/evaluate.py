"""evaluate: every trained model on the untouched test split, with speed on the current device.

Reads params: evaluate, trainer.accelerator. Reads models/scratch/model.pt and models/transfer/*.pt.
Writes metrics/evaluate.json, reports/evaluate/<model>/ (per-class CSV, confusion matrices, worst images),
plots/evaluate/predictions/<model>.csv (a DVC confusion plot); logs test_* metrics and figures to each
model's own MLflow run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import params as params_mod
from pipeline import plots, tracking
from pipeline.atomic import write_csv, write_json
from pipeline.data.fewshot import remap_labels
from pipeline.data.prepared import PreparedData
from pipeline.errors import PipelineError, stage_main
from pipeline.evaluation import (
    classification_report,
    device_for,
    latency_ms,
    peak_memory_mb,
    predict_proba,
    throughput,
)
from pipeline.models import checkpoint

REPORT_DIR = Path("reports/evaluate")
PREDICTIONS_DIR = Path("plots/evaluate/predictions")


def model_files() -> list[Path]:
    files = [Path("models/scratch/model.pt"), *sorted(Path("models/transfer").glob("*.pt"))]
    found = [f for f in files if f.exists()]
    if not found:
        raise PipelineError("evaluate: no trained models in models/ (run `dvc repro train_scratch` first)")
    return found


def evaluate_model(path: Path, data: PreparedData, e, accelerator: str) -> tuple[str, dict]:
    model, meta = checkpoint.load(path)
    name = meta["name"] if meta["stage"] == "train_scratch" else f"transfer_{meta['strategy']}"
    class_ids, class_names, size = meta["class_ids"], meta["class_names"], meta["image_size"]
    mask = np.isin(data.y["test"], class_ids)
    x_test, y_test = data.x["test"][mask], remap_labels(data.y["test"][mask], class_ids)
    device = device_for(accelerator)
    probs = predict_proba(model, x_test, size, e.batch_size, device)
    report = classification_report(y_test, probs, class_names, e.top_k, e.ece_bins)
    shape = (data.channels, size, size)
    speed = latency_ms(model, shape, e.latency_runs, e.warmup_runs, device)
    speed["throughput_images_per_s"] = throughput(model, shape, e.batch_size, device)
    speed["peak_memory_mb"] = peak_memory_mb(model, shape, e.batch_size, device)
    speed["model_file_mb"] = path.stat().st_size / 2**20

    out = REPORT_DIR / name
    cm = report.pop("confusion")
    per_class = report.pop("per_class")
    write_csv(out / "per_class.csv", per_class)
    figures = [
        plots.confusion_matrix(cm, class_names, out / "confusion.png", f"{name}: confusion (counts)"),
        plots.confusion_matrix(cm, class_names, out / "confusion_normalized.png", f"{name}: confusion (recall)",
                               normalize=True),
    ]
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != y_test)
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]])][: e.worst_images]
    if len(wrong):
        figures.append(plots.image_grid(
            [x_test[i] for i in wrong],
            [f"{class_names[y_test[i]]}->{class_names[pred[i]]} {probs[i, pred[i]]:.2f}" for i in wrong],
            out / "most_confident_errors.png", cols=8, suptitle=f"{name}: most confidently wrong (true->pred)"))
    write_csv(PREDICTIONS_DIR / f"{name}.csv",
              [{"actual": class_names[t], "predicted": class_names[p]} for t, p in zip(y_test, pred, strict=True)])

    result = {k: round(v, 6) if isinstance(v, float) else v for k, v in (report | speed).items()}
    result |= {"device": device.type, "test_images": int(len(y_test)), "mlflow_run_id": meta.get("mlflow_run_id")}
    run_id = meta.get("mlflow_run_id")
    if run_id:
        try:
            tracking.log_metrics(run_id, {f"test_{k}": v for k, v in result.items()
                                          if isinstance(v, int | float) and not isinstance(v, bool)})
            for fig in figures:
                tracking.log_artifact(run_id, fig, "evaluate")
            tracking.log_artifact(run_id, out / "per_class.csv", "evaluate")
        except Exception as exc:  # a run deleted from the store must not lose the evaluation itself
            print(f"evaluate: could not log to MLflow run {run_id} ({type(exc).__name__})", flush=True)
    print(f"evaluate: {name}: test acc {result['accuracy']:.4f}, f1_macro {result['f1_macro']:.4f}, "
          f"ece {result['ece']:.4f}, latency p50 {result['latency_ms_p50']:.2f} ms ({device.type})", flush=True)
    return name, result


def run(p: params_mod.Params) -> dict:
    """Every model file on the test split; writes metrics/evaluate.json and the reports."""
    data = PreparedData.load()
    tracking.check_store()
    results = dict(evaluate_model(path, data, p.evaluate, p.trainer.accelerator) for path in model_files())
    write_json("metrics/evaluate.json", results)
    return results


@stage_main
def main() -> None:
    run(params_mod.load())


if __name__ == "__main__":
    main()
