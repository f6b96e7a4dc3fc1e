"""transfer_learn: backbones by name, freezing, discriminative lrs, cached features, weights loading."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import torchvision

from pipeline.data.datamodule import ImageDataModule, TensorDataModule
from pipeline.data.prepared import class_subset, per_class_indices
from pipeline.errors import PipelineError
from pipeline.models import checkpoint, loading, registry
from pipeline.models.cnn import Classifier
from pipeline.models.transfer import (
    HeadOnly,
    TransferNet,
    extract,
    freeze_base,
    load_base_from_checkpoint,
    load_imagenet_base,
)
from pipeline.models.weights import torchvision_weights_file
from pipeline.params import TrainerParams, TransferParams
from pipeline.training.fit import FitConfig, fit, seed_all
from pipeline.training.module import ClassifierModule


@pytest.mark.parametrize("name", list(registry.REGISTRY))
def test_every_backbone_builds_with_ten_outputs(name):
    arch = registry.get(name)
    channels, size = arch.input_channels(1), max(64, arch.min_size)
    net = TransferNet(name, 10, 32, 0.3, size, channels)
    net.eval()
    assert net(torch.zeros(2, channels, size, size)).shape == (2, 10)
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
    module = ClassifierModule(model, TransferParams(lr=0.01))
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
    module = ClassifierModule(model, TransferParams(lr=1e-3), base_lr_factor=0.1)
    groups = {g["name"]: g for g in module.configure_optimizers().param_groups}
    assert groups["head"]["lr"] == pytest.approx(1e-3) and groups["base"]["lr"] == pytest.approx(1e-4)
    base_ids = {id(p) for p in groups["base"]["params"]}
    layer4 = {id(p) for p in model.net.base[7].parameters()}
    layer1 = {id(p) for p in model.net.base[4].parameters()}
    assert layer4 <= base_ids and not (layer1 & base_ids)
    assert not any(p.requires_grad for p in model.net.base[4].parameters())


def test_cached_feature_path_agrees_with_naive_loop(tmp_path, monkeypatch, mlflow_store, tiny_prepared):
    """The head trained on cached features equals the head trained through the frozen model, step for step."""
    # resnet18: BatchNorm and a 1x1 final map make any train-mode leak in the frozen base visible.
    monkeypatch.chdir(tmp_path)
    splits = class_subset(tiny_prepared, [5, 6, 7, 8, 9])
    idx = per_class_indices(splits["train"][1], 6, 0, "n")
    train = (splits["train"][0][idx], splits["train"][1][idx])
    heads, losses = {}, {}
    for cached in (True, False):
        seed_all(0)
        model = Classifier(TransferNet("resnet18", 5, 16, 0.3, 32, 3), tiny_prepared.mean, tiny_prepared.std, 3, 32)
        freeze_base(model.net, 0)
        bn_before = model.net.base[1].running_mean.clone()
        if cached:
            feats = {k: extract(model, v[0]) for k, v in (("train", train), ("val", splits["val"]))}
            module = ClassifierModule(HeadOnly(model.net.head), TransferParams(lr=0.01, scheduler="cosine"))
            dm = TensorDataModule((feats["train"], torch.as_tensor(train[1])),
                                  (feats["val"], torch.as_tensor(splits["val"][1])), 8, 0)
        else:
            module = ClassifierModule(model, TransferParams(lr=0.01, scheduler="cosine"))
            dm = ImageDataModule({"train": train, "val": splits["val"]}, 8, 0)
        result = fit(module, dm, FitConfig(TrainerParams(precision="32-true"), 3))  # equal step for step
        losses[cached] = [(r["train_loss"], r["val_loss"]) for r in result.rows]
        heads[cached] = model.net.head.state_dict()
        assert torch.equal(model.net.base[1].running_mean, bn_before)  # frozen BN statistics untouched
    assert len(losses[True]) == 3
    assert np.allclose(losses[True], losses[False], rtol=1e-4, atol=1e-5), losses
    for key, value in heads[True].items():
        assert torch.allclose(value, heads[False][key], atol=1e-5), key


def test_imagenet_weights_load_from_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    _, path = torchvision_weights_file("resnet18")
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


def test_architectures_without_imagenet_weights_say_which_have_them():
    with pytest.raises(PipelineError, match=r"seed_mnist has no ImageNet weights \(backbones with them: alexnet"):
        load_imagenet_base(TransferNet("seed_mnist", 5, 16, 0.0, 28, 1))


def top5(model, image: np.ndarray) -> list[int]:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    with torch.no_grad():
        return model.eval()(x).topk(5).indices[0].tolist()


def test_efficientnet_lite0_imagenet_weights_are_the_real_ones():
    """ImageNet classes for scikit-learn's photo of a Chinese temple: the real weights know it, random ones don't."""
    from sklearn.datasets import load_sample_image

    arch = registry.get("efficientnet_lite0")
    china = load_sample_image("china.jpg")
    temple_classes = {698, 663, 497, 442}  # palace, monastery, church, bell cote
    net = arch.build(1000, 224)
    net.load_state_dict(arch.imagenet(), strict=True)
    model = Classifier(net, *arch.imagenet_norm, 3, 224)  # resizes the 427x640 photo inside the model
    assert temple_classes & set(top5(model, china))
    seed_all(0)
    random_model = Classifier(arch.build(1000, 224), *arch.imagenet_norm, 3, 224)
    assert not temple_classes & set(top5(random_model, china))
    # The transfer base gets exactly those weights.
    transfer = TransferNet("efficientnet_lite0", 10, 16, 0.0, 64, 3)
    load_imagenet_base(transfer)
    assert torch.equal(transfer.base[0].weight, net._conv_stem.weight)
    assert torch.equal(transfer.base[-3].weight, net._conv_head.weight)


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_efficientnet_lite1_and_lite2_weights_know_a_cat(name):
    """scikit-image's photo of Chelsea the cat: the real ImageNet weights put a cat class (281-285) in the top 5
    at the model's own input size; the same network with random weights does not."""
    from skimage.data import chelsea

    arch = registry.get(name)
    cats = set(range(281, 286))
    net = arch.build(1000, arch.canonical_size)
    net.load_state_dict(arch.imagenet(), strict=True)
    model = Classifier(net, *arch.imagenet_norm, 3, arch.canonical_size)
    assert cats & set(top5(model, chelsea()))
    seed_all(0)
    assert not cats & set(top5(Classifier(arch.build(1000, arch.canonical_size), *arch.imagenet_norm, 3,
                                          arch.canonical_size), chelsea()))


