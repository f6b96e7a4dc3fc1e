"""Nothing lost: a diverged, interrupted or misconfigured stage stops with one line, a non-zero exit, the
previous outputs in place and no MLflow run left RUNNING."""

from __future__ import annotations

import contextlib
import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import PYTHON, ready_to_train


@pytest.fixture(scope="module")
def prepared_repo(tmp_path_factory, tiny_prepared):
    """A tiny-profile folder ready for train_scratch, made in process (tests copy it, never write into it)."""
    return ready_to_train(tmp_path_factory.mktemp("reliability") / "repo", tiny_prepared)


@pytest.fixture
def repo(prepared_repo, tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(prepared_repo, copy, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    return copy  # with a store of its own: a copied store refuses to write into the original tree


def edit_params(repo, **sections) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in sections.items():
        params[section] |= values
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def start_training(repo, until: str, stderr=subprocess.STDOUT, drain: bool = True,
                   stage: str = "train_scratch") -> subprocess.Popen:
    """A training stage in the background, returned once its output shows a line starting with `until`; the rest
    of its output is read by a thread (`drain`), so that a full pipe never blocks it while a test waits."""
    import threading

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"CI": "true"}
    proc = subprocess.Popen([PYTHON, "-m", f"pipeline.stages.{stage}"], cwd=repo, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=stderr)
    for line in proc.stdout:
        if line.startswith(until):
            break
    if drain:
        threading.Thread(target=proc.stdout.read, daemon=True).start()
    return proc


def pause_outside_a_store_write(proc: subprocess.Popen, store) -> None:
    """SIGSTOP the process at a moment it holds no lock on the SQLite store (else the other training would wait
    on a stopped process): stop, try an exclusive transaction, and resume and retry while it is taken."""
    import sqlite3

    for _ in range(200):
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            with sqlite3.connect(store, timeout=0) as db:
                db.execute("BEGIN EXCLUSIVE")
                db.rollback()
            return
        except sqlite3.OperationalError:
            os.kill(proc.pid, signal.SIGCONT)
            time.sleep(0.02)
    raise AssertionError(f"{store} stayed locked by the training")


def run_statuses(repo, stage: str = "train_scratch") -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return [r.info.status for r in runs if r.info.run_name.startswith(stage)]


def test_a_diverged_training_publishes_nothing(repo, run_stage):
    (repo / "models/scratch").mkdir(parents=True)
    (repo / "models/scratch/model.pt").write_bytes(b"the previous good model")
    edit_params(repo, train={"lr": 10.0, "optimizer": "sgd", "scheduler": "none", "warmup_epochs": 0})
    result = run_stage(repo, "train_scratch")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(r"error: training diverged: (train|val)_loss is nan at epoch \d+ \(lr 10\)",
                                        lines[0]), lines
    assert (repo / "models/scratch/model.pt").read_bytes() == b"the previous good model"
    assert not (repo / "metrics/train_scratch.json").exists()
    assert run_statuses(repo) == ["FAILED"]


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_stage_with_its_exit_code_and_keeps_the_outputs(repo, signum, code):
    (repo / "models/scratch").mkdir(parents=True)
    (repo / "models/scratch/model.pt").write_bytes(b"the previous good model")
    edit_params(repo, train={"epochs": 200, "early_stopping": {"enabled": False, "patience": 5}})
    proc = start_training(repo, "epoch 1/", stderr=subprocess.PIPE, drain=False)  # training has started
    proc.send_signal(signum)
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == (f"interrupted by {signal.Signals(signum).name}; previous outputs "
                                               "are kept")
    assert (repo / "models/scratch/model.pt").read_bytes() == b"the previous good model"
    assert not (repo / "metrics/train_scratch.json").exists()
    time.sleep(0.5)
    assert run_statuses(repo) and "RUNNING" not in run_statuses(repo)


@pytest.mark.slow
def test_a_signal_stops_a_pooled_sweep_and_its_worker_processes(repo):
    """SIGTERM during the transfer sweep's pool: the stage exits 143 with its line, its worker processes are
    gone (none left training as orphans), nothing is written and no run is left RUNNING."""
    import psutil

    edit_params(repo, transfer={"target_per_class": [3], "seeds": 4, "cnn_steps": 10**7, "head_steps": 4, "steps": 2},
                trainer={"sweep_workers": 2})
    proc = start_training(repo, "transfer_learn: 12 trainings (4 points) in 2 processes", stderr=subprocess.PIPE,
                          drain=False, stage="transfer_learn")
    workers = []
    for _ in range(100):
        workers = psutil.Process(proc.pid).children(recursive=True)
        if len(workers) >= 2:
            break
        time.sleep(0.1)
    assert len(workers) == 2, workers
    proc.send_signal(signal.SIGTERM)
    try:
        try:
            _, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # the trainings are endless: a stage waiting for them never ends
            pytest.fail("the stage did not stop: it waits for its workers' trainings")
        _, alive = psutil.wait_procs(workers, timeout=10)
    finally:
        proc.kill()
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
    assert not alive, alive
    assert proc.returncode == 143, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "interrupted by SIGTERM; previous outputs are kept"
    assert not (repo / "metrics/transfer_learn.json").exists() and not (repo / "models/transfer").exists()
    time.sleep(0.5)
    assert run_statuses(repo, "transfer_learn/sweep") == ["KILLED"]  # the sweep's run, ended as the stage was


def test_a_gpu_accelerator_without_a_gpu_is_one_line(repo, run_stage):
    edit_params(repo, trainer={"accelerator": "gpu"})
    result = run_stage(repo, "train_scratch")
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: trainer.accelerator=gpu: this machine has no CUDA GPU (use auto, "
                                     "which picks the GPU when there is one, or cpu)")


def test_empty_params_file_is_an_error(repo, run_stage):
    (repo / "params.yaml").write_text("# nothing here\n")
    result = run_stage(repo, "train_scratch")
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: params.yaml: empty (expected the sections seed, data, augment, model, "
                                     "train, transfer, photos, augment_photos, transfer_photos, evaluate, compare, explain, "
                                     "claims, trainer, mlflow)")


def test_a_model_file_in_the_wrong_folder_is_named(repo, run_stage):
    from tests.conftest import save_seed_model

    save_seed_model(repo / "models/scratch/model.pt", stage="transfer_learn", name="fine_tuning_x",
                    strategy="fine_tuning")
    result = run_stage(repo, "evaluate")
    assert result.code == 2
    assert result.err.strip() == ("error: evaluate: models/scratch/model.pt holds a transfer_learn model of the digits "
                                  "task (fine_tuning_x), not one from train_scratch on digits; rerun `dvc repro -f` "
                                  "of the stage that writes it")
    assert not (repo / "metrics/evaluate.json").exists()


def test_metrics_never_hold_a_bare_nan(tmp_path):
    import json

    from pipeline.atomic import write_json

    write_json(tmp_path / "m.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": 0.5})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": None, "b": [1.0, None], "c": 0.5}


