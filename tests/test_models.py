"""Models: the seed's exact parameter counts, impossible stacks, the registry against torchvision."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.fundamentals.summary import layer_table, param_counts
from pipeline.models import checkpoint, loading, registry
from pipeline.models.cnn import CNN, PRESETS, Block, Classifier, CNNSpec


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_seed_mnist_is_exactly_the_seed_table():
    model = CNN(PRESETS["seed_mnist"], 1, 28, 10)
    assert count(model) == 421_642
    rows = [r for r in layer_table(model, (1, 28, 28)) if r.params]
    assert [r.params for r in rows] == [320, 18_496, 401_536, 1_290]
    flatten = next(r for r in layer_table(model, (1, 28, 28)) if r.type == "Flatten")
    assert flatten.output_shape == (3136,)


@pytest.mark.parametrize(("preset_name", "first_act_sees", "full_size"),
                         [("seed_mnist", 14, 28), ("small_cnn", 14, 28), ("lenet5", 24, 24)])
@pytest.mark.parametrize("half", [False, True])
def test_training_pools_before_relu_and_trains_bit_identically(preset_name, first_act_sees, full_size, half):
    """In training, each ReLU -> max pool pair runs pool first (ReLU on a quarter of the values); the weights
    after several Adam steps equal, bit for bit, those of the written order (fp32 and bf16 autocast,
    channels-last as the stages train); evaluation runs the written order."""
    import copy

    torch.manual_seed(0)
    fast = CNN(PRESETS[preset_name], 1, 28, 10).to(memory_format=torch.channels_last)
    written = copy.deepcopy(fast)
    written._pool_first = set()
    relu = next(m for m in fast.features if isinstance(m, torch.nn.ReLU | torch.nn.Tanh))
    seen = []
    relu.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].shape[-1]))
    optimizers = [torch.optim.Adam(m.parameters(), 1e-2) for m in (fast, written)]
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        x, y = torch.rand(16, 1, 28, 28, generator=g) - 0.3, torch.randint(0, 10, (16,), generator=g)
        for model, opt in zip((fast, written), optimizers, strict=True):
            torch.manual_seed(step)  # the same dropout masks for both
            opt.zero_grad()
            with torch.autocast("cpu", torch.bfloat16, enabled=half):
                torch.nn.functional.cross_entropy(model.train()(x), y).backward()
            opt.step()
    assert seen == [first_act_sees] * 4  # the first ReLU ran on the pooled 14x14 maps, not on 28x28
    for (name, a), b in zip(fast.named_parameters(), written.parameters(), strict=True):
        assert torch.equal(a, b), name
    for (name, a), b in zip(fast.named_buffers(), written.buffers(), strict=True):  # BatchNorm's running statistics
        assert torch.equal(a, b), name
    fast.eval()(x)
    assert seen[-1] == full_size  # evaluation: the written order (explain and Grad-CAM read the full-size maps)


def test_keras_tutorial_and_lenet5():
    assert count(CNN(PRESETS["keras_tutorial"], 1, 28, 10)) == 93_322
    assert count(CNN(PRESETS["lenet5"], 1, 32, 10)) == 61_706
    assert CNN(PRESETS["lenet5"], 1, 32, 10)(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


def test_impossible_stack_is_one_line_naming_layer_and_sizes():
    spec = CNNSpec(blocks=tuple(Block(8) for _ in range(4)))
    with pytest.raises(PipelineError, match=r"model block 4: max pool 2x2 does not fit its 1x1 input"):
        CNN(spec, 1, 8, 10)
    with pytest.raises(PipelineError, match=r"model block 1 .*kernel 7x7 is larger than its 6x6 input"):
        CNN(CNNSpec(blocks=(Block(8, kernel_size=7, padding="valid"),)), 1, 6, 10)


# Published counts (torchvision's model docs; the EfficientNet-Lite0 state dict; LeNet-5 and ours by formula).
EXPECTED = {"resnet50": 25_557_032, "vgg16": 138_357_544, "mobilenet_v2": 3_504_872,
            "efficientnet_b0": 5_288_548, "googlenet": 6_624_904, "alexnet": 61_100_840,
            "inception_v3": 23_834_568, "efficientnet_lite0": 4_652_008, "efficientnet_lite1": 5_416_680,
            "efficientnet_lite2": 6_092_072,
            "resnet18": 11_689_512, "lenet5": 61_706, "seed_mnist": 421_642}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_registry_counts_equal_published(name):
    model = registry.get(name).build_canonical()
    assert count(model) == EXPECTED[name]
    assert param_counts(model)["total"] == EXPECTED[name]


def test_inception_v3_count_with_and_without_its_auxiliary_head():
    import torchvision

    with_aux = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    assert count(with_aux) == 27_161_264
    assert count(with_aux) - count(with_aux.AuxLogits) == EXPECTED["inception_v3"]
    assert "27,161,264 with it" in registry.get("inception_v3").note


def test_seed_column_quotes_only_what_the_seed_says():
    assert registry.get("mobilenet_v2").seed_says == "Lightweight"
    assert registry.parse_seed_figure("Lightweight") is None
    assert registry.get("resnet18").seed_says is None and registry.get("inception_v3").seed_says is None
    assert registry.parse_seed_figure(registry.get("vgg16").seed_says) == 138e6


def test_unknown_architecture_lists_known_names():
    with pytest.raises(PipelineError, match=r"transfer.backbone: unknown architecture 'resnet999'; known: lenet5, alexnet"):
        registry.get("resnet999", "transfer.backbone")


def test_checkpoint_roundtrip_and_mismatch(tmp_path):
    spec = PRESETS["seed_mnist"]
    model = Classifier(CNN(spec, 1, 28, 10), [0.3], [0.3], 1)
    arch = checkpoint.cnn_arch(spec, 1, 28, 10)
    meta = checkpoint.ModelMeta("train_scratch", "x", "digits", list("0123456789"), list(range(10)), 28)
    checkpoint.save(tmp_path / "m.pt", model, arch, meta)
    loaded, got, _ = loading.load(tmp_path / "m.pt")
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(loaded(x), model.eval()(x)) and got == meta
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["arch"]["num_classes"] = 5
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(PipelineError, match=r"layer net.classifier.3.weight does not fit \(shape \(10, 128\)"):
        loading.load(tmp_path / "bad.pt")
    (tmp_path / "junk.pt").write_bytes(b"nope")
    with pytest.raises(PipelineError, match="not a loadable torch file"):
        loading.load(tmp_path / "junk.pt")


def test_a_model_file_with_a_record_of_another_shape_is_one_line(tmp_path):
    """The typed record is checked when a model file is loaded: a missing or unknown key names what is expected."""
    spec = PRESETS["seed_mnist"]
    model = Classifier(CNN(spec, 1, 28, 10), [0.3], [0.3], 1)
    meta = checkpoint.ModelMeta("train_scratch", "x", "digits", list("0123456789"), list(range(10)), 28)
    checkpoint.save(tmp_path / "m.pt", model, checkpoint.cnn_arch(spec, 1, 28, 10), meta)
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    for broken in ({k: v for k, v in payload["meta"].items() if k != "task"}, payload["meta"] | {"colour": "red"}):
        torch.save(payload | {"meta": broken}, tmp_path / "odd.pt")
        with pytest.raises(PipelineError) as err:
            loading.load(tmp_path / "odd.pt")
        assert str(err.value).startswith(f"checkpoint {tmp_path / 'odd.pt'}: its model record is not this pipeline's")
        assert "expected class_ids, class_names, image_size" in str(err.value) and "\n" not in str(err.value)
