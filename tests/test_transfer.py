"""transfer_learn: backbones by name, freezing, discriminative lrs, cached features, weights loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from pipeline.errors import PipelineError
from pipeline.models import checkpoint, registry
from pipeline.models.classifier import Classifier
from pipeline.models.transfer import (
    TransferNet,
    freeze_base,
    imagenet_weights_file,
    load_base_from_checkpoint,
    load_imagenet_base,
)
from pipeline.params import TrainerParams
from pipeline.stages.common import fit, seed_all
from pipeline.stages.transfer_learn import feature_extraction_setup, task_splits
from pipeline.training.module import ClassifierModule, OptimConfig


@pytest.mark.parametrize("name", list(registry.REGISTRY))
def test_every_backbone_builds_with_ten_outputs(name):
    arch = registry.get(name)
    channels = 3 if arch.torchvision else 1
    net = TransferNet(name, 10, 32, 0.3, 64, channels)
    net.eval()
    assert net(torch.zeros(2, channels, 64, 64)).shape == (2, 10)
    assert isinstance(net.head[0], torch.nn.Linear) and net.head[0].out_features == 32


def test_too_small_input_is_one_line():
    with pytest.raises(PipelineError, match=r"transfer.image_size=16 is too small for alexnet"):
        TransferNet("alexnet", 10, 32, 0.3, 16, 3)


def small_batch(channels=3, size=32, n=8):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, channels, size, size, generator=g), torch.arange(n) % 5


def test_frozen_base_is_bit_identical_after_a_step_while_the_head_changes():
    seed_all(0)
    model = Classifier(TransferNet("resnet18", 5, 16, 0.0, 32, 3), [0.5], [0.25], 3)
    freeze_base(model.net, 0)
    module = ClassifierModule(model, 5, OptimConfig(lr=0.01))
    module.train()
    assert not model.net.base[1].training  # frozen BatchNorm keeps its statistics
    base_before = {k: v.clone() for k, v in model.net.base.state_dict().items()}  # incl. BN buffers
    head_before = {k: v.clone() for k, v in model.net.head.state_dict().items()}
    optimizer = module.configure_optimizers()
    x, y = small_batch()
    loss = module.loss_fn(module(x), y)
    loss.backward()
    optimizer.step()
    assert all(torch.equal(base_before[k], v) for k, v in model.net.base.state_dict().items())
    assert any(not torch.equal(head_before[k], v) for k, v in model.net.head.state_dict().items())


def test_fine_tuning_gives_the_base_a_lower_lr():
    model = Classifier(TransferNet("resnet18", 5, 16, 0.0, 32, 3), [0.5], [0.25], 3)
    freeze_base(model.net, 2)  # the last two blocks (layer3, layer4) train
    module = ClassifierModule(model, 5, OptimConfig(lr=1e-3, base_prefix="net.base", base_lr_factor=0.1))
    groups = {g["name"]: g for g in module.configure_optimizers().param_groups}
    assert groups["head"]["lr"] == pytest.approx(1e-3) and groups["base"]["lr"] == pytest.approx(1e-4)
    base_ids = {id(p) for p in groups["base"]["params"]}
    layer4 = {id(p) for p in model.net.base[7].parameters()}
    layer1 = {id(p) for p in model.net.base[4].parameters()}
    assert layer4 <= base_ids and not (layer1 & base_ids)
    assert not any(p.requires_grad for p in model.net.base[4].parameters())


def test_cached_feature_path_agrees_with_naive_loop(tmp_path, monkeypatch, mlflow_store, tiny_prepared):
    # resnet18: BatchNorm and a 1x1 final map make any train-mode leak in the frozen base visible.
    monkeypatch.chdir(tmp_path)
    target = task_splits(tiny_prepared, [5, 6, 7, 8, 9], 6, seed=0)
    accs = {}
    for cached in (True, False):
        seed_all(0)
        model = Classifier(TransferNet("resnet18", 5, 16, 0.3, 32, 3), tiny_prepared.mean, tiny_prepared.std, 3)
        bn_before = model.net.base[1].running_mean.clone()
        module, dm, example = feature_extraction_setup(model, target, 32, 8, 0, 0, OptimConfig(lr=0.01), cached)
        result = fit(module, dm, trainer_params=TrainerParams(), epochs=3, experiment="t", run_name=f"fe{cached}",
                     tags={}, log_params={}, input_shape=(3, 32, 32), checkpoint_name=f"fe{cached}", tracked=model,
                     example=example, log_model=False)
        accs[cached] = [r["val_acc"] for r in result.rows]
        assert torch.equal(model.net.base[1].running_mean, bn_before)  # frozen BN statistics untouched
    assert np.allclose(accs[True], accs[False], atol=0.005), accs


def test_imagenet_weights_load_from_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    _, path = imagenet_weights_file("resnet18")
    assert path == tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    state = torchvision.models.resnet18().state_dict()
    state["conv1.weight"].fill_(0.5)
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    net = TransferNet("resnet18", 5, 16, 0.0, 32, 3)
    load_imagenet_base(net)
    assert torch.all(net.base[0].weight == 0.5)


def test_missing_imagenet_weights_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    import socket

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", offline)  # as on a machine with no internet
    net = TransferNet("resnet18", 5, 16, 0.0, 32, 3)
    with pytest.raises(PipelineError) as err:
        load_imagenet_base(net)
    message = str(err.value)
    assert "resnet18-f37072fd.pth is not cached" in message
    assert f"put resnet18-f37072fd.pth into {tmp_path}/hub/checkpoints/" in message
    assert "\n" not in message


def test_mismatching_checkpoint_names_the_first_bad_layer(tmp_path):
    arch = checkpoint.transfer_arch("seed_mnist", 5, 16, 0.0, 28, 1)
    donor = checkpoint.build_classifier(arch, [0.5], [0.25])
    checkpoint.save(tmp_path / "gray.pt", donor, arch, {"name": "gray"})
    rgb = TransferNet("seed_mnist", 5, 16, 0.0, 28, 3)
    with pytest.raises(PipelineError, match=r"layer 0.weight has shape \(32, 1, 3, 3\), seed_mnist needs \(32, 3, 3, 3\)"):
        load_base_from_checkpoint(rgb, tmp_path / "gray.pt")
    other = TransferNet("resnet18", 5, 16, 0.0, 32, 3)
    with pytest.raises(PipelineError, match=r"layer 0.weight has shape .* resnet18 needs \(64, 3, 7, 7\)"):
        load_base_from_checkpoint(other, tmp_path / "gray.pt")
    same = TransferNet("seed_mnist", 5, 16, 0.0, 28, 1)
    load_base_from_checkpoint(same, tmp_path / "gray.pt")
    assert torch.equal(same.base[0].weight, donor.net.base[0].weight)
