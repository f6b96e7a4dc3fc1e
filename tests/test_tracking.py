"""The MLflow store: where it is (also from a DVC experiment's temporary workspace), and that it stays in its tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import tracking
from pipeline.errors import PipelineError
from pipeline.workspace import repo_root, resolve


def test_store_is_the_repositorys_even_inside_a_dvc_temporary_workspace(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    repo = tmp_path / "repo"
    temporary = repo / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    temporary.mkdir(parents=True)
    monkeypatch.chdir(temporary)
    assert repo_root() == repo
    assert tracking.tracking_uri() == f"sqlite:///{repo.as_posix()}/mlflow.db"
    # Raw data a user placed or downloaded is the repository's too (the copy holds only what git tracks).
    assert resolve("data/raw") == repo / "data" / "raw" and resolve("/abs/raw") == Path("/abs/raw")
    monkeypatch.chdir(repo)
    assert repo_root() == repo


def test_a_moved_store_never_writes_into_the_old_tree(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    old = tmp_path / "old"
    old.mkdir()
    monkeypatch.chdir(old)
    tracking.check_store()
    tracking.ensure_experiment("cnn-pipeline")
    new = tmp_path / "new"
    old.rename(new)
    monkeypatch.chdir(new)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri wrote the old one there
    tracking.check_store()
    with pytest.raises(PipelineError) as err:
        tracking.ensure_experiment("cnn-pipeline")
    message = str(err.value)
    assert f"writes its artifacts to {(old / 'mlartifacts').as_uri()}" in message
    assert "the store was copied or moved" in message and "\n" not in message
    assert not old.exists()
    mlflow.set_tracking_uri("")
