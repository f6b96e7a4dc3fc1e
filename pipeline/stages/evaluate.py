"""evaluate: every trained model on the untouched test split of its own task, with speed on the current device.

Reads params: evaluate, trainer.accelerator. Reads models/scratch/model.pt, models/transfer/*.pt and
models/transfer_photos/*.pt (each model file names its task: digits or photos). Writes metrics/evaluate.json,
reports/evaluate/<model>/ (per-class CSV, confusion matrices, worst images), plots/evaluate/predictions/<model>.csv
(a DVC confusion plot); logs test_* metrics and figures to each model's own MLflow run and moves the registered
model's `champion` alias when a version earns it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import params as params_mod
from pipeline import plots, tasks, tracking
from pipeline.atomic import atomic_set, write_csv, write_json, write_text
from pipeline.champion import crown
from pipeline.data.prepared import PreparedData, remap_labels
from pipeline.deploy import export_onnx, onnx_latency_ms, onnx_logits, onnx_session, quantize_int8, state_mb
from pipeline.errors import PipelineError, stage_main
from pipeline.evaluation import classification_report, latency_ms, peak_memory_mb, throughput
from pipeline.fundamentals.summary import param_counts
from pipeline.models import checkpoint, loading
from pipeline.models.cnn import Classifier
from pipeline.outputs import check_writable
from pipeline.predict import accuracy, device_for, predict_logits, predict_proba, softmax

REPORT_DIR = Path("reports/evaluate")
ONNX_DIR = Path("models/onnx")
PREDICTIONS_DIR = Path("plots/evaluate/predictions")
# Where each stage's model files are, and the task of the models in a folder.
MODEL_FOLDERS = {Path("models/scratch"): ("train_scratch", "digits"),
                 **{t.models: ("transfer_learn", t.name) for t in tasks.TASKS.values()}}


@dataclass
class Measured:
    """One model on the test images of its task and classes: its results, report and predictions."""

    path: Path
    model: Classifier
    meta: checkpoint.ModelMeta
    result: dict  # the metrics of evaluate.json
    report: dict  # classification_report: per class, confusion
    logits: np.ndarray  # what the PyTorch model output on x (the ONNX check compares against these)
    x: np.ndarray  # the test images it was measured on
    y: np.ndarray


def load_models() -> list[tuple[Path, Classifier, checkpoint.ModelMeta]]:
    """Every model file, loaded and checked before anything is written: a file must hold its folder's kind."""
    found = [f for folder in MODEL_FOLDERS for f in sorted(folder.glob("*.pt"))]
    if not found:
        raise PipelineError("evaluate: no trained models in models/ (run `dvc repro train_scratch` first)")
    models = []
    for path in found:
        model, meta, _ = loading.load(path)
        stage, task = MODEL_FOLDERS[path.parent]
        if (meta.stage, meta.task) != (stage, task):
            raise PipelineError(f"evaluate: {path} holds a {meta.stage} model of the {meta.task} task ({meta.name}), "
                                f"not one from {stage} on {task}; rerun `dvc repro -f` of the stage that writes it")
        models.append((path, model, meta))
    return models


def measure(path: Path, model: Classifier, meta: checkpoint.ModelMeta, data: PreparedData, e,
            device: torch.device) -> Measured:
    """Predictions, metrics and speed of one model on the test images of its classes (nothing written)."""
    mask = np.isin(data.y["test"], meta.class_ids)
    x_test, y_test = data.x["test"][mask], remap_labels(data.y["test"][mask], meta.class_ids)
    logits = predict_logits(model, x_test, meta.image_size, e.batch_size, device)
    probs = softmax(logits)
    report = classification_report(y_test, probs, meta.class_names, e.top_k, e.ece_bins)
    shape = (data.channels, meta.image_size, meta.image_size)
    speed = latency_ms(model, shape, e.latency_runs, e.warmup_runs, device)
    speed["throughput_images_per_s"] = throughput(model, shape, e.batch_size, device)
    speed["peak_memory_mb"] = peak_memory_mb(model, shape, e.batch_size, device)
    speed["model_file_mb"] = path.stat().st_size / 2**20
    speed["params_total"] = param_counts(model.net)["total"]
    if meta.stage == "train_scratch":  # the seed CNN, lighter: int8 dense layers beside fp32
        speed |= int8_figures(model, x_test, y_test, probs, meta.image_size, shape, e)
    result = {k: round(v, 6) if isinstance(v, float) else v for k, v in (report | speed).items()
              if k not in ("confusion", "per_class")}
    result |= {"task": meta.task, "device": device.type, "test_images": int(len(y_test)),
               "mlflow_run_id": meta.mlflow_run_id}
    return Measured(path, model, meta, result, report, logits, x_test, y_test)


