"""explain: the figures exist with the expected sizes and land in the scratch model's MLflow run."""

from __future__ import annotations

from PIL import Image

from pipeline.models import checkpoint
from pipeline.models.classifier import Classifier
from pipeline.models.cnn import CNN, PRESETS
from tests.conftest import make_repo_copy, run_module


def test_explain_writes_and_logs_figures(tmp_path, mlflow_store, tiny_prepared):
    import mlflow
    from mlflow import MlflowClient

    repo = make_repo_copy(tmp_path / "repo")
    tiny_prepared.save(repo / "data" / "prepared")
    run = MlflowClient(mlflow_store).create_run(mlflow.create_experiment("explain-test"))
    model = Classifier(CNN(PRESETS["seed_mnist"], 1, 28, 10), tiny_prepared.mean, tiny_prepared.std, 1)
    checkpoint.save(repo / "models/scratch/model.pt", model,
                    checkpoint.cnn_arch(PRESETS["seed_mnist"], 1, 28, 10),
                    {"stage": "train_scratch", "name": "seed_mnist", "image_size": 28, "class_ids": list(range(10)),
                     "class_names": tiny_prepared.class_names, "mlflow_run_id": run.info.run_id})
    result = run_module("pipeline.stages.explain", repo, env={"MLFLOW_TRACKING_URI": mlflow_store})
    assert result.returncode == 0, result.stderr
    out = repo / "plots/explain"
    with Image.open(out / "classic_filters.png") as img:
        assert img.width > 600 and img.height > 300  # 3 rows x 7 columns
    with Image.open(out / "first_layer_filters.png") as img:
        assert img.width > 400
    for name in ("pooling.png", "feature_maps_0.png", "layers.csv"):
        assert (out / name).stat().st_size > 100, name
    logged = {a.path for a in MlflowClient(mlflow_store).list_artifacts(run.info.run_id, "explain")}
    assert {"explain/classic_filters.png", "explain/feature_maps_0.png", "explain/layers.csv"} <= logged
