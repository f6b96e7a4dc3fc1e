"""augment: the serialized pipeline round-trips, the stage saves what params describe, and the batched form
gives albumentations' pixels, ranges and probabilities."""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import pytest
import torch

from pipeline.data import augment as aug
from pipeline.data.augment import BatchAugment
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


@pytest.mark.parametrize("task", ["digits", "photos"])
def test_augment_stage_saves_the_pipeline_its_params_describe_and_logs_it(tmp_path, mlflow_store, tiny_prepared,
                                                                          run_stage, task):
    """Each task's augment stage saves exactly the pipeline its own params section describes, previews it and
    logs both to MLflow (the digits' section and the photos' are separate knobs)."""
    import yaml
    from mlflow import MlflowClient
    from PIL import Image

    from pipeline import tasks
    from pipeline.params import load
    from tests.conftest import ready_to_train

    t = tasks.TASKS[task]
    repo = ready_to_train(tmp_path / "repo", tiny_prepared)  # tiny profile: 2 preview rows of 1 original + 3 views
    tiny_prepared.save(repo / t.prepared)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[t.augment] |= {"rotation_range": 7, "horizontal_flip": True, "coarse_dropout": {"p": 0.4},
                          "preview_images": 2, "preview_views": 3}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = run_stage(repo, "augment", *(["--task", task] if task != "digits" else []))
    assert result.code == 0, result.err
    saved = aug.load(repo / t.augmented / "pipeline.json", seed=0)
    p = load(repo / "params.yaml")
    assert A.to_dict(saved) == A.to_dict(aug.build(t.section(p, "augment"), p.seed))  # what params.yaml describes
    affine = saved.transforms[0]
    assert type(affine).__name__ == "Affine" and tuple(affine.rotate) == (-7, 7)
    assert [type(x).__name__ for x in saved.transforms] == ["Affine", "HorizontalFlip", "RandomBrightnessContrast",
                                                           "CoarseDropout"]
    assert saved.transforms[-1].p == pytest.approx(0.4)
    with Image.open(repo / t.preview) as img:
        width, height = img.size
    assert 380 <= width <= 560 and 200 <= height <= 340, (width, height)  # 4 cells of 1.2 in at 100 dpi
    client = MlflowClient(mlflow_store)
    run = client.search_runs([e.experiment_id for e in client.search_experiments()],
                             filter_string=f"tags.stage = '{t.stage('augment')}'")[0]
    assert run.data.params[f"{t.augment}.rotation_range"] == "7.0"
    logged = client.download_artifacts(run.info.run_id, "augmentation/pipeline.json", str(tmp_path))
    assert A.to_dict(aug.load(logged)) == A.to_dict(saved)  # the logged pipeline is the saved one
    assert {"augmentation/pipeline.json", f"augmentation/{t.preview.name}"} <= {
        a.path for a in client.list_artifacts(run.info.run_id, "augmentation")}


# ------------------------------------------------------------------------------------------- batched
@pytest.fixture(scope="session")
def mnist(digits):
    return digits.images[:48]  # real MNIST digits, uint8 (N, 28, 28, 1)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def both(transform: A.BasicTransform, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The transform through albumentations image by image, and through BatchAugment, in gray levels."""
    compose = A.Compose([transform], seed=0)
    per_image = np.stack([compose(image=img)["image"].reshape(img.shape) for img in images]).astype(np.float64)
    batched = BatchAugment(compose, 0)(to_tensor(images)).permute(0, 2, 3, 1).double().numpy() * 255
    return per_image, batched