def int8_figures(model: Classifier, x: np.ndarray, y: np.ndarray, probs: np.ndarray, size: int, shape, e) -> dict:
    """The model with int8 dense layers on the same test images: accuracy, agreement with fp32, size, latency."""
    quantized = quantize_int8(model)
    q_probs = predict_proba(quantized, x, size, e.batch_size, torch.device("cpu"))
    latency = latency_ms(quantized, shape, e.latency_runs, e.warmup_runs, torch.device("cpu"))["latency_ms_p50"]
    return {"int8_accuracy": accuracy(q_probs, y), "int8_agreement": float((q_probs.argmax(1) == probs.argmax(1)).mean()),
            "fp32_weights_mb": state_mb(model), "int8_weights_mb": state_mb(quantized),
            "int8_latency_ms_p50": latency, "fp32_cpu_latency_ms_p50": latency_ms(
                model.cpu(), shape, e.latency_runs, e.warmup_runs, torch.device("cpu"))["latency_ms_p50"]}


def write_reports(name: str, m: Measured, worst: int, stage) -> tuple[Path, list[Path]]:
    """The model's per-class CSV, confusion matrices, worst images and predictions CSV (a DVC plot), staged
    in an atomic set; returns the staged report folder and its files."""
    out, names, probs, y = stage(REPORT_DIR / name, folder=True), m.meta.class_names, softmax(m.logits), m.y
    cm = m.report["confusion"]
    write_csv(out / "per_class.csv", m.report["per_class"])
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
            [m.x[i] for i in wrong], [f"{names[y[i]]}->{names[pred[i]]} {probs[i, pred[i]]:.2f}" for i in wrong],
            out / "most_confident_errors.png", cols=8, suptitle=f"{name}: most confidently wrong (true->pred)"))
    write_csv(stage(PREDICTIONS_DIR / f"{name}.csv"),
              [{"actual": names[t], "predicted": names[p]} for t, p in zip(y, pred, strict=True)])
    return out, [*files, out / "per_class.csv"]


def run(p: params_mod.Params) -> dict:
    """Every model file on its task's test split: all measured, the champions crowned, the champions exported
    to ONNX and the model cards written, then every local output published as one set (reports, cards, ONNX
    files and metrics/evaluate.json with its `onnx` figures: all of this run's, or none), then all logged to each
    model's MLflow run (a run that cannot be written to stops the stage with one line)."""
    data = {name: PreparedData.load(t.prepared) for name, t in tasks.TASKS.items()
            if any(t.models.glob("*.pt")) or name == "digits"}
    tracking.check_store()
    device = device_for(p.trainer.accelerator)
    measured = {meta.label: measure(path, model, meta, data[meta.task], p.evaluate, device)
                for path, model, meta in load_models()}
    results = {name: m.result for name, m in measured.items()}
    for name, m in measured.items():
        r = m.result
        print(f"evaluate: {name}: test acc {r['accuracy']:.4f}, f1_macro {r['f1_macro']:.4f}, "
              f"ece {r['ece']:.4f}, latency p50 {r['latency_ms_p50']:.2f} ms ({r['device']})"
              + (f"; int8: test acc {r['int8_accuracy']:.4f}, weights {r['int8_weights_mb']:.2f} MB (fp32 "
                 f"{r['fp32_weights_mb']:.2f}), {r['int8_latency_ms_p50']:.2f} ms" if "int8_accuracy" in r else ""),
              flush=True)
        champion(m, data[m.meta.task].data_hash, device, measured)
    with atomic_set() as stage:  # every model's reports, card, the ONNX files and the metrics, or none of them
        staged = {name: write_reports(name, m, p.evaluate.worst_images, stage) for name, m in measured.items()}
        cards = write_cards(measured, {name: folder for name, (folder, _) in staged.items()})
        exported = export_champions(measured, p.evaluate, stage(ONNX_DIR, folder=True))
        if exported:
            results["onnx"] = exported
        write_json(stage("metrics/evaluate.json"), results)
    for name, m in measured.items():  # published: now the runs get the files, from where they stay
        r = m.result
        if r["mlflow_run_id"]:
            files = [REPORT_DIR / name / f.name for f in staged[name][1]]
            log_to_run(run_for(p, name, r["mlflow_run_id"], data[m.meta.task].data_hash), r, files)
    for name, (run_id, registered, version, text) in cards.items():
        tracking.describe(run_id, registered, version, text)
        tracking.log_artifact(run_id, REPORT_DIR / name / "model_card.md", "evaluate")
    for name, f in exported.items():
        tracking.log_artifact(measured[name].meta.mlflow_run_id, ONNX_DIR / f"{f['registered_model']}.onnx", "onnx")
    return results


