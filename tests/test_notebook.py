"""The practice notebook runs top to bottom (a real Jupyter kernel), with and without a trained model."""

from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO

NOTEBOOK = REPO / "notebooks" / "cnn_practice.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.parametrize("trained", [False, True])
def test_notebook_executes_top_to_bottom(tmp_path, monkeypatch, trained, tiny_prepared):
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend turns figures into outputs
    if trained:
        from tests.conftest import save_seed_model

        save_seed_model(tmp_path / "models/scratch/model.pt")
        tiny_prepared.save(tmp_path / "data/prepared")  # the Grad-CAM cell's test digits
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "largest difference:" in text and "= 421642" in text
    figures = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert figures == (4 if trained else 2)  # trained: learned filters and feature maps, Grad-CAM
    assert ("no trained model yet" in text) is not trained
