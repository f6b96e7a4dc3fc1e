"""Everything MLflow, in one place: the store, runs and tags, parameter counts, figures, models.

The default store is a SQLite file `mlflow.db` at the repository root with artifacts under `mlartifacts/`;
`MLFLOW_TRACKING_URI` points the project at a tracking server instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.fundamentals.summary import format_table, layer_table, param_counts, table_rows
from pipeline.rank import is_rank_zero
from pipeline.workspace import repo_root

MODEL_ARTIFACT = "model"

# A new store announces its tables (MLflow and alembic INFO lines on stderr); the stages say what matters.
for _name in ("mlflow.store.db.utils", "alembic"):
    logging.getLogger(_name).setLevel(logging.WARNING)


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else the project's SQLite file (set explicitly: Lightning's ./mlruns
    fallback is refused by MLflow 3)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(repo_root() / 'mlflow.db').as_posix()}"


def _artifact_location() -> str | None:
    """A local SQLite store keeps artifacts in mlartifacts/ beside the database; a server decides its own."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def check_store(uri: str | None = None) -> str:
    """Fail in one line, before any training, when the tracking store cannot be reached."""
    import mlflow

    uri = uri or tracking_uri()
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
        except requests.RequestException as exc:
            raise PipelineError(f"MLflow tracking server {uri} cannot be reached ({type(exc).__name__}); "
                                "start it or unset MLFLOW_TRACKING_URI") from None
        _check_credentials(uri)
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise PipelineError(f"MLflow store {uri}: folder {folder} is missing or not writable")
        _check_sqlite_writable(uri, Path(uri[len("sqlite:///"):]))
    if not uri.startswith(("http://", "https://")):
        from mlflow import MlflowClient

        try:  # a database URI without its driver, an unreadable file, ...: one line, before any training
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as exc:
            detail = (str(exc).strip().splitlines() or [""])[0][:160]
            raise PipelineError(f"MLflow store {uri} is not usable ({type(exc).__name__}: {detail}); "
                                "fix MLFLOW_TRACKING_URI or unset it for the project's mlflow.db") from None
    mlflow.set_tracking_uri(uri)
    return uri


def _check_sqlite_writable(uri: str, path: Path) -> None:
    """A write the store will need, tried and rolled back before any training (a read-only file, a full disk)."""
    import sqlite3

    try:
        con = sqlite3.connect(path, timeout=30, isolation_level=None)
        try:
            con.execute("BEGIN")
            con.execute("CREATE TABLE _cnn_pipeline_write_probe (x)")
            con.execute("ROLLBACK")
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise PipelineError(f"MLflow store {uri}: the database cannot be written ({exc}); make {path} writable "
                            "or set MLFLOW_TRACKING_URI to another store") from None


