"""train_scratch's training path: a tiny tracked run, loading the logged model, determinism, the stage."""

from __future__ import annotations

import csv
import subprocess
import sys

import yaml

from pipeline.data.datamodule import ImageDataModule
from pipeline.models.classifier import Classifier
from pipeline.models.cnn import CNN, PRESETS
from pipeline.params import AugmentParams, TrainerParams
from pipeline.stages.common import fit, seed_all
from pipeline.training.module import ClassifierModule, OptimConfig
from tests.conftest import make_repo_copy, run_module


def tiny_fit(data, experiment="tests", seed=0, epochs=2):
    from pipeline.data import augment as aug

    seed_all(seed)
    model = Classifier(CNN(PRESETS["seed_mnist"], 1, 28, 10), data.mean, data.std, 1)
    dm = ImageDataModule({s: (data.x[s], data.y[s]) for s in ("train", "val", "test")}, 32, 0, seed,
                         aug.from_params(AugmentParams(), seed))
    module = ClassifierModule(model, 10, OptimConfig(scheduler="cosine", warmup_epochs=1))
    return fit(module, dm, trainer_params=TrainerParams(), epochs=epochs, experiment=experiment,
               run_name="train_scratch/seed_mnist", tags={"stage": "train_scratch"},
               log_params={"train.lr": 0.001, "model.preset": "seed_mnist"}, input_shape=(1, 28, 28),
               checkpoint_name=f"test_{seed}")


def test_tiny_run_is_fully_tracked(tmp_path, monkeypatch, mlflow_store, tiny_prepared):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    result = tiny_fit(tiny_prepared)
    client = MlflowClient(mlflow_store)
    run = client.get_run(result.run_id)
    assert run.info.run_name == "train_scratch/seed_mnist"
    assert run.data.params["train.lr"] == "0.001"
    assert run.data.params["params_total"] == "421642"
    assert run.data.metrics["params_trainable"] == 421_642 and run.data.metrics["params_non_trainable"] == 0
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s"):
        assert len(client.get_metric_history(result.run_id, key)) == 2, key
    table = client.download_artifacts(result.run_id, "summary/layers.csv", str(tmp_path))
    rows = list(csv.DictReader(open(table)))
    assert [int(r["params"]) for r in rows if int(r["params"])] == [320, 18_496, 401_536, 1_290]
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"summary", "curves", "checkpoints"} <= artifacts
    # The logged model loads in a fresh process and predicts any batch size.
    code = ("import mlflow, numpy as np, sys; m = mlflow.pyfunc.load_model(sys.argv[1]);"
            "print(m.predict(np.random.rand(3, 1, 28, 28).astype('float32')).shape);"
            "t = mlflow.pytorch.load_model(sys.argv[1]); import torch;"
            "print(tuple(t(torch.rand(5, 1, 28, 28)).shape))")
    out = subprocess.run([sys.executable, "-c", code, result.model_uri], capture_output=True, text=True,
                         env={"MLFLOW_TRACKING_URI": mlflow_store, "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert out.stdout.split("\n")[:2] == ["(3, 10)", "(5, 10)"], out.stderr[-2000:]


def test_same_seed_same_metrics(tmp_path, monkeypatch, mlflow_store, tiny_prepared):
    monkeypatch.chdir(tmp_path)
    a = tiny_fit(tiny_prepared, seed=1)
    b = tiny_fit(tiny_prepared, seed=1)
    c = tiny_fit(tiny_prepared, seed=2)
    assert [r["train_loss"] for r in a.rows] == [r["train_loss"] for r in b.rows]
    assert a.rows[-1]["val_loss"] == b.rows[-1]["val_loss"]
    assert a.rows[-1]["train_loss"] != c.rows[-1]["train_loss"]


def test_unreachable_store_fails_before_training(tmp_path):
    repo = make_repo_copy(tmp_path / "repo")
    assert run_module("pipeline.stages.prepare", repo).returncode == 0
    assert run_module("pipeline.stages.augment", repo).returncode == 0
    result = run_module("pipeline.stages.train_scratch", repo, env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: MLflow tracking server http://127.0.0.1:9 cannot be reached")
    assert not (repo / "models").exists()


def test_impossible_layer_stack_stops_the_stage(tmp_path):
    repo = make_repo_copy(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"]["preset"] = "custom"
    params["model"]["blocks"][2] |= {"stride": 8, "pool": "max"}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("prepare", "augment"):
        assert run_module(f"pipeline.stages.{stage}", repo).returncode == 0
    result = run_module("pipeline.stages.train_scratch", repo)
    assert result.returncode == 2
    assert result.stderr.startswith("error: model block 3: max pool 2x2 does not fit its 1x1 input"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
