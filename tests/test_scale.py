"""Real parts at scale: an MLflow server (SQLite, PostgreSQL, basic auth), its UI in Chromium, DDP (DVC's
experiments and queue: tests/test_pipeline_e2e.py, on the reproduced pipeline)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import ready_to_train, run_module
from tests.servers import mlflow_server, postgres_bin, postgres_cluster

pytestmark = pytest.mark.slow
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def unless_installed(present: bool, what: str):
    """Skip on a developer's machine without `what`; under CI (CI=true), where .ci/run installs it, run the test
    anyway, so that a missing install fails instead of passing silently."""
    return pytest.mark.skipif(not present and not os.environ.get("CI"), reason=f"{what} absent (apt-get install)")


@pytest.fixture(scope="module")
def prepared_repo(tmp_path_factory, tiny_prepared) -> Path:
    """A folder ready for train_scratch (made in process); tests train in copies of it."""
    return ready_to_train(tmp_path_factory.mktemp("scale") / "repo", tiny_prepared)


def train_tiny(prepared: Path, dest: Path, tracking_uri: str, run_stage=None, **trainer) -> tuple[Path, str]:
    """train_scratch in a copy of `prepared` at `dest`, logging to `tracking_uri`: (the copy, the run id). In
    process through `run_stage` when given (a server test is about the server, not about a new interpreter);
    as `python -m` otherwise (DDP launches its ranks from the command line)."""
    repo = Path(shutil.copytree(prepared, dest))
    if trainer:
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["trainer"] |= trainer
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {"MLFLOW_TRACKING_URI": tracking_uri}
    result = (run_stage(repo, "train_scratch", env=env) if run_stage
              else run_module("pipeline.stages.train_scratch", repo, env=env))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return repo, json.loads((repo / "metrics/train_scratch.json").read_text())["mlflow_run_id"]


def assert_run_complete(tracking_uri: str, run_id: str) -> None:
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    assert run.data.params["train.epochs"] == "2" and run.data.params["params_total"] == "421642"
    assert run.data.metrics["params_trainable"] == 421_642
    assert len(client.get_metric_history(run_id, "val_acc")) == 2
    assert "summary/layers.csv" in {a.path for a in client.list_artifacts(run_id, "summary")}
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    assert model.predict(np.random.rand(4, 1, 28, 28).astype(np.float32)).shape == (4, 10)
    # The registry works on this store too: the run's model is the newest version, aliased candidate.
    candidate = client.get_model_version_by_alias("cnn-pipeline-scratch", "candidate")
    assert candidate.run_id == run_id
    registered = mlflow.pyfunc.load_model("models:/cnn-pipeline-scratch@candidate")
    assert registered.predict(np.random.rand(2, 1, 28, 28).astype(np.float32)).shape == (2, 10)


def browse_run(url: str, run_id: str, tmp_path: Path) -> list[Path]:
    """The experiment's runs table, the run page and its per-layer table in headless Chromium; screenshots."""
    from mlflow import MlflowClient
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    os.environ.setdefault("SE_AVOID_STATS", "true")
    run = MlflowClient(url).get_run(run_id)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-quic",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chrome'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        wait = WebDriverWait(driver, 60)

        def body() -> str:
            return driver.find_element("tag name", "body").text

        base = f"{url}/#/experiments/{run.info.experiment_id}"
        driver.get(f"{base}/runs")  # the experiment's training runs table
        wait.until(lambda d: "1 matching run" in body())
        driver.save_screenshot(str(tmp_path / "experiment.png"))
        driver.get(f"{base}/runs/{run_id}")
        wait.until(lambda d: "val_acc" in body() and run.info.run_name in body())
        assert "params_total" in body() and "421642" in body()
        driver.save_screenshot(str(tmp_path / "run.png"))
        driver.get(f"{base}/runs/{run_id}/artifacts")
        wait.until(lambda d: "summary" in body())
        driver.find_element("xpath", "//*[text()='summary']").click()
        wait.until(lambda d: "layers.csv" in body())
        driver.find_element("xpath", "//*[text()='layers.csv']").click()
        wait.until(lambda d: "features.0" in body() and "18496" in body())  # the per-layer table, previewed
        driver.save_screenshot(str(tmp_path / "artifacts.png"))
    finally:
        driver.quit()
    return [tmp_path / name for name in ("experiment.png", "run.png", "artifacts.png")]