def _check_credentials(uri: str) -> None:
    """A server behind MLflow's basic-auth app: the stage's credentials (MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD, never params.yaml) must be accepted before any training starts."""
    import requests

    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    auth = (user, os.environ.get("MLFLOW_TRACKING_PASSWORD", "")) if user else None
    response = requests.get(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                            auth=auth, timeout=10)
    if response.status_code in (401, 403):
        who = f"user {user!r}" if user else "a request without credentials"
        raise PipelineError(f"MLflow tracking server {uri} refused {who} ({response.status_code}); set "
                            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account of the server")


def ensure_experiment(name: str) -> str:
    """The experiment's id, created (with the project's artifact folder) when missing."""
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        _check_artifact_location(exp)
        return exp.experiment_id
    try:
        return mlflow.create_experiment(name, artifact_location=_artifact_location())
    except mlflow.exceptions.MlflowException:
        # Created meanwhile by a concurrent stage.
        return mlflow.get_experiment_by_name(name).experiment_id


def _check_artifact_location(exp) -> None:
    """A local store keeps its artifacts beside its database. MLflow fixes that folder, as an absolute path,
    when the experiment is created: in a copied or moved repository it would still point into the old tree."""
    expected = _artifact_location()
    if expected and exp.artifact_location.startswith("file:") and exp.artifact_location != expected:
        raise PipelineError(
            f"MLflow store {tracking_uri()}: experiment {exp.name!r} writes its artifacts to "
            f"{exp.artifact_location}, not {expected} (the store was copied or moved); rename the experiment "
            "(mlflow.experiment in params.yaml) or move mlflow.db back")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def run_tags(stage: str, model: str, data_hash: str) -> dict[str, str]:
    """Tags that tie a run to its code, data and DVC experiment."""
    tags = {
        "stage": stage,
        "model": model,
        "git_commit": _git("rev-parse", "HEAD") or "unknown",
        "git_dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower(),
        "dvc_stage": stage,
        "data_hash": data_hash,
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_experiment"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc_baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    return tags


@dataclass(frozen=True)
class RunInfo:
    """The MLflow run a training logs to: its experiment, name, tags, params and (in a sweep) parent."""

    experiment: str
    name: str
    tags: dict[str, str]
    params: dict[str, Any]
    parent_id: str | None = None


def training_logger(run: RunInfo, run_id: str | None = None):
    """Lightning's MLFlowLogger for a training: on rank zero a new run with its tags and params, or the run
    `run_id` continued (a resumed training). Other DDP processes get a logger that never creates a run."""
    from pytorch_lightning.loggers import MLFlowLogger

    if is_rank_zero() and run_id is None:
        run_id = start_run(run.experiment, run.name, run.tags, run.parent_id)
        log_params(run_id, run.params)
    return MLFlowLogger(experiment_name=run.experiment, run_name=run.name, tracking_uri=tracking_uri(),
                        run_id=run_id, artifact_location=_artifact_location())


ROW_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s")


def record_run(run: RunInfo, rows: list[dict], metrics: dict[str, float | None]) -> str:
    """A finished training's run in a few writes (a sweep's short trainings: no live logger): its params, every
    epoch's metrics at its step, the summary metrics; FINISHED. Its id."""
    from mlflow.entities import Metric

    run_id = start_run(run.experiment, run.name, run.tags, run.parent_id)
    log_params(run_id, run.params)
    now = int(time.time() * 1000)
    items = [Metric(k, float(row[k]), now, int(row["step"])) for row in rows for k in ROW_METRICS
             if row.get(k) is not None]
    items += [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None]
    c = client()
    for i in range(0, len(items), 1000):
        c.log_batch(run_id, metrics=items[i : i + 1000])
    c.set_terminated(run_id, "FINISHED")
    return run_id


def start_run(experiment: str, run_name: str, tags: dict[str, str], parent_id: str | None = None) -> str:
    """Open a run (a parent for nested ones) on the project's store; close it with `ended`."""
    experiment_id = ensure_experiment(experiment)
    if parent_id:
        tags = tags | {"mlflow.parentRunId": parent_id}
    return client().create_run(experiment_id, run_name=run_name, tags=tags).info.run_id


@contextlib.contextmanager
def ended(run_id: str | None):
    """The run ends FINISHED when the block succeeds, FAILED (KILLED on Ctrl-C) when it raises."""
    try:
        yield
    except KeyboardInterrupt:
        if run_id:
            client().set_terminated(run_id, "KILLED")
        raise
    except BaseException:
        if run_id:
            client().set_terminated(run_id, "FAILED")
        raise
    if run_id:
        client().set_terminated(run_id, "FINISHED")


def client():
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri())


def log_params(run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    c = client()
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])


def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
    if items:
        client().log_batch(run_id, metrics=items)


def params_hash(*values: Any) -> str:
    """A short, stable hash of params (and anything else that decides a result, e.g. the data hash)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]


def dataset_inputs(data) -> list[tuple[Any, str]]:
    """The prepared splits as MLflow datasets (name: the source and split; digest: the prepared data's hash;
    source: the DVC-tracked data/prepared folder), each with its context (train, val, test)."""
    import mlflow
    from mlflow.data.sources import LocalArtifactDatasetSource

    source = LocalArtifactDatasetSource((repo_root() / "data" / "prepared").as_posix())
    return [(mlflow.data.from_numpy(data.x[split], source=source, targets=data.y[split],
                                    name=f"{data.source}/{split}", digest=data.data_hash), split)
            for split in ("train", "val", "test")]


def log_inputs(run_id: str, datasets: list[tuple[Any, str]]) -> None:
    """The datasets a run trained and validated on, tagged with their context and the git commit."""
    import mlflow

    commit = _git("rev-parse", "HEAD") or "unknown"
    with mlflow.start_run(run_id=run_id):
        for dataset, context in datasets:
            mlflow.log_input(dataset, context=context, tags={"git_commit": commit, "dvc_path": "data/prepared"})


def version_tags(run_tags: dict[str, str], params_digest: str) -> dict[str, str]:
    """A registered version's tags: what made it (stage, code, data, DVC experiment) and its params' hash."""
    keep = ("dvc_experiment", "data_hash", "git_commit", "stage")
    return {k: run_tags[k] for k in keep if k in run_tags} | {"params_hash": params_digest}


def register(model_uri: str, name: str, tags: dict[str, str]) -> str:
    """A new version of the registered model `name`, aliased `candidate`; its version number."""
    import logging

    import mlflow

    logging.getLogger("mlflow.tracking._model_registry.fluent").setLevel(logging.WARNING)
    version = mlflow.register_model(model_uri, name, tags=tags).version
    client().set_registered_model_alias(name, "candidate", version)
    return str(version)


def _exists(lookup) -> bool:
    """Whether the store answers `lookup()`; only "does not exist" is False (other errors propagate)."""
    from mlflow.exceptions import MlflowException

    try:
        lookup()
        return True
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise


def run_exists(run_id: str) -> bool:
    """Whether this store holds the run (a clone pulled from a DVC remote has the models, not their runs)."""
    return _exists(lambda: client().get_run(run_id))


def version_exists(name: str, version: str) -> bool:
    return _exists(lambda: client().get_model_version(name, version))


def describe(run_id: str, registered: str | None, version: str | None, text: str) -> None:
    """A Markdown description, rendered in the MLflow UI: the run's note and, when given, the version's."""
    c = client()
    c.set_tag(run_id, "mlflow.note.content", text)
    if registered and version:
        c.update_model_version(registered, version, description=text)


def champion_version(name: str) -> str | None:
    """The version the alias `champion` points at, or None (no champion yet, or no such model)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client().get_model_version_by_alias(name, "champion").version)
    except MlflowException:
        return None