def test_mismatching_checkpoint_names_the_first_bad_layer(tmp_path):
    arch = checkpoint.transfer_arch("seed_mnist", 5, 16, 0.0, 28, 1)
    donor = loading.build_classifier(arch, [0.5], [0.25], 28)
    checkpoint.save(tmp_path / "gray.pt", donor, arch, checkpoint.ModelMeta("transfer_learn", "gray", "digits",
                                                                           list("01234"), [0, 1, 2, 3, 4], 28))
    rgb = TransferNet("seed_mnist", 5, 16, 0.0, 28, 3)
    with pytest.raises(PipelineError, match=r"layer 0.weight does not fit \(shape \(32, 1, 3, 3\); seed_mnist needs \(32, 3, 3, 3\)\)"):
        load_base_from_checkpoint(rgb, tmp_path / "gray.pt")
    other = TransferNet("resnet18", 5, 16, 0.0, 32, 3)
    with pytest.raises(PipelineError, match=r"layer 0.weight does not fit \(shape .*; resnet18 needs \(64, 3, 7, 7\)\)"):
        load_base_from_checkpoint(other, tmp_path / "gray.pt")
    same = TransferNet("seed_mnist", 5, 16, 0.0, 28, 1)
    load_base_from_checkpoint(same, tmp_path / "gray.pt")
    assert torch.equal(same.base[0].weight, donor.net.base[0].weight)