@pytest.mark.parametrize("transform", [
    A.Affine(rotate=(12, 12), scale={"x": (1.1, 1.1), "y": (0.92, 0.92)},
             translate_percent={"x": (0.1, 0.1), "y": (-0.07, -0.07)}, shear={"x": (5, 5), "y": (-3, -3)},
             border_mode=cv2.BORDER_CONSTANT, fill=0, p=1),
    A.Affine(rotate=(-20, -20), translate_px={"x": (3, 3), "y": (-2, -2)}, border_mode=cv2.BORDER_CONSTANT,
             fill=40, p=1),
    A.Affine(rotate=(-30, -30), interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_CONSTANT, p=1),
    A.RandomBrightnessContrast(brightness_limit=(0.1, 0.1), contrast_limit=(0.25, 0.25), p=1),
    A.RandomBrightnessContrast(brightness_limit=(-0.3, -0.3), contrast_limit=(-0.1, -0.1), p=1),
    A.HorizontalFlip(p=1),
    A.VerticalFlip(p=1),
], ids=["affine", "affine-px-fill", "affine-nearest", "brighter", "darker", "hflip", "vflip"])
def test_fixed_draws_give_albumentations_pixels(mnist, transform):
    """With each range collapsed to one value, every image equals albumentations' own output up to its
    rounding to whole gray levels (cv2 warps in fixed point and stores uint8)."""
    per_image, batched = both(transform, mnist)
    assert np.abs(per_image - batched).max() <= 1.0
    assert not np.array_equal(per_image, mnist)  # the transform did something


def test_affine_draws_match_albumentations_distribution():
    """The matrices drawn per image: each entry's mean and spread as albumentations draws them (2,000 each)."""
    t = aug.build(AugmentParams(), 0).transforms[0]
    assert type(t).__name__ == "Affine"
    theirs = np.stack([t.get_params_dependent_on_data({"shape": (28, 28)}, {})["matrix"][:2] for _ in range(2000)])
    step = BatchAugment(A.Compose([t]), 0).steps[0]
    linear, shift = step.draw(2000, 28, 28, torch.Generator().manual_seed(1))
    centre = np.array([13.5, 13.5])  # albumentations' matrix: p -> L (p - c) + c + t
    ours = np.concatenate([linear, (centre + shift - linear @ centre)[:, :, None]], -1)
    spread = theirs.std(0)
    assert np.all(np.abs(ours.mean(0) - theirs.mean(0)) <= 0.1 * spread + 1e-9)
    assert np.allclose(ours.std(0), spread, rtol=0.1)
    # whole-pixel shifts, as albumentations truncates translate_percent * size
    shift = ours[:, :, 2] - (np.eye(2) - ours[:, :, :2]) @ np.array([13.5, 13.5])
    assert np.allclose(shift, np.round(shift)) and np.round(np.abs(shift).max()) == 2


def test_probabilities_and_dropout_area_match_albumentations():
    """Each image is transformed with the transform's p, and CoarseDropout cuts as much as albumentations."""
    ones = np.full((2000, 28, 28, 1), 255, dtype=np.uint8)
    dropout = A.CoarseDropout(num_holes_range=(1, 2), hole_height_range=(0.1, 0.25), hole_width_range=(0.1, 0.25),
                              fill=0, p=0.4)
    per_image, batched = both(dropout, ones)
    cut_theirs, cut_ours = (per_image == 0).mean(axis=(1, 2, 3)), (batched == 0).mean(axis=(1, 2, 3))
    assert abs((cut_ours > 0).mean() - 0.4) < 0.04  # p: 2,000 draws, 4 standard errors
    assert cut_ours[cut_ours > 0].mean() == pytest.approx(cut_theirs[cut_theirs > 0].mean(), rel=0.08)
    assert cut_ours.max() <= 2 * 0.25**2 + 1e-9  # at most two holes of at most a quarter of each side


def test_same_seed_same_batch_and_reseeding(mnist):
    def run(seed, reseed=None):
        batch_aug = BatchAugment(aug.build(AugmentParams(affine_p=1.0), 0), seed)
        if reseed is not None:
            batch_aug(to_tensor(mnist))
            batch_aug.set_random_seed(reseed)
        return batch_aug(to_tensor(mnist))

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))
    assert torch.equal(run(9, reseed=3), run(3))