def test_tracking_server_with_sqlite_and_its_ui(prepared_repo, tmp_path, run_stage):
    """A stage logs through `mlflow server` (SQLite); everything reads back, and the UI shows the run in a real
    browser (Debian's Chromium: skipped on a machine without it, required under CI)."""
    with mlflow_server(f"sqlite:///{tmp_path}/server.db", tmp_path / "artifacts") as url:
        _, run_id = train_tiny(prepared_repo, tmp_path / "repo", url, run_stage)
        assert_run_complete(url, run_id)
        assert any((tmp_path / "artifacts").rglob("layers.csv"))  # artifacts went through the server
        if not (CHROMIUM and CHROMEDRIVER) and not os.environ.get("CI"):
            pytest.skip("the UI part needs Debian's chromium and chromium-driver (apt-get install)")
        screenshots = browse_run(url, run_id, tmp_path)
    keep = os.environ.get("UI_SCREENSHOT_DIR")
    for png in screenshots:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        if keep:
            shutil.copy(png, Path(keep) / png.name)


@unless_installed(postgres_bin() is not None, "PostgreSQL server binaries (postgresql)")
def test_tracking_server_with_postgresql(prepared_repo, tmp_path, run_stage):
    with postgres_cluster() as database, mlflow_server(database, tmp_path / "artifacts") as url:
        _, run_id = train_tiny(prepared_repo, tmp_path / "repo", url, run_stage)
        assert_run_complete(url, run_id)


def test_tracking_server_with_basic_auth(prepared_repo, tmp_path, run_stage):
    """MLflow's basic-auth app: anonymous requests are refused, a stage with credentials logs its run, a stage
    with a wrong password stops before training with one line."""
    import requests

    password = secrets.token_urlsafe(18)
    with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "artifacts", admin_password=password) as url:
        anonymous = requests.get(f"{url}/api/2.0/mlflow/experiments/search", params={"max_results": 1}, timeout=10)
        assert anonymous.status_code == 401
        repo = tmp_path / "repo"
        shutil.copytree(prepared_repo, repo)
        good = {"MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}
        result = run_stage(repo, "train_scratch", env=good)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        run_id = json.loads((repo / "metrics/train_scratch.json").read_text())["mlflow_run_id"]
        run = requests.get(f"{url}/api/2.0/mlflow/runs/get", params={"run_id": run_id}, auth=("admin", password),
                           timeout=10).json()["run"]
        assert run["info"]["status"] == "FINISHED"
        bad = good | {"MLFLOW_TRACKING_PASSWORD": "not-the-password"}
        result = run_stage(repo, "train_scratch", env=bad)
        assert result.returncode == 2
        assert result.stderr.strip() == (f"error: MLflow tracking server {url} refused user 'admin' (401); set "
                                         "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account of "
                                         "the server")


def test_ddp_on_two_cpu_processes_logs_one_run(prepared_repo, tmp_path):
    from mlflow import MlflowClient

    from pipeline.models import loading

    uri = f"sqlite:///{tmp_path}/ddp.db"
    repo, run_id = train_tiny(prepared_repo, tmp_path / "repo", uri, accelerator="cpu", devices=2, strategy="ddp")
    metrics = json.loads((repo / "metrics/train_scratch.json").read_text())
    assert metrics["world_size"] == 2  # two processes trained, not one that ignored devices: 2
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [run_id]  # rank zero only
    assert runs[0].data.params["trainer.world_size"] == "2"
    model, meta, _ = loading.load(repo / "models/scratch/model.pt")
    assert meta.mlflow_run_id == run_id
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
