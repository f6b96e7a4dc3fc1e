"""Output sizes from the seed's table, checked against torch too."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.fundamentals.sizes import conv_output_size


@pytest.mark.parametrize(("h", "k", "p", "s", "expected"),
                         [(28, 3, 0, 1, 26), (28, 3, "same", 1, 28), (28, 3, 1, 1, 28), (28, 3, 0, 2, 13),
                          (224, 7, 3, 2, 112)])
def test_seed_output_sizes(h, k, p, s, expected):
    assert conv_output_size(h, k, s, p).size == expected
    pad = 1 if p == "same" else p
    conv = torch.nn.Conv2d(1, 1, k, s, pad)
    assert conv(torch.zeros(1, 1, h, h)).shape[-1] == expected


def test_non_integer_division_is_floored_and_explained():
    out = conv_output_size(28, 3, 2, 0)
    assert not out.exact and "floored to 13" in out.explain()


def test_kernel_larger_than_input_is_an_error():
    with pytest.raises(PipelineError, match="kernel 7x7 is larger than its 5x5 input"):
        conv_output_size(5, 7, 1, 0)


# ------------------------------------------------------------------------------ manual ops vs torch
import numpy as np  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pipeline.fundamentals.ops import (  # noqa: E402
    EXAMPLE_FILTER,
    EXAMPLE_IMAGE,
    EXAMPLE_POOL_INPUT,
    conv2d,
    global_avg_pool,
    pool2d,
)
from pipeline.fundamentals.params import (  # noqa: E402
    conv_params,
    dense_params,
    dense_weights,
    model_formula_params,
)


@pytest.mark.parametrize(("stride", "padding", "c_in", "c_out", "size"),
                         [(1, 0, 1, 1, 7), (1, 1, 3, 4, 8), (2, 1, 2, 5, 9), (3, 2, 3, 2, 11)])
def test_manual_conv_equals_torch(stride, padding, c_in, c_out, size):
    rng = np.random.default_rng(stride * 10 + c_out)
    x = rng.normal(size=(2, c_in, size, size))
    w = rng.normal(size=(c_out, c_in, 3, 3))
    b = rng.normal(size=c_out)
    ours = conv2d(x, w, b, stride=stride, padding=padding)
    theirs = F.conv2d(torch.tensor(x), torch.tensor(w), torch.tensor(b), stride=stride, padding=padding).numpy()
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize(("size", "stride"), [(2, None), (3, 2), (2, 1)])
def test_manual_pooling_equals_torch(size, stride):
    x = np.random.default_rng(size).normal(size=(2, 3, 9, 9))
    t = torch.tensor(x)
    np.testing.assert_allclose(pool2d(x, size, stride, "max"), F.max_pool2d(t, size, stride).numpy(), atol=1e-5)
    np.testing.assert_allclose(pool2d(x, size, stride, "avg"), F.avg_pool2d(t, size, stride).numpy(), atol=1e-5)
    np.testing.assert_allclose(global_avg_pool(x), F.adaptive_avg_pool2d(t, 1).numpy()[:, :, 0, 0], atol=1e-5)


def test_seed_worked_examples():
    conv = conv2d(EXAMPLE_IMAGE[None, None], EXAMPLE_FILTER[None, None])[0, 0]
    assert conv.astype(int).tolist() == [[4, 3, 4], [2, 4, 3], [2, 3, 4]]
    assert pool2d(EXAMPLE_POOL_INPUT[None, None], 2)[0, 0].tolist() == [[6, 8], [14, 16]]


def test_seed_parameter_table():
    """The formulas, layer by layer, against the model measured by torchinfo (the per-layer table)."""
    from pipeline.fundamentals.summary import layer_table, param_counts
    from pipeline.models.cnn import CNN, PRESETS

    model = CNN(PRESETS["seed_mnist"], 1, 28, 10)
    measured = [r for r in layer_table(model, (1, 28, 28)) if r.params]
    formula = [conv_params(3, 1, 32), conv_params(3, 32, 64), dense_params(64 * 7 * 7, 128), dense_params(128, 10)]
    assert [(r.type, r.params) for r in measured] == list(zip(["Conv2d", "Conv2d", "Linear", "Linear"], formula,
                                                              strict=True))
    assert sum(formula) == param_counts(model)["total"] == 421_642
    # torchinfo's mult-adds of a conv layer: output positions x its parameters (the bias counted as one).
    assert measured[0].mult_adds == 28 * 28 * conv_params(3, 1, 32)
    assert measured[1].mult_adds == 14 * 14 * conv_params(3, 32, 64)
    assert dense_weights([784, 512]) == 401_408  # the seed's fully connected first layer
    assert dense_weights([784, 512, 10]) == 406_528
    assert dense_weights([150_528, 512]) == 77_070_336


@pytest.mark.parametrize("name", ["lenet5", "seed_mnist", "alexnet", "vgg16", "googlenet", "inception_v3", "resnet18",
                                  "resnet50", "mobilenet_v2", "efficientnet_b0", "efficientnet_lite0",
                                  "efficientnet_lite1", "efficientnet_lite2"])
def test_formula_counts_agree_with_torch(name):
    from pipeline.models import registry

    model = registry.get(name).build_canonical()
    assert model_formula_params(model) == sum(p.numel() for p in model.parameters())


# The claims' networks, counted by hand from the course's formulas at 28x28x1, 10 classes.
CLAIM_MODELS = {
    "dense_mnist": dense_params(784, 512) + dense_params(512, 10),  # 407,050
    "seed_mnist_bn": conv_params(3, 1, 32) + conv_params(3, 32, 64) + 2 * (32 + 64) + dense_params(7 * 7 * 64, 128)
    + dense_params(128, 10),
    "seed_mnist_nopool": conv_params(3, 1, 32) + conv_params(3, 32, 64) + dense_params(28 * 28 * 64, 128)
    + dense_params(128, 10),
    "seed_mnist_gap": conv_params(3, 1, 32) + conv_params(3, 32, 64) + dense_params(64, 128) + dense_params(128, 10),
    "stack_3x3": conv_params(3, 1, 32) + conv_params(3, 32, 32) + conv_params(3, 32, 64) + conv_params(3, 64, 64)
    + dense_params(64, 10),
    "stack_5x5": conv_params(5, 1, 32) + conv_params(5, 32, 80) + dense_params(80, 10),
    "plain20": conv_params(3, 1, 16) + 20 * conv_params(3, 16, 16) + dense_params(16, 10),
    "residual20": conv_params(3, 1, 16) + 20 * conv_params(3, 16, 16) + dense_params(16, 10),  # skips add nothing
}


@pytest.mark.parametrize("name", list(CLAIM_MODELS))
def test_the_claims_networks_have_their_formula_counts(name):
    from pipeline.models.cnn import build, preset

    model = build(preset(name), 1, 28, 10)
    assert sum(p.numel() for p in model.parameters()) == model_formula_params(model) == CLAIM_MODELS[name]
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_the_claims_sizes_are_the_seeds():
    assert CLAIM_MODELS["dense_mnist"] == 407_050  # the seed's 784 -> 512 -> 10
    assert abs(CLAIM_MODELS["stack_3x3"] - CLAIM_MODELS["stack_5x5"]) < 0.01 * CLAIM_MODELS["stack_3x3"]
    from pipeline.models.cnn import build, preset

    # the skip connections add no parameters: the two built networks, not the table's two equal formulas
    counts = {n: sum(p.numel() for p in build(preset(n), 1, 28, 10).parameters()) for n in ("residual20", "plain20")}
    assert counts["residual20"] == counts["plain20"] == 46_730


# Published multiply-accumulates per image at the canonical input (torchvision's model docs list GFLOPS, which
# are these MACs: resnet18 1.81, resnet50 4.09, vgg16 15.47, mobilenet_v2 0.30, efficientnet_b0 0.39, alexnet 0.71).
PUBLISHED_GMACS = {"resnet18": 1.81, "resnet50": 4.09, "vgg16": 15.47, "mobilenet_v2": 0.30,
                   "efficientnet_b0": 0.39, "alexnet": 0.71}


@pytest.mark.parametrize("name", list(PUBLISHED_GMACS))
def test_compares_macs_are_the_published_ones(name):
    from pipeline.evaluation import macs_per_image
    from pipeline.models import registry

    arch = registry.get(name)
    macs = macs_per_image(arch.build_canonical(), (3, arch.canonical_size, arch.canonical_size))
    assert macs / 1e9 == pytest.approx(PUBLISHED_GMACS[name], rel=0.03)


def test_cli_size_and_demo():
    from tests.conftest import REPO, run_module

    out = run_module("pipeline.fundamentals", REPO, "size", "--input", "224", "--kernel", "7", "--padding", "3",
                     "--stride", "2")
    assert out.returncode == 0 and out.stdout.startswith("H' = 112")
    bad = run_module("pipeline.fundamentals", REPO, "size", "--input", "5", "--kernel", "7")
    assert bad.returncode == 2 and "kernel 7x7 is larger than its 5x5 input" in bad.stderr


def readme_fundamentals_commands() -> list[tuple[str, str]]:
    """(arguments, comment) of each `python -m pipeline.fundamentals ...` line in the README."""
    import re

    from tests.conftest import REPO

    text = (REPO / "README.md").read_text()
    return re.findall(r"^python -m pipeline\.fundamentals (.+?)\s+# (.+)$", text, flags=re.M)


def test_readme_fundamentals_commands_print_what_the_readme_says(capsys):
    """Each command of the README's fundamentals block runs and prints the numbers its comment promises (in
    process: the same main() as `python -m`), and the installed `cnn-fundamentals` script is the same program."""
    import re
    import shutil
    import subprocess
    from pathlib import Path

    from pipeline.fundamentals.__main__ import main
    from tests.conftest import PYTHON, REPO

    commands = dict(readme_fundamentals_commands())
    assert set(commands) == {"size --input 28 --kernel 3 --stride 2", "params seed_mnist", "conv-demo",
                             "dense-vs-conv"}
    outputs = {}
    for args, comment in commands.items():
        main(args.split())
        outputs[args] = capsys.readouterr().out
        for number in re.findall(r"\d[\d,./]*\d|\d", comment):  # every figure of the comment is printed
            assert number in outputs[args], (args, number)
    assert outputs["size --input 28 --kernel 3 --stride 2"].startswith("H' = 13 ")
    table = outputs["params seed_mnist"]
    for layer, count in (("features.0", "320"), ("features.3", "18,496"), ("classifier.1", "401,536"),
                         ("classifier.3", "1,290")):
        assert re.search(rf"^{re.escape(layer)}\s.*\s{count}\s", table, flags=re.M), layer
    assert "Total params: 421,642" in table
    demo = outputs["conv-demo"]
    assert "[[4 3 4]\n [2 4 3]\n [2 3 4]]" in demo and "[[ 6  8]\n [14 16]]" in demo
    dense = outputs["dense-vs-conv"]
    assert "401,408" in dense and "77,070,336" in dense and "1,792" in dense
    script = shutil.which("cnn-fundamentals", path=str(Path(PYTHON).parent))
    assert script, "the cnn-fundamentals console script is not installed"
    same = subprocess.run([script, "size", "--input", "28", "--kernel", "3", "--stride", "2"], capture_output=True,
                          text=True, cwd=REPO)
    assert same.returncode == 0 and same.stdout == outputs["size --input 28 --kernel 3 --stride 2"]
