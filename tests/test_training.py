"""train_scratch's training path: a tiny tracked run, loading the logged model, determinism, the stage."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from pipeline.params import AugmentParams, parse
from tests.conftest import ready_to_train


def scratch_run(tmp_path, data, seed=0, epochs=2) -> dict:
    """train_scratch.run(params) in tmp_path, on the tiny prepared digits with the default augmentation."""
    from pipeline.data import augment as aug
    from pipeline.stages import train_scratch

    data.save(tmp_path / "data/prepared")
    aug.save(aug.build(AugmentParams(), seed))
    p = parse({"seed": seed, "train": {"epochs": epochs, "batch_size": 32}})
    return train_scratch.run(p)


def curves(tmp_path) -> list[dict]:
    with open(tmp_path / "plots/train_scratch.csv") as fh:
        return list(csv.DictReader(fh))


def test_tiny_run_is_fully_tracked(tmp_path, monkeypatch, mlflow_store, tiny_prepared):
    from mlflow import MlflowClient

    from pipeline.models import loading

    monkeypatch.chdir(tmp_path)
    metrics = scratch_run(tmp_path, tiny_prepared)
    run_id = metrics["mlflow_run_id"]
    client = MlflowClient(mlflow_store)
    run = client.get_run(run_id)
    assert run.info.run_name == "train_scratch/seed_mnist" and run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.001" and run.data.params["train.monitor"] == "val_acc"
    assert run.data.params["params_total"] == "421642"
    assert run.data.metrics["params_trainable"] == 421_642 and run.data.metrics["params_non_trainable"] == 0
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s"):
        assert len(client.get_metric_history(run_id, key)) == 2, key
    assert run.data.metrics["best_val_acc"] == pytest.approx(metrics["best_val_acc"], abs=1e-6)
    table = client.download_artifacts(run_id, "summary/layers.csv", str(tmp_path))
    rows = list(csv.DictReader(open(table)))
    assert [int(r["params"]) for r in rows if int(r["params"])] == [320, 18_496, 401_536, 1_290]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"summary", "curves", "checkpoints", "augmentation"} <= artifacts
    # Its data sets: the prepared splits, named by source and split, with the prepared data's hash as digest.
    inputs = {(d.dataset.name, d.dataset.digest, {t.key: t.value for t in d.tags}["mlflow.data.context"])
              for d in run.inputs.dataset_inputs}
    digest = tiny_prepared.data_hash
    assert inputs == {(f"embedded/{s}", digest, s) for s in ("train", "val", "test")}
    # The saved model file holds the best epoch's weights, and the logged model is the same network.
    model, meta, _ = loading.load(tmp_path / "models/scratch/model.pt")
    # A new version of the registered model, aliased candidate, tagged with what made it.
    assert meta.registered_model == "cnn-pipeline-scratch" and meta.mlflow_run_id == run_id
    version = client.get_model_version_by_alias("cnn-pipeline-scratch", "candidate")
    assert str(version.version) == "1" and version.run_id == run_id
    assert version.tags["data_hash"] == tiny_prepared.data_hash and len(version.tags["params_hash"]) == 12
    assert (tmp_path / "models/scratch/best.ckpt").exists() and not list((tmp_path / ".cache/checkpoints").iterdir())
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "x.npy", x.numpy())
    expected = model(x).detach().numpy()
    # The logged model loads in a fresh process (isolated mode: no cwd, no PYTHONPATH) and predicts exactly
    # what the saved model predicts.
    code = ("import mlflow, numpy as np, sys; m = mlflow.pyfunc.load_model(sys.argv[1]);"
            "np.save('pred.npy', m.predict(np.load('x.npy')));"
            "t = mlflow.pytorch.load_model(sys.argv[1]); import torch;"
            "print(tuple(t(torch.rand(5, 1, 28, 28)).shape))")
    out = subprocess.run([sys.executable, "-I", "-c", code, f"runs:/{run_id}/model"], capture_output=True, text=True,
                         env={"MLFLOW_TRACKING_URI": mlflow_store, "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert out.stdout.strip().endswith("(5, 10)"), out.stderr[-2000:]
    assert np.allclose(np.load(tmp_path / "pred.npy"), expected, atol=1e-5)


def test_same_seed_same_metrics(tmp_path, monkeypatch, mlflow_store, tiny_prepared):
    monkeypatch.chdir(tmp_path)
    a = (scratch_run(tmp_path, tiny_prepared, seed=1), curves(tmp_path))
    b = (scratch_run(tmp_path, tiny_prepared, seed=1), curves(tmp_path))
    c = (scratch_run(tmp_path, tiny_prepared, seed=2), curves(tmp_path))
    assert [r["train_loss"] for r in a[1]] == [r["train_loss"] for r in b[1]]
    assert a[0]["best_val_loss"] == b[0]["best_val_loss"] and a[0]["mlflow_run_id"] != b[0]["mlflow_run_id"]
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_store)
    same = [client.get_run(r[0]["mlflow_run_id"]).inputs.dataset_inputs[0].dataset for r in (a, b)]
    assert same[0].name == same[1].name and same[0].digest == same[1].digest  # one data set in the UI
    assert a[1][-1]["train_loss"] != c[1][-1]["train_loss"]


def test_unreachable_store_fails_before_training(tmp_path, tiny_prepared, run_stage):
    repo = ready_to_train(tmp_path / "repo", tiny_prepared)
    result = run_stage(repo, "train_scratch", env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: MLflow tracking server http://127.0.0.1:9 cannot be reached")
    assert not (repo / "models").exists()


def test_impossible_layer_stack_stops_the_stage(tmp_path, tiny_prepared, run_stage):
    repo = ready_to_train(tmp_path / "repo", tiny_prepared)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"]["preset"] = "custom"
    params["model"]["blocks"][2] |= {"stride": 8, "pool": "max"}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    result = run_stage(repo, "train_scratch")
    assert result.returncode == 2
    assert result.stderr.startswith("error: model block 3: max pool 2x2 does not fit its 1x1 input"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_evaluate_publishes_its_outputs_as_one_set(tmp_path, monkeypatch, mlflow_store, tiny_prepared):
    """A failure late in evaluate (here while it times the ONNX export, after every report is written) leaves
    the previous run's reports, model cards, ONNX files and metrics exactly as they were: all or nothing."""
    from pipeline.data import augment as aug
    from pipeline.stages import evaluate, train_scratch

    monkeypatch.chdir(tmp_path)
    tiny_prepared.save(tmp_path / "data/prepared")
    aug.save(aug.build(AugmentParams(), 0))
    train_scratch.run(parse({"train": {"epochs": 1, "batch_size": 32, "warmup_epochs": 0}}))
    p = parse({"evaluate": {"latency_runs": 3, "warmup_runs": 1}})
    first = evaluate.run(p)
    assert "onnx" in first and (tmp_path / "reports/evaluate/seed_mnist/model_card.md").exists()
    outputs = [tmp_path / "metrics", tmp_path / "reports", tmp_path / "models/onnx"]

    def snapshot() -> dict:
        return {f.relative_to(tmp_path): f.read_bytes() for d in outputs for f in sorted(d.rglob("*")) if f.is_file()}

    before = snapshot()
    assert any(path.suffix == ".onnx" for path in before) and any(path.name == "model_card.md" for path in before)

    def broken(*args, **kwargs):
        raise RuntimeError("killed while timing the ONNX export")

    monkeypatch.setattr(evaluate, "onnx_latency_ms", broken)
    with pytest.raises(RuntimeError, match="killed while timing"):
        evaluate.run(p)
    assert snapshot() == before
    leftovers = [f for d in [tmp_path / "metrics", tmp_path / "reports", tmp_path / "models"] for f in d.rglob(".*")]
    assert not leftovers, leftovers  # no staged file or folder left behind, at any depth


