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
from pipeline.atomic import atomic_set, write_csv, write_json
from pipeline.champion import crown
from pipeline.data.fewshot import remap_labels
from pipeline.data.prepared import PreparedData
from pipeline.deps import check_outputs_writable
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


FOLDER_STAGE = {"scratch": "train_scratch", "transfer": "transfer_learn"}


def load_models() -> list[tuple[Path, object, dict]]:
    """Every model file, loaded and checked before anything is written: a file must hold its folder's kind."""
    files = [Path("models/scratch/model.pt"), *sorted(Path("models/transfer").glob("*.pt"))]
    found = [f for f in files if f.exists()]
    if not found:
        raise PipelineError("evaluate: no trained models in models/ (run `dvc repro train_scratch` first)")
    models = []
    for path in found:
        model, meta = checkpoint.load(path)
        expected = FOLDER_STAGE[path.parent.name]
        if meta.get("stage") != expected:
            raise PipelineError(f"evaluate: {path} holds a {meta.get('stage')} model ({meta.get('name')}), not "
                                f"one from {expected}; rerun `dvc repro -f {expected}`")
        models.append((path, model, meta))
    return models


def measure(path: Path, model, meta: dict, data: PreparedData, e, accelerator: str) -> dict:
    """Predictions, metrics and speed of one model on the test images of its classes (nothing written)."""
    class_ids, size = meta["class_ids"], meta["image_size"]
    mask = np.isin(data.y["test"], class_ids)
    x_test, y_test = data.x["test"][mask], remap_labels(data.y["test"][mask], class_ids)
    device = device_for(accelerator)
    probs = predict_proba(model, x_test, size, e.batch_size, device)
    report = classification_report(y_test, probs, meta["class_names"], e.top_k, e.ece_bins)
    shape = (data.channels, size, size)
    speed = latency_ms(model, shape, e.latency_runs, e.warmup_runs, device)
    speed["throughput_images_per_s"] = throughput(model, shape, e.batch_size, device)
    speed["peak_memory_mb"] = peak_memory_mb(model, shape, e.batch_size, device)
    speed["model_file_mb"] = path.stat().st_size / 2**20
    result = {k: round(v, 6) if isinstance(v, float) else v for k, v in (report | speed).items()
              if k not in ("confusion", "per_class")}
    result |= {"device": device.type, "test_images": int(len(y_test)), "mlflow_run_id": meta.get("mlflow_run_id")}
    return {"result": result, "report": report, "probs": probs, "x": x_test, "y": y_test, "meta": meta}


def write_reports(name: str, m: dict, worst: int, stage) -> list[Path]:
    """The model's per-class CSV, confusion matrices, worst images and predictions CSV (a DVC plot), staged
    in an atomic set; returns the staged report files."""
    out, names, probs, y = stage(REPORT_DIR / name, folder=True), m["meta"]["class_names"], m["probs"], m["y"]
    cm = m["report"]["confusion"]
    write_csv(out / "per_class.csv", m["report"]["per_class"])
    files = [
        plots.confusion_matrix(cm, names, out / "confusion.png", f"{name}: confusion (counts)"),
        plots.confusion_matrix(cm, names, out / "confusion_normalized.png", f"{name}: confusion (recall)",
                               normalize=True),
    ]
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != y)
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]])][:worst]
    if len(wrong):
        files.append(plots.image_grid(
            [m["x"][i] for i in wrong], [f"{names[y[i]]}->{names[pred[i]]} {probs[i, pred[i]]:.2f}" for i in wrong],
            out / "most_confident_errors.png", cols=8, suptitle=f"{name}: most confidently wrong (true->pred)"))
    write_csv(stage(PREDICTIONS_DIR / f"{name}.csv"),
              [{"actual": names[t], "predicted": names[p]} for t, p in zip(y, pred, strict=True)])
    return [*files, out / "per_class.csv"]


def model_name(meta: dict) -> str:
    return meta["name"] if meta["stage"] == "train_scratch" else f"transfer_{meta['strategy']}"


def run(p: params_mod.Params) -> dict:
    """Every model file on the test split: all measured first, then all reports written, then all logged to
    each model's MLflow run (a run that cannot be written to stops the stage with one line)."""
    data = PreparedData.load()
    tracking.check_store()
    measured = {model_name(meta): measure(path, model, meta, data, p.evaluate, p.trainer.accelerator)
                for path, model, meta in load_models()}
    results = {name: m["result"] for name, m in measured.items()}
    with atomic_set() as stage:  # every model's reports and the metrics, or none of them
        staged = {name: write_reports(name, m, p.evaluate.worst_images, stage) for name, m in measured.items()}
        write_json(stage("metrics/evaluate.json"), results)
    files = {name: [REPORT_DIR / name / f.name for f in fs] for name, fs in staged.items()}
    for name, result in results.items():
        print(f"evaluate: {name}: test acc {result['accuracy']:.4f}, f1_macro {result['f1_macro']:.4f}, "
              f"ece {result['ece']:.4f}, latency p50 {result['latency_ms_p50']:.2f} ms ({result['device']})",
              flush=True)
        if result["mlflow_run_id"]:
            log_to_run(run_for(p, name, result["mlflow_run_id"], data.data_hash), result, files[name])
        m = measured[name]
        if m["meta"].get("model_version") and not tracking.version_exists(m["meta"]["registered_model"],
                                                                           str(m["meta"]["model_version"])):
            print(f"evaluate: {m['meta']['registered_model']} v{m['meta']['model_version']} is not registered in "
                  "this tracking store; the champion is left as it is", flush=True)
        elif m["meta"].get("model_version"):
            line = crown(m["meta"]["registered_model"], str(m["meta"]["model_version"]), m["result"]["accuracy"],
                         (m["x"], m["y"], m["meta"]["image_size"]), data.data_hash, device_for(p.trainer.accelerator))
            print(f"evaluate: {line}", flush=True)
    return results


def run_for(p: params_mod.Params, name: str, training_run: str, data_hash: str) -> str:
    """The model's training run, where its test results belong; when this store does not hold it (a clone
    that pulled models/ from a DVC remote, or a new MLflow store), a new run of its own, tagged with the
    training run's id."""
    if tracking.run_exists(training_run):
        return training_run
    tags = tracking.run_tags("evaluate", name, data_hash) | {"evaluated_run_id": training_run}
    run_id = tracking.start_run(p.mlflow.experiment, f"evaluate/{name}", tags)
    tracking.client().set_terminated(run_id, "FINISHED")
    print(f"evaluate: {name}: its training run {training_run} is not in this tracking store (models pulled from "
          f"a DVC remote?); its results go to the new run {run_id}", flush=True)
    return run_id


def log_to_run(run_id: str, result: dict, files: list[Path]) -> None:
    try:
        tracking.log_metrics(run_id, {f"test_{k}": v for k, v in result.items()
                                      if isinstance(v, int | float) and not isinstance(v, bool)})
        for path in files:
            tracking.log_artifact(run_id, path, "evaluate")
    except Exception as exc:
        raise PipelineError(f"evaluate: the results are written, but MLflow run {run_id} could not take them "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None


@stage_main
def main() -> None:
    p = params_mod.load()
    check_outputs_writable("evaluate")
    run(p)


if __name__ == "__main__":
    main()
