"""explain: on the trained CNN, the figures exist with the expected sizes and land in the model's MLflow run."""

from __future__ import annotations

import torch
from PIL import Image

from tests.conftest import ready_to_train


def test_explain_draws_the_trained_models_filters_and_logs_the_figures(tmp_path, mlflow_store, tiny_prepared,
                                                                       run_stage):
    from mlflow import MlflowClient

    from pipeline.models import loading
    from pipeline.models.cnn import CNN, PRESETS
    from pipeline.training.fit import seed_all

    repo = ready_to_train(tmp_path / "repo", tiny_prepared)
    assert run_stage(repo, "train_scratch").code == 0
    result = run_stage(repo, "explain")
    assert result.code == 0, result.err
    out = repo / "plots/explain"
    with Image.open(out / "classic_filters.png") as img:
        assert img.width > 600 and img.height > 300  # 3 rows x 7 columns
    with Image.open(out / "first_layer_filters.png") as img:
        assert img.width > 400
    for name in ("pooling.png", "feature_maps_0.png", "layers.csv"):
        assert (out / name).stat().st_size > 100, name
    # The filters drawn are learned ones: the model file's first convolution moved away from its initialization.
    model, meta, _ = loading.load(repo / "models/scratch/model.pt")
    seed_all(42)
    initial = CNN(PRESETS["seed_mnist"], 1, 28, 10).features[0].weight
    learned = model.net.features[0].weight
    assert learned.shape == initial.shape and not torch.allclose(learned, initial)
    logged = {a.path for a in MlflowClient(mlflow_store).list_artifacts(meta.mlflow_run_id, "explain")}
    assert {"explain/classic_filters.png", "explain/first_layer_filters.png", "explain/feature_maps_0.png",
            "explain/layers.csv"} <= logged
