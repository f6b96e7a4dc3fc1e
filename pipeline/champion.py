"""The alias `champion` of a registered model: moved only to a version more accurate on the same test images than
the current champion, which is loaded and measured again (its earlier figure may be on other data), or to a newer
version exactly as accurate. An older version that ties keeps its place: re-evaluating tied versions (a rerun of
evaluate) never moves the alias back and forth."""

from __future__ import annotations

import numpy as np
import torch

from pipeline import tracking
from pipeline.predict import accuracy, predict_proba


def crown(name: str, version: str, acc: float, test: tuple[np.ndarray, np.ndarray, int], data_hash: str,
          device: torch.device, measured: dict[str, float] | None = None) -> str:
    """Tag the version with its test accuracy and move `champion` when it earns it; one line says what happened.
    `test` is (images, labels, image size) of the images `acc` was measured on; `measured`: the test accuracy, on
    these same images, of other models evaluated now, by MLflow run id (a champion among them is not measured
    twice)."""
    import mlflow

    client = tracking.client()
    client.set_model_version_tag(name, version, "test_accuracy", str(acc))
    client.set_model_version_tag(name, version, "test_data_hash", data_hash)
    current = tracking.champion_version(name)
    if current == version:
        return f"{name} v{version} is already the champion (test acc {acc:.4f})"
    if current is None:
        client.set_registered_model_alias(name, "champion", version)
        return f"{name}: v{version} is the first champion (test acc {acc:.4f})"
    champion_run = client.get_model_version(name, current).run_id
    if measured and champion_run in measured:
        champion_acc = measured[champion_run]
    else:
        x, y, size = test
        champion = mlflow.pytorch.load_model(f"models:/{name}@champion", map_location="cpu")
        probs = predict_proba(champion, x, size, device=device)
        if probs.shape[1] != int(y.max()) + 1 and probs.shape[1] != len(np.unique(y)):
            client.set_registered_model_alias(name, "champion", version)
            return f"{name}: champion moves from v{current} (other classes) to v{version} (test acc {acc:.4f})"
        champion_acc = accuracy(probs, y)
    if acc < champion_acc or (acc == champion_acc and int(version) < int(current)):
        return f"{name}: champion stays v{current} (test acc {champion_acc:.4f} on these images; v{version}: {acc:.4f})"
    client.set_registered_model_alias(name, "champion", version)
    return f"{name}: champion moves from v{current} ({champion_acc:.4f}) to v{version} ({acc:.4f})"