def test_the_feature_cache_runs_training_views_in_the_trainings_precision_and_the_rest_in_fp32(
        tmp_path, monkeypatch, mlflow_store, tiny_prepared):
    """The frozen base's cache: the training views through the base under the trainings' autocast (bf16 here,
    forced so that every CPU runs the path), validation and test images in fp32, bit for bit what the saved
    model computes when evaluate runs it; the features of the training views stay close to fp32's."""
    from pipeline import params as params_mod
    from pipeline import tasks
    from pipeline.data import augment as aug
    from pipeline.stages import transfer_learn
    from pipeline.training import transfer as transfer_mod

    monkeypatch.chdir(tmp_path)
    tiny_prepared.save(tmp_path / "data/prepared")
    aug.save(aug.build(params_mod.AugmentParams(), 0))
    p = params_mod.parse({"transfer": {"strategies": ["feature_extraction", "fine_tuning"], "image_size": 32,
                                       "target_per_class": [3], "seeds": 2, "val_per_class": 2}})
    s = transfer_learn.setup(p, tasks.get("digits"))
    monkeypatch.setattr(transfer_mod, "inference_autocast", lambda *_: torch.bfloat16)
    transfer_mod.cache_features(s)
    assert s.prefix > 0 and set(s.activations) == set(s.features) == {"train", "val", "test"}
    frozen = s.new_model(with_base=True)
    for split in ("val", "test"):
        assert torch.equal(s.activations[split], extract(frozen, s.splits[split][0], s.prefix))
    train_views = transfer_mod.views(s.splits["train"][0], s.augmentation, s.tp.cached_views, p.seed)
    fp32 = extract(frozen, train_views, s.prefix)
    got = s.activations["train"]
    assert got.dtype == torch.float32 and got.shape == fp32.shape
    assert not torch.equal(got, fp32)  # the bf16 path ran
    assert ((got - fp32).norm() / fp32.norm()).item() < 0.05