def log_artifact(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    client().log_artifact(run_id, str(path), artifact_path)


def log_param_counts(run_id: str, model: nn.Module, input_shape: tuple[int, ...], net: nn.Module | None = None,
                     quiet: bool = False) -> dict[str, int]:
    """Total/trainable/non-trainable counts as params and metrics, plus the per-layer table (CSV and text),
    printed to the console as Keras' model.summary() does."""
    from pipeline.atomic import write_csv

    net = net or model
    counts = param_counts(net)
    rows = layer_table(net, input_shape)
    text = format_table(rows, type(net).__name__)
    if not quiet:
        print(text, flush=True)
    log_params(run_id, {f"params_{k}": v for k, v in counts.items()})
    log_metrics(run_id, {f"params_{k}": v for k, v in counts.items()})
    with tempfile.TemporaryDirectory() as tmp:
        write_csv(Path(tmp) / "layers.csv", table_rows(rows))
        (Path(tmp) / "layers.txt").write_text(text + "\n")
        log_artifact(run_id, Path(tmp) / "layers.csv", "summary")
        log_artifact(run_id, Path(tmp) / "layers.txt", "summary")
    return counts


def _pip_requirements() -> list[str]:
    from importlib.metadata import version

    def pin(name: str) -> str:
        return f"{name}=={version(name).split('+')[0]}"

    return [pin("torch"), pin("torchvision"), pin("cloudpickle"), pin("numpy")]


def log_model(run_id: str, model: nn.Module, example: torch.Tensor) -> str:
    """Log the model with a signature, an input example (batch >= 2) and explicit pip requirements.

    Pickle format: the `pt2` export would freeze the example's batch size; pickle serves any batch size.
    The `pipeline` package travels as code so the model also loads outside this repository.
    """
    import logging

    import mlflow
    from mlflow.models import infer_signature

    # Pickle is chosen on purpose (see above); MLflow's warning about it would print on every run.
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    model = model.cpu().eval()
    # Two images: MLflow's smallest example that keeps the batch axis (a batch of 1 reads as no batch); each
    # image more is written as JSON and read back to check serving (224 px: 1.5 s a model at 4, 0.75 s at 2)
    example = example[:2].cpu().float()
    with torch.no_grad():
        output = model(example).numpy()
    signature = infer_signature(example.numpy(), output)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model, name=MODEL_ARTIFACT, signature=signature, input_example=example.numpy().astype(np.float32),
            pip_requirements=_pip_requirements(), serialization_format="pickle",
            code_paths=[str(Path(__file__).parent)],
        )
    return info.model_uri


# ------------------------------------------------------------------------------------------ publishing
@contextlib.contextmanager
def untouched_rng():
    """Python's, NumPy's and torch's random states are the same after the block as before it (MLflow's data set
    logging draws from NumPy's)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(py_state)
    np.random.set_state(np_state)


@dataclass
class Publication:
    """What a finished training's run gets besides the live per-epoch metrics, in one call after the stage has
    published its outputs."""

    model: nn.Module  # the deployable model; the layer table is its network's
    input_shape: tuple[int, ...]  # the network's input (C, H, W)
    summary: dict[str, float | None]  # best_val_acc, epochs_run, train_time_s, ...
    files: list[tuple[Path, str]] = field(default_factory=list)  # artifacts: (file, folder in the run)
    datasets: list = field(default_factory=list)  # dataset_inputs(...)
    example: torch.Tensor | None = None  # the logged model's input example; None: the model is not logged
    register_as: str | None = None  # the logged model becomes a new version of this registered model
    version_tags: dict[str, str] = field(default_factory=dict)
    quiet: bool = False  # no layer table on the console


def publish_training(run_id: str, pub: Publication) -> str | None:
    """Counts and layer table, summary metrics, artifacts, data sets, the model and its registered version (whose
    number is returned, or None)."""
    with untouched_rng():
        net = getattr(pub.model, "net", pub.model)
        log_param_counts(run_id, pub.model, pub.input_shape, net=net, quiet=pub.quiet)
        log_metrics(run_id, pub.summary)
        for path, folder in pub.files:
            if Path(path).exists():
                log_artifact(run_id, path, folder)
        if pub.datasets:
            log_inputs(run_id, pub.datasets)
        if pub.example is None:
            return None
        uri = log_model(run_id, pub.model, pub.example)
        if not pub.register_as:
            return None
        return register(uri, pub.register_as, pub.version_tags | {"mlflow_run_id": run_id})


def version_of_run(name: str, run_id: str) -> str | None:
    """The registered model `name`'s version logged by run `run_id` (None: not registered in this store)."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client().search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:
        return None
    return str(max(int(v.version) for v in versions)) if versions else None