def test_champion_moves_only_to_a_version_at_least_as_accurate(tmp_path, monkeypatch, mlflow_store, tiny_prepared,
                                                                capsys):
    """First, worse (stays), a newer one equally accurate (moves: "at least as accurate"), an older tie
    re-evaluated (stays), better (moves); evaluate's test metrics land in each model's own training run."""
    from mlflow import MlflowClient

    from pipeline.data import augment as aug
    from pipeline.stages import evaluate, train_scratch

    monkeypatch.chdir(tmp_path)
    client = MlflowClient(mlflow_store)
    p = parse({"evaluate": {"latency_runs": 3, "warmup_runs": 1}})

    def version(train: dict) -> tuple[float, str]:
        aug.save(aug.build(AugmentParams(), 0))
        metrics = train_scratch.run(parse({"train": {"batch_size": 32, "warmup_epochs": 0} | train}))
        result = evaluate.run(p)["seed_mnist"]
        # the normal case: the test metrics go to the model's own training run
        assert client.get_run(metrics["mlflow_run_id"]).data.metrics.get("test_accuracy") == result["accuracy"]
        return result["accuracy"], capsys.readouterr().out

    tiny_prepared.save(tmp_path / "data/prepared")
    first, out = version({"epochs": 2})
    assert "evaluate: cnn-pipeline-scratch: v1 is the first champion" in out
    second, out = version({"epochs": 1, "lr": 1e-6})  # one epoch at a tiny learning rate: worse
    assert second < first
    assert (f"evaluate: cnn-pipeline-scratch: champion stays v1 (test acc {first:.4f} on these images; "
            f"v2: {second:.4f})") in out
    assert str(client.get_model_version_by_alias("cnn-pipeline-scratch", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("cnn-pipeline-scratch", "candidate").version) == "2"
    assert client.get_model_version("cnn-pipeline-scratch", "2").tags["test_accuracy"] == str(second)
    third, out = version({"epochs": 2})  # the first one's params and seed: as accurate, so it takes the alias
    assert third == first
    assert f"evaluate: cnn-pipeline-scratch: champion moves from v1 ({first:.4f}) to v3 ({third:.4f})" in out
    # re-evaluating the older, equally accurate v1 (a rerun of evaluate) leaves the alias where it is
    from pipeline.champion import crown

    test = (tiny_prepared.x["test"], tiny_prepared.y["test"], tiny_prepared.x["test"].shape[1])
    line = crown("cnn-pipeline-scratch", "1", first, test, "hash", torch.device("cpu"))
    assert line == f"cnn-pipeline-scratch: champion stays v3 (test acc {third:.4f} on these images; v1: {first:.4f})"
    assert str(client.get_model_version_by_alias("cnn-pipeline-scratch", "champion").version) == "3"
    # a champion evaluated in the same run is compared by what it measured there, not loaded and measured again
    v3_run = client.get_model_version("cnn-pipeline-scratch", "3").run_id
    line = crown("cnn-pipeline-scratch", "1", first, test, "hash", torch.device("cpu"), {v3_run: 1.0})
    assert line == f"cnn-pipeline-scratch: champion stays v3 (test acc 1.0000 on these images; v1: {first:.4f})"
    fourth, out = version({"epochs": 8, "lr": 0.003})  # trained longer: better
    assert fourth > third
    assert f"evaluate: cnn-pipeline-scratch: champion moves from v3 ({third:.4f}) to v4 ({fourth:.4f})" in out
    assert str(client.get_model_version_by_alias("cnn-pipeline-scratch", "champion").version) == "4"
    # The champion loads by its alias in a fresh process.
    code = ("import mlflow, numpy as np; m = mlflow.pyfunc.load_model('models:/cnn-pipeline-scratch@champion');"
            "print(m.predict(np.zeros((2, 1, 28, 28), dtype='float32')).shape)")
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"MLFLOW_TRACKING_URI": mlflow_store, "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "(2, 10)", out.stderr[-2000:]