def test_unknown_key_lists_the_allowed_ones():
    from pipeline.errors import PipelineError
    from pipeline.params import parse

    with pytest.raises(PipelineError) as err:
        parse({"train": {"lrr": 0.1}})
    assert str(err.value).startswith("params.yaml: unknown key train.lrr (allowed: optimizer, lr, momentum,")
    assert "epochs, batch_size, early_stopping, limit_train_batches)" in str(err.value)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))


@pytest.mark.parametrize("uri,detail", [
    ("mysql://user@127.0.0.1:9/mlflow", "ModuleNotFoundError: No module named 'MySQLdb'"),
    ("file:///tmp/mlruns", "MlflowException: The filesystem tracking backend"),
])
def test_an_unusable_tracking_store_is_one_line(uri, detail):
    from pipeline import tracking
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError) as err:
        tracking.check_store(uri)
    message = str(err.value)
    assert message.startswith(f"MLflow store {uri} is not usable ({detail}") and "\n" not in message


def test_a_decompression_bomb_is_skipped_or_named(tmp_path, monkeypatch):
    from PIL import Image

    from pipeline.data.sources import load_folder
    from pipeline.errors import PipelineError
    from tests.conftest import write_image

    for i in range(3):
        write_image(tmp_path / "raw" / "a" / f"{i}.png", "L", (8, 8), i)
    write_image(tmp_path / "raw" / "a" / "bomb.png", "L", (100, 100), 9)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses images over twice this: 100x100 is one
    raw = load_folder(tmp_path / "raw", 8, 1, "skip")
    assert raw.skipped == [(tmp_path / "raw" / "a" / "bomb.png").as_posix()] and len(raw.labels) == 3
    with pytest.raises(PipelineError, match=r"corrupt image .*bomb.png: Image size \(10000 pixels\) exceeds"):
        load_folder(tmp_path / "raw", 8, 1, "fail")


