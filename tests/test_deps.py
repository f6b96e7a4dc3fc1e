"""dvc.yaml declares the code each stage runs: derived from imports, checked on every test run."""

from __future__ import annotations

import shutil

import yaml

from pipeline import deps
from tests.conftest import REPO


def test_every_stage_lists_every_pipeline_file_it_imports():
    assert deps.missing() == {}


def test_a_stage_that_imports_an_unlisted_file_is_caught(tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    dvc["stages"]["train_scratch"]["deps"].remove("pipeline/models/checkpoint.py")
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc))
    # A new helper imported only inside a function body still counts: the stage runs it.
    (root / "pipeline" / "helper.py").write_text("X = 1\n")
    with open(root / "pipeline" / "evaluation.py", "a") as fh:
        fh.write("\n\ndef _uses_helper():\n    from pipeline import helper\n\n    return helper.X\n")
    lacking = deps.missing(root / "dvc.yaml", root)
    assert "pipeline/models/checkpoint.py" in lacking["train_scratch"]
    assert "pipeline/helper.py" in lacking["evaluate"] and "pipeline/helper.py" in lacking["compare"]
    assert "train_scratch" not in lacking or "pipeline/helper.py" not in lacking["train_scratch"]
    deps.write(root / "dvc.yaml", root)
    assert deps.missing(root / "dvc.yaml", root) == {}


def test_granularity_an_evaluation_edit_does_not_rerun_training():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert "pipeline/evaluation.py" not in stages["train_scratch"]["deps"]
    assert "pipeline/stages/evaluate.py" not in stages["train_scratch"]["deps"]
    assert "pipeline/data/sources.py" in stages["prepare"]["deps"]
    assert not any(d.startswith("pipeline/training") for d in stages["prepare"]["deps"])


def test_outputs_are_read_from_dvc_yaml():
    import os

    from pipeline.deps import outputs

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        assert [str(p) for p in outputs("train_scratch")] == [
            "models/scratch", "plots/train_scratch.csv", "plots/train_scratch/learning_curves.png",
            "metrics/train_scratch.json"]
        assert outputs("no_such_stage") == []
    finally:
        os.chdir(cwd)
