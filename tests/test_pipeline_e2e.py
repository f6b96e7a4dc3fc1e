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

STAGES = ["prepare", "prepare_photos", "augment", "augment_photos", "train_scratch", "transfer_learn",
          "transfer_photos", "evaluate", "compare", "explain", "claims", "claims_report"]


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "CI": "true",
                        "DVC_NO_ANALYTICS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(["dvc", *args], cwd=repo, capture_output=True, text=True, env=env, timeout=1800)


def ran(result: subprocess.CompletedProcess) -> list[str]:
    return re.findall(r"Running stage '([a-z_]+)'", result.stdout)


@pytest.fixture(scope="session")
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
    assert set(evaluate) == {"seed_mnist", "transfer_feature_extraction", "transfer_fine_tuning", "transfer_scratch",
                             "photos_feature_extraction", "photos_fine_tuning", "photos_scratch", "onnx"}
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
    # The photo task: its own data (the real food photos, deduplicated, five classes), sweep and models, each
    # scored on its own test split.
    photos = json.loads((repo / "metrics/data_photos.json").read_text())
    assert photos["source"] == "food_photos" and photos["num_classes"] == 5 and photos["image_size"] == 32
    assert photos["source_details"]["classes"]["fish_seafood"]["photos"] == 117
    sweep = json.loads((repo / "metrics/transfer_photos.json").read_text())
    assert sweep["task"] == "photos" and sweep["test_images"] == photos["total"]["test"]
    for strategy, saved in sweep["saved_models"].items():
        assert evaluate[f"photos_{strategy}"]["accuracy"] == pytest.approx(saved["test_acc"], abs=1e-6)
        assert evaluate[f"photos_{strategy}"]["test_images"] == photos["total"]["test"]
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
def test_evaluate_only_key_reruns_only_evaluate(repro, tmp_path):
    """In a copy with the models but a new MLflow store (what a clone that pulled models/ from a DVC remote
    has), an evaluate-only key reruns evaluate alone, and each model's results go to a new run that names the
    training run it could not find."""
    from mlflow import MlflowClient

    repo = copy_of(repro[0], tmp_path / "repo", with_store=False)
    edit_params(repo, evaluate={"top_k": 2})
    result = dvc(repo, "repro")
    assert result.returncode == 0 and ran(result) == ["evaluate"], result.stdout + result.stderr
    metrics = json.loads((repo / "metrics/evaluate.json").read_text())
    assert "top_2_accuracy" in metrics["seed_mnist"]
    shown = dvc(repo, "metrics", "show", "--json")
    assert shown.returncode == 0 and "top_2_accuracy" in shown.stdout
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.stage = 'evaluate'")
    by_model = {r.data.tags["model"]: r for r in runs}
    assert set(by_model) == set(metrics)
    seed = by_model["seed_mnist"]
    assert seed.data.tags["evaluated_run_id"] == metrics["seed_mnist"]["mlflow_run_id"]
    assert seed.data.metrics["test_top_2_accuracy"] == pytest.approx(metrics["seed_mnist"]["top_2_accuracy"])
    assert "is not in this tracking store" in result.stdout


@pytest.mark.slow
def test_training_runs_carry_their_tags_and_augmentation(repro):
    """Every training run is tied to its code (git commit, dirty flag), its data (hash), its DVC stage, and
    carries the augmentation pipeline that ran and its preview."""
    from mlflow import MlflowClient

    repo, _ = repro
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    data_hash = json.loads((repo / "data/prepared/meta.json").read_text())["data_hash"]
    scratch_id = json.loads((repo / "metrics/train_scratch.json").read_text())["mlflow_run_id"]
    transfer = json.loads((repo / "metrics/transfer_learn.json").read_text())
    runs = {"train_scratch": client.get_run(scratch_id),
            "transfer_learn": client.get_run(transfer["saved_models"]["fine_tuning"]["mlflow_run_id"])}
    for stage, run in runs.items():
        tags = run.data.tags
        assert tags["git_commit"] == head and tags["git_dirty"] == "false", stage
        assert tags["data_hash"] == data_hash and tags["dvc_stage"] == stage and tags["stage"] == stage
    saved = (repo / "data/augmented/pipeline.json").read_bytes()
    logged = client.download_artifacts(scratch_id, "augmentation", str(repo.parent / "artifacts"))
    assert (Path(logged) / "pipeline.json").read_bytes() == saved  # the pipeline that ran, as the stage saved it
    assert (Path(logged) / "preview.png").read_bytes() == (repo / "plots/augment/preview.png").read_bytes()


