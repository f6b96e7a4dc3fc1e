"""prepare: sources, corrupt files, mixed modes, stratified deterministic splits, the prepared format."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.data.prepared import PreparedData, build_prepared, stratified_split
from pipeline.data.sources import load_folder, load_torchvision
from pipeline.errors import PipelineError
from tests.conftest import REPO, run_module, write_image


def make_folder(root, per_class=8):
    modes = ["L", "RGB", "RGBA"]
    for c, name in enumerate(["cat", "dog", "fox"]):
        for i in range(per_class):
            write_image(root / name / f"{i}.png", modes[(i + c) % 3], (20 + i, 16 + 2 * i), value=c * 100 + i)
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (root / "fox" / "notes.txt").write_text("ignored: not an image")


def test_folder_skips_corrupt_and_normalizes_modes(tmp_path):
    make_folder(tmp_path / "raw")
    raw = load_folder(tmp_path / "raw", 24, 3, on_corrupt="skip")
    assert raw.class_names == ["cat", "dog", "fox"]
    assert raw.images.shape == (24, 24, 24, 3) and raw.images.dtype == np.uint8
    assert raw.skipped == [(tmp_path / "raw" / "dog" / "broken.png").as_posix()]
    gray = load_folder(tmp_path / "raw", 16, 1, on_corrupt="skip")
    assert gray.images.shape == (24, 16, 16, 1)


def test_folder_corrupt_fails_when_asked(tmp_path):
    make_folder(tmp_path / "raw")
    with pytest.raises(PipelineError, match=r"corrupt image .*dog/broken.png"):
        load_folder(tmp_path / "raw", 24, 3, on_corrupt="fail")


def test_empty_class_and_empty_folder_are_errors(tmp_path):
    with pytest.raises(PipelineError, match="no class folders"):
        (tmp_path / "raw").mkdir()
        load_folder(tmp_path / "raw", 24, 3, "skip")
    make_folder(tmp_path / "raw")
    (tmp_path / "raw" / "empty").mkdir()
    with pytest.raises(PipelineError, match=r"class folder .*empty has no images"):
        load_folder(tmp_path / "raw", 24, 3, "skip")


def test_class_below_minimum_is_an_error(digits):
    keep = np.concatenate([np.flatnonzero(digits.labels != 3), np.flatnonzero(digits.labels == 3)[:2]])
    with pytest.raises(PipelineError, match="class '3' has 2 images; data.min_per_class is 5"):
        build_prepared(digits.images[keep], digits.labels[keep], digits.class_names, (0.7, 0.15, 0.15), 0, 5)


def test_split_is_deterministic_stratified_and_disjoint(digits):
    a = stratified_split(digits.labels, (0.7, 0.15, 0.15), seed=7)
    b = stratified_split(digits.labels, (0.7, 0.15, 0.15), seed=7)
    c = stratified_split(digits.labels, (0.7, 0.15, 0.15), seed=8)
    assert all(np.array_equal(a[s], b[s]) for s in a)
    assert not np.array_equal(a["train"], c["train"])
    all_idx = np.concatenate(list(a.values()))
    assert len(all_idx) == len(set(all_idx)) == len(digits.labels)
    for split, ratio in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        counts = np.bincount(digits.labels[a[split]], minlength=10)
        expected = np.bincount(digits.labels, minlength=10) * ratio
        assert np.all(np.abs(counts - expected) <= 1.5), (split, counts, expected)


def test_prepared_roundtrip_and_stats(tmp_path, tiny_prepared):
    tiny_prepared.save(tmp_path)
    loaded = PreparedData.load(tmp_path)
    assert loaded.class_names == tiny_prepared.class_names
    assert all(np.array_equal(loaded.x[s], tiny_prepared.x[s]) for s in ("train", "val", "test"))
    expected_mean = tiny_prepared.x["train"].astype(float).mean() / 255
    assert loaded.mean[0] == pytest.approx(expected_mean, abs=1e-5)
    assert loaded.data_hash == tiny_prepared.data_hash


def test_torchvision_offline_message_names_files(tmp_path):
    with pytest.raises(PipelineError) as err:
        load_torchvision("mnist", tmp_path, 28, 1)
    assert "put train-images-idx3-ubyte" in str(err.value)
    assert f"{tmp_path.as_posix()}/MNIST/raw/" in str(err.value)


def test_prepare_stage_on_a_folder(tmp_path):
    make_folder(tmp_path / "data" / "raw")
    params = (REPO / "params.yaml").read_text().replace("source: embedded ", "source: folder ")
    params = params.replace("image_size: 28 ", "image_size: 20 ").replace("channels: 1 ", "channels: 3 ")
    params = params.replace("min_per_class: 5 ", "min_per_class: 3 ")
    (tmp_path / "params.yaml").write_text(params)
    result = run_module("pipeline.stages.prepare", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "skipped unreadable image" in result.stdout and "broken.png" in result.stdout
    metrics = json.loads((tmp_path / "metrics/data.json").read_text())
    assert metrics["skipped_files"] == 1 and metrics["num_classes"] == 3
    assert sum(metrics["total"].values()) == 24
    data = PreparedData.load(tmp_path / "data/prepared")
    assert data.x["train"].shape[1:] == (20, 20, 3)
    assert (tmp_path / "plots/prepare/samples.png").stat().st_size > 1000
