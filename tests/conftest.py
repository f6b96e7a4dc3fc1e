"""Fixtures: tiny real data (generated images, the embedded digits), a private MLflow store, a repo copy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
# The files that take longest (`pytest --durations=0`, summed per file), longest first. xdist hands out whole
# files (--dist loadfile) in collection order (--no-loadscope-reorder), so these start first and the short
# files fill in around them: the longest-first rule that keeps two workers busy to the end. Others keep
# pytest's order after them.
LONGEST_FIRST = ("test_pipeline_e2e.py", "test_scale.py", "test_reliability.py", "test_training.py",
                 "test_benchmarks.py", "test_transfer.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order inside a file stays


def run_module(module: str, cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m module` the way DVC does, in `cwd`: against that folder's own MLflow store unless `env`
    names one."""
    inherited = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env = inherited | {"CI": "true"} | (env or {})
    return subprocess.run([PYTHON, "-m", module, *args], cwd=cwd, capture_output=True, text=True, env=full_env,
                          timeout=900)


@dataclass
class StageRun:
    code: int
    out: str
    err: str

    # the names of subprocess.CompletedProcess, for tests that ran stages as processes before
    returncode = property(lambda self: self.code)
    stdout = property(lambda self: self.out)
    stderr = property(lambda self: self.err)


@pytest.fixture
def run_stage(monkeypatch, capsys):
    """A stage's main() in process, in `folder`, as `python -m pipeline.stages.<stage> [args]` would run it there
    (params.yaml read and checked, one-line errors and their exit codes; an uncaught exception is exit 1 and its
    traceback on stderr, as the interpreter does), without a new interpreter: the tests that are about what a
    stage does, not about DVC or a process, need not pay torch's import each time. `stage` may also name another
    entry point by its module (`benchmarks.time_to_accuracy`)."""
    import importlib
    import inspect
    import signal
    import traceback

    def run(folder: Path, stage: str, *args: str, env: dict | None = None) -> StageRun:
        monkeypatch.chdir(folder)  # the folder's own store, unless the test's (mlflow_store) or env names one
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        module = importlib.import_module(stage if "." in stage else f"pipeline.stages.{stage}")
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        capsys.readouterr()
        code, crash = 0, ""
        try:
            takes_argv = "argv" in inspect.signature(module.main).parameters
            code = (module.main(list(args)) if takes_argv else module.main()) or 0
        except SystemExit as exit_:
            code = int(exit_.code or 0)
        except Exception:
            code, crash = 1, traceback.format_exc()
        finally:  # stage_main installs its own signal handlers: pytest gets its own back
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        captured = capsys.readouterr()
        return StageRun(code, captured.out, captured.err + crash)

    return run


@pytest.fixture(autouse=True)
def _restore_tracking_uri():
    """mlflow.set_tracking_uri() writes MLFLOW_TRACKING_URI into os.environ; no test may leak it to the next."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
    import mlflow

    mlflow.set_tracking_uri(before or "")
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A private SQLite MLflow store for one test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    return uri


@pytest.fixture(scope="session")
def digits():
    """The embedded digits at 28x28x1: real images, offline."""
    from pipeline.data.sources import load_embedded

    return load_embedded(28, 1)


@pytest.fixture(scope="session")
def tiny_prepared(digits):
    """A prepared data set of 20 digits per class."""
    from pipeline.data.prepared import build_prepared

    data = build_prepared(digits.images, digits.labels, digits.class_names, (0.6, 0.2, 0.2), seed=0,
                          min_per_class=5, max_per_class=20)
    data.source = "embedded"
    return data


def make_repo_copy(dest: Path, profile: str | None = "tiny") -> Path:
    """A git + DVC copy of the project's tracked files (no outputs, no store), optionally with a profile."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    if profile:
        subprocess.run([PYTHON, "-m", "pipeline.params", "apply-profile", profile], cwd=dest, check=True,
                       capture_output=True)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=dest, check=True)
    return dest


def write_image(path: Path, mode: str, size: tuple[int, int], value: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    arr = rng.integers(0, 255, size=(size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(arr[..., 0] if channels == 1 else arr, mode).save(path)


def ready_to_train(dest: Path, data, profile: str = "tiny") -> Path:
    """A folder where train_scratch can run, made in process (no prepare/augment subprocesses): params.yaml with
    the profile, dvc.yaml, `data` as the prepared data and the augmentation pipeline params.yaml describes."""
    from pipeline.data import augment as aug
    from pipeline.params import apply_profile, load

    dest.mkdir(parents=True, exist_ok=True)
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy2(REPO / name, dest / name)
    apply_profile(profile, dest / "params.yaml")
    data.save(dest / "data" / "prepared")
    p = load(dest / "params.yaml")
    aug.save(aug.build(p.augment, p.seed), dest / "data" / "augmented" / "pipeline.json")
    return dest


def save_seed_model(path: Path, mean=(0.13,), std=(0.31,), run_id: str | None = None, class_names=None,
                    **meta) -> None:
    """An untrained seed_mnist model file, as train_scratch writes one (meta fields overridable)."""
    from pipeline.models import checkpoint
    from pipeline.models.cnn import CNN, PRESETS, Classifier

    model = Classifier(CNN(PRESETS["seed_mnist"], 1, 28, 10), list(mean), list(std), 1)
    record = {"stage": "train_scratch", "name": "seed_mnist", "task": "digits",
              "class_names": class_names or [str(c) for c in range(10)], "class_ids": list(range(10)),
              "image_size": 28, "mlflow_run_id": run_id} | meta
    checkpoint.save(path, model, checkpoint.cnn_arch(PRESETS["seed_mnist"], 1, 28, 10), checkpoint.ModelMeta(**record))