@pytest.mark.slow
def test_dvc_plots_show_renders_every_declared_plot(repro, tmp_path):
    repo, _ = repro
    result = dvc(repo, "plots", "show", "-o", str(tmp_path / "plots"))
    assert result.returncode == 0, result.stderr[-2000:]
    html = (tmp_path / "plots" / "index.html").read_text()
    declared = yaml.safe_load((repo / "dvc.yaml").read_text())["plots"]
    titles = [next(iter(p)) for p in declared if isinstance(p, dict)]
    images = [p for p in declared if isinstance(p, str) and not (repo / p).is_dir()]
    images += [f.relative_to(repo).as_posix() for p in declared if isinstance(p, str) and (repo / p).is_dir()
               for f in sorted((repo / p).glob("*.png"))]  # a folder of figures: each of them
    assert any(i.startswith("plots/claims/") for i in images)
    for title in titles:  # the vega plots: curves, confusion matrix, crossover
        assert title in html, title
    for image in images:  # the figures, copied next to the page
        name = "static/workspace_" + image.replace("/", "_")
        assert f'src="{name}"' in html and (tmp_path / "plots" / name).stat().st_size > 1000, image
    assert '"predicted"' in html and '"actual"' in html  # the confusion matrix's data is in the page


@pytest.mark.slow
def test_a_dvc_remote_round_trip_and_an_ablation_experiment(repro, tmp_path):
    """The results committed as the baseline, pushed to a remote, cloned and pulled elsewhere: nothing reruns.
    There, `dvc exp run -S augment.enabled=false` is an ablation that `dvc metrics diff` and `dvc params diff`
    show against that baseline, and a queued experiment runs in DVC's temporary copy; each experiment links to
    its MLflow run and back."""
    from mlflow import MlflowClient

    repo = copy_of(repro[0], tmp_path / "repo")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    assert dvc(repo, "remote", "add", "-d", "store", str(tmp_path / "remote")).returncode == 0
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)  # dvc.lock, metrics, plots, reports, .dvc/config
    subprocess.run([*git, "commit", "-qm", "baseline"], cwd=repo, check=True)
    pushed = dvc(repo, "push")
    assert pushed.returncode == 0, pushed.stderr[-2000:]
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    assert not (clone / "models/scratch/model.pt").exists()
    pulled = dvc(clone, "pull")
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    for path in ("models/scratch/model.pt", "data/prepared/dataset.npz", "models/transfer/fine_tuning.pt"):
        assert (clone / path).read_bytes() == (repo / path).read_bytes(), path
    again = dvc(clone, "repro")
    assert again.returncode == 0 and ran(again) == [], again.stdout
    ablation = dvc(clone, "exp", "run", "train_scratch", "-n", "no-augment", "-S", "augment.enabled=false")
    assert ablation.returncode == 0, ablation.stdout[-3000:] + ablation.stderr[-3000:]
    assert ran(ablation) == ["augment", "train_scratch"]
    params_diff = dvc(clone, "params", "diff", "--json").stdout
    enabled = json.loads(params_diff)["params.yaml"]["augment.enabled"]
    assert (enabled["old"], enabled["new"]) == (True, False)
    diff = json.loads(dvc(clone, "metrics", "diff", "--json").stdout)["metrics/train_scratch.json"]
    before = json.loads((repo / "metrics/train_scratch.json").read_text())
    after = json.loads((clone / "metrics/train_scratch.json").read_text())
    assert diff["final_train_loss"] == {"old": before["final_train_loss"], "new": after["final_train_loss"],
                                        "diff": pytest.approx(after["final_train_loss"] - before["final_train_loss"])}
    assert after["final_train_loss"] != before["final_train_loss"]
    client = MlflowClient(f"sqlite:///{clone / 'mlflow.db'}")
    run = client.get_run(after["mlflow_run_id"])
    assert run.data.params["augment.enabled"] == "False" and run.data.tags["dvc_experiment"] == "no-augment"
    # A queued experiment (DVC's way to run a grid: celery workers) runs in a temporary copy under
    # .dvc/tmp/exps/ that DVC deletes afterwards, as --temp ones do: its run must land in the clone's own store.
    queued = dvc(clone, "exp", "run", "--queue", "train_scratch", "-n", "lr-queued", "-S", "train.lr=0.003")
    assert queued.returncode == 0, queued.stderr[-2000:]
    run_all = dvc(clone, "exp", "run", "--run-all")
    dvc(clone, "queue", "stop")
    assert run_all.returncode == 0, run_all.stdout[-3000:] + run_all.stderr[-3000:]
    shown = json.loads(dvc(clone, "exp", "show", "--json").stdout)
    experiments = {rev["name"]: rev["data"] for baseline in shown for exp in baseline.get("experiments") or []
                   for rev in exp["revs"]}
    assert {"no-augment", "lr-queued"} <= set(experiments)
    ids = [e.experiment_id for e in client.search_experiments()]
    in_store = {r.info.run_id: r for r in client.search_runs(ids, "tags.stage = 'train_scratch'")}
    for name, key, value in (("no-augment", "augment.enabled", "False"), ("lr-queued", "train.lr", "0.003")):
        run_id = experiments[name]["metrics"]["metrics/train_scratch.json"]["data"]["mlflow_run_id"]
        assert run_id in in_store, f"{name}: its run is not in the clone's store"  # DVC experiment -> MLflow run
        run = in_store[run_id]
        assert run.data.tags["dvc_experiment"] == name and run.data.params[key] == value  # and back
        assert run.info.status == "FINISHED"
    assert experiments["lr-queued"]["params"]["params.yaml"]["data"]["train"]["lr"] == 0.003
    assert len([r for r in in_store.values() if r.data.tags.get("dvc_experiment") == "lr-queued"]) == 1
    assert not list((clone / ".dvc" / "tmp" / "exps").rglob("mlflow.db"))
    # A queued experiment starts from the workspace, which the ablation left with augment.enabled false: the two
    # experiments differ in the learning rate alone.
    between = json.loads(dvc(clone, "params", "diff", "lr-queued", "no-augment", "--json").stdout)["params.yaml"]
    assert set(between) == {"train.lr"} and between["train.lr"]["old"] == 0.003


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