def test_outputs_are_published_as_a_set(tmp_path):
    from pipeline.atomic import atomic_set, write_json

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_text("old model")
    write_json(tmp_path / "metrics.json", {"acc": 0.5})
    with pytest.raises(RuntimeError), atomic_set() as stage:
        (stage(tmp_path / "models", folder=True) / "model.pt").write_text("new model")
        write_json(stage(tmp_path / "metrics.json"), {"acc": 0.9})
        raise RuntimeError("killed before the set was complete")
    assert (tmp_path / "models" / "model.pt").read_text() == "old model"
    assert (tmp_path / "metrics.json").read_text().split() == ["{", '"acc":', "0.5", "}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "models"]  # no temporary left over
    with atomic_set() as stage:
        (stage(tmp_path / "models", folder=True) / "model.pt").write_text("new model")
        write_json(stage(tmp_path / "metrics.json"), {"acc": 0.9})
    assert (tmp_path / "models" / "model.pt").read_text() == "new model"
    assert '"acc": 0.9' in (tmp_path / "metrics.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "models"]


def test_a_killed_training_resumes_from_its_last_epoch(repo, run_stage):
    import json

    from mlflow import MlflowClient

    edit_params(repo, train={"epochs": 4, "early_stopping": {"enabled": False, "patience": 5}})
    proc = start_training(repo, "epoch 2/4")
    proc.kill()  # kill -9: no handler runs
    proc.wait(timeout=60)
    folders = list((repo / ".cache/checkpoints").glob("resume-train_scratch-*"))
    assert len(folders) == 1 and (folders[0] / "last.ckpt").exists()
    killed_run = (folders[0] / "mlflow_run_id").read_text()
    result = run_stage(repo, "train_scratch")
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = re.search(r"resuming after epoch ([123]) from .*last.ckpt \(MLflow run " + killed_run, result.stdout)
    assert resumed
    done = int(resumed.group(1))
    # What happened after the resume: only the epochs after the checkpoint trained in this process ...
    trained = [int(m) for m in re.findall(r"^epoch (\d+)/4 ", result.stdout, re.MULTILINE)]
    assert trained == list(range(done + 1, 5)), result.stdout
    metrics = json.loads((repo / "metrics/train_scratch.json").read_text())
    assert metrics["epochs_run"] == 4 and metrics["mlflow_run_id"] == killed_run
    assert [int(r["epoch"]) for r in csv.DictReader(open(repo / "plots/train_scratch.csv"))] == [1, 2, 3, 4]
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    assert client.get_run(killed_run).info.status == "FINISHED"
    # ... and the run's history goes on from the checkpoint: one step per epoch, the last value logged at each
    # step is the published curve's (an epoch the kill cut short after its metrics were logged, but before its
    # checkpoint was written, is trained again and logged again at its step; a silent restart would add 4 more)
    history = sorted(client.get_metric_history(killed_run, "val_acc"), key=lambda m: m.timestamp)
    last_at = {m.step: m.value for m in history}
    assert len(last_at) == 4 and len(history) <= 4 + 1, [(m.step, m.value) for m in history]
    curve = [float(r["val_acc"]) for r in csv.DictReader(open(repo / "plots/train_scratch.csv"))]
    assert [last_at[step] for step in sorted(last_at)] == pytest.approx(curve, abs=1e-6)
    assert not folders[0].exists()  # published: the resume folder is gone
    # Other params start over, and say so.
    edit_params(repo, train={"epochs": 3})
    (folders[0]).mkdir(parents=True)
    (folders[0] / "last.ckpt").write_bytes(b"a stale checkpoint of other params")
    result = run_stage(repo, "train_scratch")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "train_scratch: an interrupted training with other params or data exists; this one starts over" in result.stdout
    assert json.loads((repo / "metrics/train_scratch.json").read_text())["epochs_run"] == 3


def test_two_trainings_at_once_each_publish_their_own_weights(repo, run_stage):
    import json

    import torch
    from mlflow import MlflowClient

    from pipeline.models import loading

    edit_params(repo, train={"epochs": 6, "early_stopping": {"enabled": False, "patience": 5}})
    long = start_training(repo, "epoch 1/6")
    # The long training is paused after its first epoch while a short one with other params runs from start to
    # end, then goes on: both are alive at once, and the long one publishes last (a race-free order: without the
    # pause a fast machine could finish the long one first).
    pause_outside_a_store_write(long, repo / "mlflow.db")
    try:
        edit_params(repo, train={"epochs": 1, "lr": 0.003})
        short = run_stage(repo, "train_scratch")
    finally:
        os.kill(long.pid, signal.SIGCONT)
    assert short.returncode == 0, short.stderr[-2000:]
    short_run = json.loads((repo / "metrics/train_scratch.json").read_text())["mlflow_run_id"]
    assert long.wait(timeout=600) == 0
    long_run = json.loads((repo / "metrics/train_scratch.json").read_text())["mlflow_run_id"]
    assert long_run != short_run
    model, meta, _ = loading.load(repo / "models/scratch/model.pt")
    assert meta.mlflow_run_id == long_run
    # The published weights are the long run's own best checkpoint, as logged to its MLflow run.
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    logged = client.download_artifacts(long_run, "checkpoints/best.ckpt", str(repo))
    state = torch.load(logged, map_location="cpu", weights_only=False)["state_dict"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[f"model.{key}"]), key
    assert client.get_run(long_run).data.params["train.epochs"] == "6"


def test_an_output_folder_that_cannot_be_written_stops_the_stage_before_training(repo, run_stage):
    shutil.rmtree(repo / "metrics", ignore_errors=True)
    (repo / "metrics").write_text("a file where the metrics folder belongs")
    result = run_stage(repo, "train_scratch")
    assert result.returncode == 2
    assert re.fullmatch(r"error: train_scratch: cannot write its output metrics/train_scratch.json \(\w+Error: .*\); "
                        r"make metrics/ writable\n", result.stderr), result.stderr
    assert not (repo / "models/scratch/model.pt").exists() and "epoch 1/" not in result.stdout


def test_a_store_that_cannot_be_written_stops_the_stage_before_training(repo, run_stage):
    store = repo / "mlflow.db"
    result = run_stage(repo, "augment")  # creates the store
    assert result.returncode == 0, result.stderr
    made_immutable = subprocess.run(["chattr", "+i", str(store)], capture_output=True)
    if made_immutable.returncode != 0:
        pytest.skip(f"chattr +i is not permitted here: {made_immutable.stderr.strip()}")
    try:
        result = run_stage(repo, "train_scratch")
    finally:
        subprocess.run(["chattr", "-i", str(store)], check=True)
    assert result.returncode == 2
    assert result.stderr == (f"error: MLflow store sqlite:///{store.resolve().as_posix()}: the database cannot be "
                             f"written (attempt to write a readonly database); make {store.resolve()} writable or "
                             "set MLFLOW_TRACKING_URI to another store\n")
    assert not (repo / "models/scratch/model.pt").exists()


PUBLISHER = """
import sys
from pathlib import Path
from pipeline.atomic import atomic_set, write_json
import time
root, tag, rounds, start = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
time.sleep(max(0.0, start - time.time()))  # both begin at the same moment
for i in range(rounds):
    with atomic_set() as stage:
        folder = stage(root / "models", folder=True)
        for k in range(10):
            (folder / f"part{k}.txt").write_text(f"{tag} {i}")
        write_json(stage(root / "metrics.json"), {"written_by": f"{tag} {i}"})
"""


def test_two_processes_publishing_the_same_outputs_at_once_each_publish_whole_sets(tmp_path):
    """Two stages (or two DVC queue workers) publishing the same output set at the same moment: neither fails,
    and what stays is one publisher's whole set (its folder and its metrics), no scratch folder left behind."""
    import json

    script = tmp_path / "publish.py"
    script.write_text(PUBLISHER)
    out = tmp_path / "out"
    start = str(time.time() + 3)
    procs = [subprocess.Popen([PYTHON, str(script), str(out), tag, "300", start], cwd=tmp_path,
                              stderr=subprocess.PIPE, text=True) for tag in ("a", "b")]
    errors = [proc.communicate(timeout=300)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], errors
    written = {(out / "models" / f"part{k}.txt").read_text() for k in range(10)}
    assert len(written) == 1  # one publisher's folder, whole
    assert json.loads((out / "metrics.json").read_text())["written_by"] == written.pop()  # and its metrics
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "models"]


def test_a_half_written_resume_checkpoint_is_set_aside_and_the_training_starts_over(repo, run_stage):
    """A kill while Lightning writes last.ckpt (a full disk, a power cut) leaves it truncated: the rerun says in
    one line that it starts over and why, keeps the broken file aside, trains from the first epoch."""
    import json

    from mlflow import MlflowClient

    edit_params(repo, train={"epochs": 3, "early_stopping": {"enabled": False, "patience": 5}})
    proc = start_training(repo, "epoch 2/3")
    proc.kill()
    proc.wait(timeout=60)
    (folder,) = (repo / ".cache/checkpoints").glob("resume-train_scratch-*")
    killed_run = (folder / "mlflow_run_id").read_text()
    last = folder / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # torn in the middle of the write
    try:
        result = run_stage(repo, "train_scratch")
    except Exception as exc:  # what a user would see as a traceback
        pytest.fail(f"the rerun raised {type(exc).__name__}: {str(exc)[:200]}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if "cannot be read" in line]
    assert len(lines) == 1, result.stdout
    assert re.fullmatch(r"train_scratch: the checkpoint to resume from cannot be read \(\w+: .*\); it is set aside "
                        r"as (\S+) and this training starts over", lines[0]), lines[0]
    aside = repo / lines[0].split(" set aside as ")[1].split(" and this")[0]
    assert aside.exists() and aside.stat().st_size == last.stat().st_size if last.exists() else aside.exists()
    assert [int(m) for m in re.findall(r"^epoch (\d+)/3 ", result.stdout, re.MULTILINE)] == [1, 2, 3]
    metrics = json.loads((repo / "metrics/train_scratch.json").read_text())
    assert metrics["epochs_run"] == 3 and metrics["mlflow_run_id"] != killed_run  # a new run, from the start
    history = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").get_metric_history(metrics["mlflow_run_id"], "val_acc")
    assert len(history) == 3
