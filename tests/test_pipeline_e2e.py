"""End to end: `dvc repro` of every stage in a temporary copy of the repository, with the tiny profile."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_repo_copy

STAGES = ["prepare", "augment", "train_scratch", "transfer_learn", "evaluate", "compare", "explain"]


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "CI": "true",
                        "DVC_NO_ANALYTICS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(["dvc", *args], cwd=repo, capture_output=True, text=True, env=env, timeout=1800)


def ran(result: subprocess.CompletedProcess) -> list[str]:
    return re.findall(r"Running stage '([a-z_]+)'", result.stdout)


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    repo = make_repo_copy(tmp_path_factory.mktemp("e2e") / "repo")
    first = dvc(repo, "repro")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return repo, first


@pytest.mark.slow
def test_repro_runs_every_stage_offline(repro):
    repo, first = repro
    order = ran(first)
    assert sorted(order) == sorted(STAGES)
    assert order.index("prepare") < order.index("augment") < order.index("train_scratch") < order.index("evaluate")
    for path in ["data/prepared/dataset.npz", "data/augmented/pipeline.json", "models/scratch/model.pt",
                 "models/transfer/fine_tuning.pt", "reports/compare.md", "reports/compare.csv",
                 "plots/augment/preview.png", "plots/evaluate/predictions/seed_mnist.csv", "plots/explain/pooling.png",
                 "mlflow.db"]:
        assert (repo / path).exists(), path
    evaluate = json.loads((repo / "metrics/evaluate.json").read_text())
    assert set(evaluate) == {"seed_mnist", "transfer_feature_extraction", "transfer_fine_tuning", "transfer_scratch"}
    data = json.loads((repo / "metrics/data.json").read_text())
    assert data["source"] == "embedded" and data["total"] == {"train": 140, "val": 30, "test": 30}
    assert evaluate["seed_mnist"]["test_images"] == 30
    with open(repo / "plots/evaluate/predictions/seed_mnist.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 30
    assert evaluate["seed_mnist"]["accuracy"] == pytest.approx(
        sum(r["actual"] == r["predicted"] for r in rows) / 30, abs=1e-6)
    # evaluate reproduces, from the saved files, the test accuracy the sweep measured for the same models.
    transfer = json.loads((repo / "metrics/transfer_learn.json").read_text())
    assert transfer["backbone"] == "efficientnet_lite0" and transfer["weights"] == "imagenet"
    for strategy, saved in transfer["saved_models"].items():
        assert evaluate[f"transfer_{strategy}"]["accuracy"] == pytest.approx(saved["test_acc"], abs=1e-6)
    compare = json.loads((repo / "metrics/compare.json").read_text())
    assert compare["static"]["resnet18"]["params"] == 11_689_512
    assert compare["static"]["seed_mnist"]["params"] == 421_642
    scratch = json.loads((repo / "metrics/train_scratch.json").read_text())
    assert scratch["params_total"] == 421_642 and len(scratch["mlflow_run_id"]) == 32
    dag = dvc(repo, "dag")
    assert all(stage in dag.stdout for stage in STAGES)


@pytest.mark.slow
def test_second_repro_reruns_nothing(repro):
    repo, _ = repro
    again = dvc(repo, "repro")
    assert again.returncode == 0 and ran(again) == [], again.stdout


@pytest.mark.slow
def test_evaluate_only_key_reruns_only_evaluate(repro):
    repo, _ = repro
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluate"]["top_k"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = dvc(repo, "repro")
    assert result.returncode == 0 and ran(result) == ["evaluate"], result.stdout
    metrics = json.loads((repo / "metrics/evaluate.json").read_text())
    assert "top_2_accuracy" in metrics["seed_mnist"]
    shown = dvc(repo, "metrics", "show", "--json")
    assert shown.returncode == 0 and "top_2_accuracy" in shown.stdout


@pytest.mark.slow
def test_compare_has_one_parent_run_with_nested_runs(repro):
    from mlflow import MlflowClient

    repo, _ = repro
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(ids, filter_string="attributes.run_name = 'compare'")
    assert len(parents) == 1
    children = client.search_runs(ids, filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["compare/lenet5", "compare/resnet18", "compare/seed_mnist"]
    trained = {r.info.run_name: r for r in children}
    assert "test_acc" in trained["compare/lenet5"].data.metrics  # trained in the tiny profile
    assert trained["compare/resnet18"].data.metrics["params_total"] == 11_689_512  # counted only
    compare = json.loads((repo / "metrics/compare.json").read_text())
    assert compare["mlflow_parent_run_id"] == parents[0].info.run_id


def copy_with_train(repro_repo: Path, dest: Path, **train) -> Path:
    """A copy of the reproduced repository (its own MLflow store) with params.train edited."""
    shutil.copytree(repro_repo, dest, symlinks=True, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["train"] |= train
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def snapshot(repo: Path) -> dict[str, bytes]:
    return {p: (repo / p).read_bytes() for p in ("models/scratch/model.pt", "metrics/train_scratch.json",
                                                 "plots/train_scratch.csv", "plots/train_scratch/learning_curves.png")}


@pytest.mark.slow
def test_a_failed_stage_keeps_the_last_good_outputs(repro, tmp_path):
    before = snapshot(repro[0])
    repo = copy_with_train(repro[0], tmp_path / "repo", lr=-0.1)
    result = dvc(repo, "repro", "train_scratch")
    assert result.returncode != 0
    assert "error: params.yaml: train.lr must be > 0.0 (got -0.1)" in result.stderr + result.stdout
    assert snapshot(repo) == before


@pytest.mark.slow
def test_a_killed_repro_keeps_the_last_good_outputs(repro, tmp_path):
    before = snapshot(repro[0])
    repo = copy_with_train(repro[0], tmp_path / "repo", epochs=200, early_stopping={"enabled": False, "patience": 5})
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "CI": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(["dvc", "repro", "train_scratch"], cwd=repo, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    for line in proc.stdout:
        if line.startswith("epoch 1/"):
            break
    assert proc.poll() is None, "the stage ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # dvc and the stage, as a closed laptop lid or an OOM killer would
    proc.wait(timeout=60)
    assert snapshot(repo) == before


@pytest.mark.slow
def test_the_champion_is_served_and_predicts_what_evaluate_measured(repro):
    import numpy as np
    import requests

    from tests.servers import free_port

    repo, first = repro
    assert "evaluate: cnn-pipeline-scratch: v1 is the first champion" in first.stdout
    with np.load(repo / "data/prepared/dataset.npz") as f:
        x, y = f["x_test"], f["y_test"]
    images = (x.astype(np.float32) / 255.0).transpose(0, 3, 1, 2)  # (N, 1, 28, 28) pixels in [0, 1]
    port = free_port()
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}",
                        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    server = subprocess.Popen(["mlflow", "models", "serve", "-m", "models:/cnn-pipeline-scratch@champion",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                              cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                if requests.get(f"{url}/ping", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert server.poll() is None, "mlflow models serve exited"
            time.sleep(0.5)
        response = requests.post(f"{url}/invocations", json={"inputs": images.tolist()}, timeout=60)
        assert response.status_code == 200, response.text[:500]
        logits = np.asarray(response.json()["predictions"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert logits.shape == (len(y), 10)
    served = float((logits.argmax(1) == y).mean())
    evaluate = json.loads((repo / "metrics/evaluate.json").read_text())
    assert served == pytest.approx(evaluate["seed_mnist"]["accuracy"], abs=1e-6)