def copy_of(repro_repo: Path, dest: Path, with_store: bool = False) -> Path:
    """A copy of the reproduced repository: with a new MLflow store, or with a copy of the store whose paths
    are moved to the copy (a store copied as it is refuses to write into the original's tree)."""
    import sqlite3

    shutil.copytree(repro_repo, dest, symlinks=True,
                    ignore=None if with_store else shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    if with_store:
        old, new = repro_repo.as_posix(), dest.as_posix()
        with sqlite3.connect(dest / "mlflow.db") as db:
            tables = [r[0] for r in db.execute("select name from sqlite_master where type = 'table'")]
            for table in tables:
                for column in [c[1] for c in db.execute(f"pragma table_info('{table}')") if "CHAR" in c[2].upper()
                               or "TEXT" in c[2].upper()]:
                    db.execute(f"update '{table}' set \"{column}\" = replace(\"{column}\", ?, ?) "
                               f"where \"{column}\" like ?", (old, new, f"%{old}%"))
    return dest


def edit_params(repo: Path, **sections) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in sections.items():
        params[section] |= values
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def copy_with_train(repro_repo: Path, dest: Path, **train) -> Path:
    """A copy of the reproduced repository (its own MLflow store) with params.train edited."""
    edit_params(copy_of(repro_repo, dest), train=train)
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


@pytest.mark.slow
def test_every_params_key_a_training_reads_is_in_its_runs_params(repro):
    """No hidden knob: each training stage's MLflow runs (with their parent, for a sweep) log every params key of
    the sections dvc.yaml says the stage reads (mlflow.* names where runs go, not how they train)."""
    from mlflow import MlflowClient

    from pipeline.params import flatten, load

    repo, _ = repro
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    p = load(repo / "params.yaml")
    declared = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    checked = 0
    for stage in ("augment", "augment_photos", "train_scratch", "transfer_learn", "transfer_photos", "compare",
                  "claims"):
        sections = [s for s in declared[stage]["params"] if s != "mlflow"]
        keys = set(flatten({s: getattr(p, s) for s in sections}))
        runs = client.search_runs(experiments, f"tags.stage = '{stage}'")
        parents = {r.info.run_id: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags] or list(parents.values())
        assert children, stage
        for run in children:
            parent = parents.get(run.data.tags.get("mlflow.parentRunId"))
            logged = set(run.data.params) | (set(parent.data.params) if parent else set())
            assert keys <= logged, (stage, run.info.run_name, sorted(keys - logged)[:5])
            checked += 1
    assert checked >= 20


@pytest.mark.slow
def test_models_ship_with_cards_onnx_int8_and_gradcam(repro):
    """evaluate: every model's card (its own figures) as its registered version's description; each champion
    as ONNX giving PyTorch's predictions in onnxruntime, logged beside the model; the seed CNN in int8 beside
    fp32. explain: Grad-CAM of every model. claims: the report's rows."""
    from mlflow import MlflowClient

    repo, _ = repro
    evaluate = json.loads((repo / "metrics/evaluate.json").read_text())
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    for name, result in evaluate.items():
        if name == "onnx":
            continue
        text = (repo / f"reports/evaluate/{name}/model_card.md").read_text()
        assert f"| accuracy | {result['accuracy']:.4f} |" in text and "## How to get started" in text
        version = client.search_model_versions(f"run_id = '{result['mlflow_run_id']}'")[0]
        assert version.description == text  # what the MLflow UI shows on the version's page
        assert client.get_run(result["mlflow_run_id"]).data.tags["mlflow.note.content"] == text
        assert (repo / f"plots/explain/gradcam_{name}.png").stat().st_size > 5000
    onnx = evaluate["onnx"]
    assert {r["registered_model"] for r in onnx.values()} == {"cnn-pipeline-scratch", "cnn-pipeline-transfer",
                                                             "cnn-pipeline-transfer-photos"}
    for name, r in onnx.items():
        assert r["accuracy_onnx"] == r["accuracy_torch"] == pytest.approx(evaluate[name]["accuracy"], abs=1e-6)
        assert r["max_abs_logit_diff"] < 1e-3 and (repo / f"models/onnx/{r['registered_model']}.onnx").exists()
        run = evaluate[name]["mlflow_run_id"]
        assert "onnx/" + f"{r['registered_model']}.onnx" in {a.path for a in client.list_artifacts(run, "onnx")}
    seed = evaluate["seed_mnist"]
    assert seed["int8_weights_mb"] < 0.35 * seed["fp32_weights_mb"]
    assert abs(seed["int8_accuracy"] - seed["accuracy"]) <= 0.1 and seed["int8_agreement"] >= 0.8
    report = (repo / "reports/claims.md").read_text()
    claims = json.loads((repo / "metrics/claims.json").read_text())
    rows = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| #")]
    assert len(rows) == len([c for c in claims if not c.startswith("_")]) + 2  # + transfer, both tasks
    assert "Transfer learning pays off with small data (§7), photos" in report
