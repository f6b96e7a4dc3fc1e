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


def test_outputs_are_read_from_dvc_yaml(monkeypatch):
    from pipeline.outputs import declared

    monkeypatch.chdir(REPO)
    assert [str(p) for p in declared("train_scratch")] == [
        "models/scratch", "plots/train_scratch.csv", "plots/train_scratch/learning_curves.png",
        "metrics/train_scratch.json"]
    assert declared("no_such_stage") == []


def test_stages_import_what_they_use_and_not_the_deps_tool():
    """A stage's import closure holds what it runs: deps derivation is not among them (an edit there reruns
    nothing), evaluate and compare need no augmentation library and no data module, prepare no torch model."""
    closures = {name: {str(p) for p in deps.closure(deps.stage_module(stage["cmd"]))}
                for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items()}
    assert not any("pipeline/deps.py" in files for files in closures.values())
    for stage in ("evaluate", "explain"):
        assert {"pipeline/data/augment.py", "pipeline/data/datamodule.py"}.isdisjoint(closures[stage]), stage
    assert not any(f.startswith(("pipeline/models/", "pipeline/training/")) for f in closures["prepare"])
    assert "pipeline/models/registry.py" not in closures["train_scratch"]  # writing a model file needs no registry
