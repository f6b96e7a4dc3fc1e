"""augment: the serialized pipeline round-trips, applies to train only, and is reproducible by seed."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch

from pipeline.data import augment as aug
from pipeline.data.datamodule import ImageDataModule
from pipeline.errors import PipelineError
from pipeline.params import AugmentParams, parse


def default_pipeline(seed=0, **overrides):
    return aug.build(AugmentParams(**overrides), seed)


def test_roundtrip_gives_the_same_transforms(tmp_path):
    transform = default_pipeline(coarse_dropout={"p": 0.5}, horizontal_flip=True)
    aug.save(transform, tmp_path / "pipeline.json")
    loaded = aug.load(tmp_path / "pipeline.json", seed=0)
    assert A.to_dict(loaded) == A.to_dict(transform)
    names = [type(t).__name__ for t in loaded.transforms]
    assert names == ["Affine", "HorizontalFlip", "RandomBrightnessContrast", "CoarseDropout"]
    image = np.random.default_rng(0).integers(0, 255, (28, 28, 1), dtype=np.uint8)
    fresh = aug.load(tmp_path / "pipeline.json", seed=5)
    again = aug.load(tmp_path / "pipeline.json", seed=5)
    assert np.array_equal(aug.apply(fresh, image), aug.apply(again, image))


def test_disabled_is_empty():
    assert len(default_pipeline(enabled=False).transforms) == 0


def splits(tiny_prepared):
    return {s: (tiny_prepared.x[s], tiny_prepared.y[s]) for s in ("train", "val", "test")}


def test_train_loader_augments_and_val_does_not(tiny_prepared):
    """Sample by sample: the augmented train loader yields the same images in the same order, with the same
    labels, as the plain one, each with other pixels; val yields the stored pixels untouched."""
    geometric = default_pipeline(affine_p=1.0, rotation_range=30, brightness=0, contrast=0, coarse_dropout={"p": 0})
    dm = ImageDataModule(splits(tiny_prepared), 16, 0, 0, geometric)
    plain = ImageDataModule(splits(tiny_prepared), 16, 0, 0, None)
    augmented_epoch, plain_epoch = list(dm.train_dataloader()), list(plain.train_dataloader())
    assert [len(y) for _, y in augmented_epoch] == [len(y) for _, y in plain_epoch] == [16] * (len(plain_epoch))
    assert torch.equal(torch.cat([y for _, y in augmented_epoch]), torch.cat([y for _, y in plain_epoch]))
    (train_x, train_y), (plain_x, plain_y) = augmented_epoch[0], plain_epoch[0]
    assert torch.equal(train_y, plain_y)  # same samples, same order, batch after batch
    for augmented, original in zip(train_x, plain_x, strict=True):
        assert not torch.equal(augmented, original)  # every sample changed (affine_p=1.0)
        # ... by a geometric transform of the same digit, not replaced by another image: most ink stays
        assert abs(float(augmented.sum() - original.sum())) < 0.35 * float(original.sum())
    val_x, val_y = next(iter(dm.val_dataloader()))
    expected_val = torch.from_numpy(tiny_prepared.x["val"][:16]).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(val_x, expected_val)  # val: pixels untouched, in stored order
    assert val_y.tolist() == tiny_prepared.y["val"][:16].tolist()


@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_same_augmented_batch(tiny_prepared, workers):
    def first_batch(seed):
        dm = ImageDataModule(splits(tiny_prepared), 16, workers, seed, default_pipeline(seed, affine_p=1.0))
        return next(iter(dm.train_dataloader()))[0]

    assert torch.equal(first_batch(3), first_batch(3))
    assert not torch.equal(first_batch(3), first_batch(4))


def test_bad_augment_params_are_one_line():
    with pytest.raises(PipelineError, match=r"augment.rotation_range must be >= 0.0 \(got -10\)"):
        parse({"augment": {"rotation_range": -10}})
    with pytest.raises(PipelineError, match=r"augment.coarse_dropout.p must be <= 1.0 \(got 2\)"):
        parse({"augment": {"coarse_dropout": {"p": 2}}})
    with pytest.raises(PipelineError, match="unknown key augment.solarize"):
        parse({"augment": {"solarize": True}})


def test_missing_or_corrupt_pipeline_file(tmp_path):
    with pytest.raises(PipelineError, match="no augmentation pipeline"):
        aug.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('{"transform": {"__class_fullname__": "NoSuchTransform"}}')
    with pytest.raises(PipelineError, match="not a valid albumentations pipeline"):
        aug.load(tmp_path / "bad.json")


def test_augment_stage_saves_the_pipeline_its_params_describe_and_logs_it(tmp_path, mlflow_store, tiny_prepared):
    import yaml
    from mlflow import MlflowClient
    from PIL import Image

    from pipeline.params import load
    from tests.conftest import make_repo_copy, run_module

    repo = make_repo_copy(tmp_path / "repo")  # tiny profile: 2 preview rows of 1 original + 3 views
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["augment"] |= {"rotation_range": 7, "horizontal_flip": True, "coarse_dropout": {"p": 0.4}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    tiny_prepared.save(repo / "data" / "prepared")
    result = run_module("pipeline.stages.augment", repo, env={"MLFLOW_TRACKING_URI": mlflow_store})
    assert result.returncode == 0, result.stderr
    saved = aug.load(repo / "data/augmented/pipeline.json", seed=0)
    p = load(repo / "params.yaml")
    assert A.to_dict(saved) == A.to_dict(aug.build(p.augment, p.seed))  # exactly what params.yaml describes
    affine = saved.transforms[0]
    assert type(affine).__name__ == "Affine" and tuple(affine.rotate) == (-7, 7)
    assert [type(t).__name__ for t in saved.transforms] == ["Affine", "HorizontalFlip", "RandomBrightnessContrast",
                                                           "CoarseDropout"]
    assert saved.transforms[-1].p == pytest.approx(0.4)
    with Image.open(repo / "plots/augment/preview.png") as img:
        width, height = img.size
    assert 380 <= width <= 560 and 200 <= height <= 340, (width, height)  # 4 cells of 1.2 in at 100 dpi
    client = MlflowClient(mlflow_store)
    run = client.search_runs([e.experiment_id for e in client.search_experiments()],
                             filter_string="tags.stage = 'augment'")[0]
    assert run.data.params["augment.rotation_range"] == "7.0"
    logged = client.download_artifacts(run.info.run_id, "augmentation/pipeline.json", str(tmp_path))
    assert A.to_dict(aug.load(logged)) == A.to_dict(saved)  # the logged pipeline is the saved one
    assert {"augmentation/pipeline.json", "augmentation/preview.png"} <= {
        a.path for a in client.list_artifacts(run.info.run_id, "augmentation")}


@pytest.mark.parametrize("augmented", [False, True])
@pytest.mark.parametrize("shuffle", [True, False])
def test_in_memory_loader_gives_the_dataloaders_batches(tiny_prepared, augmented, shuffle):
    """make_loader's in-process fast path yields, epoch after epoch, exactly the batches torch's DataLoader
    yields with the same seed (so switching between them changes no metric)."""
    from torch.utils.data import DataLoader

    from pipeline.data.datamodule import ImageDataset, InMemoryLoader, collate, make_loader

    def dataset():
        return ImageDataset(tiny_prepared.x["train"], tiny_prepared.y["train"],
                            default_pipeline(7, affine_p=1.0) if augmented else None)

    fast = make_loader(dataset(), 16, shuffle, 0, seed=3)
    assert isinstance(fast, InMemoryLoader)
    reference = DataLoader(dataset(), batch_size=16, shuffle=shuffle, generator=torch.Generator().manual_seed(3),
                           drop_last=shuffle, collate_fn=collate)
    assert len(fast) == len(reference)
    for _ in range(2):  # two epochs: the generator advances the same way
        got, want = list(fast), list(reference)
        assert len(got) == len(want)
        for (x, y), (rx, ry) in zip(got, want, strict=True):
            assert torch.equal(x, rx) and torch.equal(y, ry)


def test_in_memory_loader_over_tensors():
    from torch.utils.data import DataLoader, TensorDataset

    from pipeline.data.datamodule import make_loader

    data = TensorDataset(torch.arange(50.0).reshape(25, 2), torch.arange(25))
    fast = make_loader(data, 4, True, 0, seed=1)
    reference = DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1), drop_last=True)
    for (x, y), (rx, ry) in zip(fast, reference, strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)