def export_champions(measured: dict[str, Measured], e, folder: Path) -> dict:
    """Each registered model's champion, when it is one of these models, as ONNX (`folder`/<name>.onnx, staged
    for models/onnx/), checked against PyTorch on its test split with onnxruntime and timed beside it (`run`
    logs it to its run beside the PyTorch model once published). A model that cannot be exported is one line;
    the stage goes on."""
    figures = {}
    for name, m in measured.items():
        registered, run_id = m.meta.registered_model, m.meta.mlflow_run_id
        version = tracking.version_of_run(registered, run_id) if registered and run_id else None
        if version is None or tracking.champion_version(registered) != version:
            continue
        path = folder / f"{registered}.onnx"
        shape = (m.x.shape[-1], m.meta.image_size, m.meta.image_size)
        try:
            export_onnx(m.model, shape, path)
            session = onnx_session(path)
            logits = onnx_logits(session, m.x, m.meta.image_size, e.batch_size)
        except Exception as exc:  # an exporter or runtime that cannot take this model: one line
            reason = str(exc) if isinstance(exc, PipelineError) else f"{type(exc).__name__}: {exc}"
            print(f"evaluate: {registered} v{version} ({name}) not exported to ONNX: {reason.splitlines()[0][:200]}",
                  flush=True)
            path.unlink(missing_ok=True)
            continue
        torch_logits = m.logits
        figures[name] = {
            "registered_model": registered, "version": version, "file_mb": round(path.stat().st_size / 2**20, 3),
            "accuracy_torch": accuracy(torch_logits, m.y), "accuracy_onnx": accuracy(logits, m.y),
            "max_abs_logit_diff": float(np.abs(logits - torch_logits).max()),
            "latency_ms_p50_onnxruntime": onnx_latency_ms(session, shape, e.latency_runs, e.warmup_runs),
            "latency_ms_p50_torch": latency_ms(m.model.cpu(), shape, e.latency_runs, e.warmup_runs,
                                               torch.device("cpu"))["latency_ms_p50"]}
    for name, f in figures.items():
        print(f"evaluate: {f['registered_model']} v{f['version']} ({name}) as ONNX: test acc {f['accuracy_onnx']:.4f} "
              f"(PyTorch {f['accuracy_torch']:.4f}), logits within {f['max_abs_logit_diff']:.1e}, latency "
              f"{f['latency_ms_p50_onnxruntime']:.2f} ms in onnxruntime vs {f['latency_ms_p50_torch']:.2f} ms", flush=True)
    return figures


def write_cards(measured: dict[str, Measured], folders: dict[str, Path]) -> dict[str, tuple]:
    """Each model's card, in its staged report folder (`folders`, published with the reports); returns, per
    model with a run in this store, what `run` gives MLflow once published: its version's description and its
    run's note."""
    import json

    from pipeline.model_card import card

    out = {}
    for name, m in measured.items():
        task = tasks.TASKS[m.meta.task]
        data = json.loads(task.data_metrics.read_text()) if task.data_metrics.exists() else {}
        spread = None
        if m.meta.stage == "transfer_learn" and task.transfer_metrics.exists():
            summary = json.loads(task.transfer_metrics.read_text())["summary"]
            spread = summary.get(str(m.meta.target_per_class), {}).get(m.meta.strategy)
        run_id, registered = m.meta.mlflow_run_id, m.meta.registered_model
        present = bool(run_id) and tracking.run_exists(run_id)
        params = tracking.client().get_run(run_id).data.params if present else {}
        version = tracking.version_of_run(registered, run_id) if present and registered else None
        text = card(m.meta, m.result, data, params, spread, version, registered)
        write_text(folders[name] / "model_card.md", text)
        if present:
            out[name] = (run_id, registered, version, text)
    return out


def champion(m: Measured, data_hash: str, device: torch.device, measured: dict[str, Measured]) -> None:
    """The registered model's champion alias, moved to this model's version when it earns it (a champion among
    the `measured` models of the same task and classes is compared by what it measured now)."""
    name, run_id = m.meta.registered_model, m.meta.mlflow_run_id
    if not name or not run_id:
        return
    version = tracking.version_of_run(name, run_id)
    if version is None:
        print(f"evaluate: {name}: the version of run {run_id} is not registered in this tracking store; the "
              "champion is left as it is", flush=True)
        return
    same_images = {o.meta.mlflow_run_id: o.result["accuracy"] for o in measured.values()
                   if o.meta.mlflow_run_id and o.meta.task == m.meta.task
                   and list(o.meta.class_ids) == list(m.meta.class_ids)}
    line = crown(name, version, m.result["accuracy"], (m.x, m.y, m.meta.image_size), data_hash, device,
                 same_images)
    holder = tracking.champion_version(name)
    tags = tracking.client().get_model_version(name, holder).tags if holder else {}
    what = tags.get("strategy", tags.get("stage", "?"))
    print(f"evaluate: {line}; the champion, v{holder}, is the {what} model", flush=True)


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
    check_writable("evaluate")
    run(p)


if __name__ == "__main__":
    main()