def test_sweep_writes_every_point_and_a_verdict_that_agrees_with_the_means(tmp_path, monkeypatch, mlflow_store,
                                                                           tiny_prepared):
    from mlflow import MlflowClient

    from pipeline import params as params_mod
    from pipeline.data import augment as aug
    from pipeline.stages import transfer_learn

    monkeypatch.chdir(tmp_path)
    tiny_prepared.save(tmp_path / "data/prepared")
    aug.save(aug.build(params_mod.AugmentParams(), 0))
    p = params_mod.parse({"transfer": {"strategies": ["feature_extraction", "fine_tuning", "scratch",
                                                      "scratch_backbone"], "image_size": 32, "target_per_class": [3], "seeds": 2, "steps": 2,
                                       "head_steps": 3, "cnn_steps": 3, "val_per_class": 2, "batch_size": 4}})
    result = transfer_learn.run(p)
    rows = list(csv.DictReader(open(tmp_path / "plots/transfer_learn/sweep.csv")))
    strategies = ["feature_extraction", "fine_tuning", "scratch", "scratch_backbone"]
    assert sorted((int(r["target_per_class"]), int(r["seed"]), r["strategy"]) for r in rows) == sorted(
        (n, s, st) for n in (3,) for s in (0, 1) for st in strategies)
    test_images = result["test_images"]
    assert test_images == len(tiny_prepared.y["test"])  # every class, the whole test split
    # every seed its own images (and init); the strategies of one (N, seed) share the images
    images = {(r["target_per_class"], r["seed"]): {x["images"] for x in rows if (x["target_per_class"], x["seed"])
                                                   == (r["target_per_class"], r["seed"])} for r in rows}
    assert all(len(v) == 1 for v in images.values()) and len({v.pop() for v in images.values()}) == len(images)
    for n in ("3",):
        for st in strategies:
            accs = [float(r["test_acc"]) for r in rows if r["target_per_class"] == n and r["strategy"] == st]
            assert result["summary"][n][st]["mean"] == pytest.approx(np.mean(accs), abs=1e-6)
            assert result["summary"][n][st]["std"] == pytest.approx(np.std(accs, ddof=1), abs=1e-6)
            assert all(abs(a * test_images - round(a * test_images)) < 1e-3 for a in accs)  # k of N images
            low, high = result["summary"][n][st]["ci95"]
            assert low <= np.mean(accs) <= high and result["summary"][n][st]["min"] == pytest.approx(min(accs))
        means = {st: result["summary"][n][st]["mean"] for st in strategies}
        stds = {st: result["summary"][n][st]["std"] for st in strategies}
        verdict = result["verdict"][n]
        assert means[verdict["winner"]] == max(means.values())
        versus = verdict["transfer_vs_scratch"]  # the better ImageNet strategy against our CNN, by the rule
        best = versus["pretrained"]
        assert means[best] == max(means["feature_extraction"], means["fine_tuning"])
        assert versus["gap"] == pytest.approx(means[best] - means["scratch"], abs=1e-6)
        assert versus["spread"] == pytest.approx(max(stds[best], stds["scratch"]), abs=1e-6)
        expected = ("holds" if versus["gap"] > versus["spread"] else
                    "contradicted" if versus["gap"] < -versus["spread"] else "inconclusive")
        assert versus["outcome"] == expected
    # The largest N, seed 0 is saved for evaluate, and its file reproduces the sweep's test accuracy.
    from pipeline.predict import predict_proba

    for st in strategies:
        model, meta, _ = loading.load(tmp_path / f"models/transfer/{st}.pt")
        acc = (predict_proba(model, tiny_prepared.x["test"], 28).argmax(1) == tiny_prepared.y["test"]).mean()
        assert acc == pytest.approx(result["saved_models"][st]["test_acc"], abs=1e-6), st
        assert meta.target_per_class == 3 and meta.task == "digits" and meta.strategy == st
        (seed0,) = [r for r in rows if (r["target_per_class"], r["seed"], r["strategy"]) == ("3", "0", st)]
        assert meta.mlflow_run_id == result["saved_models"][st]["mlflow_run_id"] == seed0["mlflow_run_id"]
    client = MlflowClient(mlflow_store)
    parent = client.get_run(result["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=100)
    assert len(children) == len(rows)
    # each run says the precision it trained in (auto's choice): the head alone and the base's last blocks
    # (depthwise without a stride) in bf16 where the CPU has it, the whole EfficientNet (strided depthwise
    # convolutions: slower in bf16 here) in fp32, and the sweep's rows agree
    from pipeline.training.fit import cpu_has_bf16

    by_name = {r.info.run_name.split("/", 1)[1]: r.data.params for r in children}  # n3/seed0/scratch
    half = "bf16-mixed" if cpu_has_bf16() else "32-true"
    expected = {"feature_extraction": half, "fine_tuning": half, "scratch": half, "scratch_backbone": "32-true"}
    for r in rows:
        params = by_name[f"n{r['target_per_class']}/seed{r['seed']}/{r['strategy']}"]
        assert params.get("trainer.precision_used") == r["precision"] == expected[r["strategy"]], r
        assert params.get("trainer.world_size") == "1"
    assert (tmp_path / "plots/transfer_learn/crossover.png").stat().st_size > 5000


def test_fine_tuning_trains_the_last_blocks_at_the_base_rate_through_the_stage(tmp_path, monkeypatch, mlflow_store,
                                                                               tiny_prepared):
    """unfreeze_blocks and backbone_lr_factor, as the stage uses them: the base's blocks before the last ones keep
    their ImageNet weights bit for bit, the last one moves, and its optimizer gives the base lr * factor."""
    from pipeline import params as params_mod
    from pipeline.data import augment as aug
    from pipeline.models import registry
    from pipeline.stages import transfer_learn
    from pipeline.training import transfer

    monkeypatch.chdir(tmp_path)
    tiny_prepared.save(tmp_path / "data/prepared")
    aug.save(aug.build(params_mod.AugmentParams(), 0))
    groups: list[dict] = []

    class Recording(transfer.ClassifierModule):  # the stage's own module, its optimizer's groups recorded
        def configure_optimizers(self):
            out = super().configure_optimizers()
            optimizer = out if isinstance(out, torch.optim.Optimizer) else out["optimizer"]
            groups.append({g.get("name", "all"): g["lr"] for g in optimizer.param_groups})
            return out

    monkeypatch.setattr(transfer, "ClassifierModule", Recording)
    p = params_mod.parse({"transfer": {"strategies": ["fine_tuning"], "image_size": 32, "target_per_class": [3],
                                       "seeds": 2, "steps": 4, "head_steps": 2, "val_per_class": 2, "batch_size": 4,
                                       "lr": 0.01, "unfreeze_blocks": 2, "backbone_lr_factor": 0.25},
                          "trainer": {"sweep_workers": 1}})  # in this process: the recording module is seen
    transfer_learn.run(p)
    assert {"head": 0.01, "base": 0.0025} in groups  # fine-tuning: the base at lr * backbone_lr_factor
    tuned, _, _ = loading.load(tmp_path / "models/transfer/fine_tuning.pt")
    reference = TransferNet("efficientnet_lite0", 10, 128, 0.3, 32, 3)
    load_imagenet_base(reference)
    blocks = registry.base_blocks(tuned.net.base)
    frozen = {id(p) for b in blocks[:-2] for p in b.parameters()}
    for (name, got), want in zip(tuned.net.base.named_parameters(), reference.base.parameters(), strict=True):
        if id(got) in frozen:
            assert torch.equal(got, want), name
    last_conv = next(m for m in blocks[-2].modules() if isinstance(m, torch.nn.Conv2d))
    before = next(m for m in registry.base_blocks(reference.base)[-2].modules() if isinstance(m, torch.nn.Conv2d))
    assert not torch.equal(last_conv.weight, before.weight)  # the unfrozen block trained


def test_source_task_base_is_pretrained_and_reused_by_the_target_models(tmp_path, monkeypatch, mlflow_store,
                                                                        tiny_prepared):
    """weights: source_task pretrains the backbone on the source classes, and the target task's models start
    from exactly those weights: the frozen one keeps them bit for bit, the fine-tuned one moves away from them."""
    import json

    from pipeline import params as params_mod
    from pipeline.data import augment as aug
    from pipeline.models.transfer import TransferNet
    from pipeline.stages import transfer_learn

    monkeypatch.chdir(tmp_path)
    tiny_prepared.save(tmp_path / "data/prepared")
    aug.save(aug.build(params_mod.AugmentParams(), 0))
    bases = []
    real_base_weights = transfer_learn.base_weights

    def keep_base(*args, **kwargs):  # the real pretraining; the test keeps a copy of what it returns
        out = real_base_weights(*args, **kwargs)
        bases.append({k: v.clone() for k, v in out[0].items()})
        return out

    monkeypatch.setattr(transfer_learn, "base_weights", keep_base)
    p = params_mod.parse({"transfer": {"backbone": "seed_mnist", "weights": "source_task", "image_size": 28,
                                       "pretrain_epochs": 2, "strategies": ["feature_extraction", "fine_tuning"],
                                       "target_per_class": [3], "seeds": 2, "steps": 3, "head_steps": 3,
                                       "val_per_class": 2, "batch_size": 4}})
    result = transfer_learn.run(p)
    (base,) = bases
    torch.manual_seed(0)
    untrained = TransferNet("seed_mnist", 5, 16, 0.0, 28, 1).base.state_dict()
    assert any(not torch.equal(base[k], untrained[k]) for k in base)  # pretraining changed the weights
    frozen, meta, _ = loading.load(tmp_path / "models/transfer/feature_extraction.pt")
    assert meta.class_ids == [5, 6, 7, 8, 9]  # the target task: the classes the base never saw
    assert all(torch.equal(v, base[k]) for k, v in frozen.net.base.state_dict().items())
    tuned, _, _ = loading.load(tmp_path / "models/transfer/fine_tuning.pt")
    tuned_base = tuned.net.base.state_dict()
    assert any(not torch.equal(tuned_base[k], base[k]) for k in base if base[k].is_floating_point())
    saved = json.loads((tmp_path / "metrics/transfer_learn.json").read_text())
    assert saved["weights"] == "source_task" and saved["backbone"] == "seed_mnist"
    assert saved["summary"] == json.loads(json.dumps(result["summary"]))
    assert set(saved["summary"]["3"]) == {"feature_extraction", "fine_tuning"}


def test_a_deep_claims_stack_as_the_sweeps_scratch_model_is_one_line():
    """plain20/residual20 are presets for the claims, not CNNs the sweep's scratch strategy can train: one line
    naming the value and the known presets, before any data is read."""
    from pipeline import tasks
    from pipeline.params import parse
    from pipeline.stages import transfer_learn

    with pytest.raises(PipelineError) as err:
        transfer_learn.setup(parse({"transfer": {"scratch_model": "plain20"}}), tasks.get("digits"))
    assert str(err.value).startswith("transfer.scratch_model: 'plain20' is one of the claims' deep stacks")
    assert "seed_mnist" in str(err.value) and "\n" not in str(err.value)
