"""Every training option params.yaml offers takes effect: a tiny run each, read back from what the training did
(the learning rate of every step, the optimizer, the gradient norm at each step, the epochs run)."""

from __future__ import annotations

import math
import os

import pytest
import pytorch_lightning as pl
import torch

from pipeline.models.cnn import CNN, Classifier, spec_from_params
from pipeline.params import parse
from pipeline.training.fit import FitConfig, build_trainer, fit, resolve_precision, seed_all
from pipeline.training.module import ClassifierModule

STEPS_PER_EPOCH = 3  # 120 training digits (12 per class), batch 32, last partial batch dropped


class Probe(pl.Callback):
    """What the training did: the lr each step ran with, the optimizer, the gradient norm the optimizer saw."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.grad_norms: list[float] = []
        self.optimizer: torch.optim.Optimizer | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.optimizer = trainer.optimizers[0]
        params = [p for g in self.optimizer.param_groups for p in g["params"]]

        def after_step(_optimizer, _args, _kwargs) -> None:  # the gradients the update used (clipped)
            norms = [p.grad.norm() for p in params if p.grad is not None]
            self.grad_norms.append(float(torch.linalg.vector_norm(torch.stack(norms))))

        self.optimizer.register_step_post_hook(after_step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def tiny_fit(tmp_path, monkeypatch, data, epochs: int = 4, trainer: dict | None = None, callbacks: tuple = (),
             **train):
    """One training from a params.train section (tiny data, batch 32), like train_scratch builds it."""
    from pipeline.data.datamodule import ImageDataModule

    monkeypatch.chdir(tmp_path)  # checkpoints under .cache/
    p = parse({"train": {"epochs": epochs, "batch_size": 32, "warmup_epochs": 0} | train, "trainer": trainer or {}})
    seed_all(0)
    model = Classifier(CNN(spec_from_params(p.model), 1, 28, 10), data.mean, data.std, 1)
    module = ClassifierModule(model, p.train)
    dm = ImageDataModule({s: (data.x[s], data.y[s]) for s in ("train", "val")}, 32, 0)
    probe = Probe()
    result = fit(module, dm, FitConfig.from_train(p.train, p.trainer, quiet=True, callbacks=(probe, *callbacks)))
    return probe, result, module


def test_schedulers_shape_the_learning_rate(tmp_path, monkeypatch, tiny_prepared):
    lr, total = 0.001, 4 * STEPS_PER_EPOCH

    none, _, _ = tiny_fit(tmp_path, monkeypatch, tiny_prepared, scheduler="none")
    assert none.lrs == [lr] * total

    cosine, _, _ = tiny_fit(tmp_path, monkeypatch, tiny_prepared, scheduler="cosine")
    assert cosine.lrs == pytest.approx([lr * 0.5 * (1 + math.cos(math.pi * k / total)) for k in range(total)])

    warm, _, _ = tiny_fit(tmp_path, monkeypatch, tiny_prepared, scheduler="cosine", warmup_epochs=1)
    assert warm.lrs[:3] == pytest.approx([lr / 3, 2 * lr / 3, lr])  # linear warm-up over one epoch
    assert warm.lrs[3:] == pytest.approx([lr * 0.5 * (1 + math.cos(math.pi * k / (total - 3)))
                                          for k in range(total - 3)])

    step, _, _ = tiny_fit(tmp_path, monkeypatch, tiny_prepared, scheduler="step", step_size=1, gamma=0.5)
    assert step.lrs == pytest.approx([lr * 0.5 ** (k // STEPS_PER_EPOCH) for k in range(total)])

    onecycle, _, _ = tiny_fit(tmp_path, monkeypatch, tiny_prepared, scheduler="onecycle", warmup_epochs=1)
    peak = onecycle.lrs.index(max(onecycle.lrs))
    assert max(onecycle.lrs) == pytest.approx(lr, rel=0.02) and 0 < peak < total - 1
    assert onecycle.lrs[0] < lr / 10 and onecycle.lrs[-1] < lr / 100  # up, then down

    # plateau: at a learning rate too small to change any prediction, val_acc stalls and the lr is cut
    plateau, _, _ = tiny_fit(tmp_path, monkeypatch, tiny_prepared, scheduler="plateau", lr=1e-6, step_size=2,
                             gamma=0.5, epochs=5)
    assert plateau.lrs[0] == 1e-6 and plateau.lrs[-1] == pytest.approx(0.5e-6)


@pytest.mark.parametrize(("name", "cls"), [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                           ("sgd", torch.optim.SGD)])
def test_optimizers_are_the_ones_named(tmp_path, monkeypatch, tiny_prepared, name, cls):
    probe, result, _ = tiny_fit(tmp_path, monkeypatch, tiny_prepared, epochs=1, optimizer=name, weight_decay=0.01)
    assert type(probe.optimizer) is cls
    group = probe.optimizer.param_groups[0]
    assert group["weight_decay"] == 0.01 and group["fused"] is True  # one kernel per step on the CPU
    if name == "sgd":
        assert group["momentum"] == 0.9 and group["nesterov"] is True
    assert math.isfinite(result.rows[-1]["train_loss"])


def test_label_smoothing_reaches_the_loss(tiny_prepared):
    p = parse({"train": {"label_smoothing": 0.1}})
    model = Classifier(CNN(spec_from_params(p.model), 1, 28, 10), tiny_prepared.mean, tiny_prepared.std, 1)
    module = ClassifierModule(model, p.train)
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8)
    log_p = torch.log_softmax(logits, dim=1)
    by_hand = (0.9 * -log_p[torch.arange(8), y] + 0.1 * -log_p.mean(dim=1)).mean()  # (1-e) CE + e uniform
    assert float(module.loss_fn(logits, y)) == pytest.approx(float(by_hand), rel=1e-5)
    assert float(by_hand) != pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-3)


class ValScore(pl.Callback):
    """Each validation's logged val_acc and val_loss, beside the same model scored on all val images at once."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.pairs = x, y, []

    def on_validation_end(self, trainer, pl_module) -> None:
        with torch.no_grad():
            logits = pl_module(self.x)
        direct = (float((logits.argmax(1) == self.y).float().mean()), float(pl_module.loss_fn(logits, self.y)))
        self.pairs.append(((float(trainer.callback_metrics["val_acc"]), float(trainer.callback_metrics["val_loss"])),
                           direct))


def test_validation_metrics_are_the_whole_val_sets(tmp_path, monkeypatch, tiny_prepared):
    """val_acc and val_loss are each epoch's over all val images, weighted by batch: 40 images in a batch of 32
    and one of 8, so a mean of batch means, or sums carried over from the epoch before, would not match."""
    from pipeline.predict import to_float

    data = tiny_prepared
    score = ValScore(to_float(data.x["val"]), torch.as_tensor(data.y["val"]).long())
    tiny_fit(tmp_path, monkeypatch, data, epochs=3, trainer={"precision": "32-true"}, callbacks=(score,))
    assert len(data.y["val"]) == 40 and len(score.pairs) == 3
    for (acc, loss), (direct_acc, direct_loss) in score.pairs:
        assert acc == pytest.approx(direct_acc, abs=1e-6) and loss == pytest.approx(direct_loss, rel=1e-4)
    assert len({loss for (_, loss), _ in score.pairs}) == 3  # the model moved between validations


def test_gradient_clipping_caps_every_steps_gradient_norm(tmp_path, monkeypatch, tiny_prepared):
    free, _, _ = tiny_fit(tmp_path, monkeypatch, tiny_prepared, epochs=2)
    clipped, _, _ = tiny_fit(tmp_path, monkeypatch, tiny_prepared, epochs=2, gradient_clip_val=0.05)
    assert len(clipped.grad_norms) == 2 * STEPS_PER_EPOCH
    assert min(free.grad_norms) > 0.05  # unclipped, the norms are larger than the cap ...
    assert max(clipped.grad_norms) <= 0.05 * (1 + 1e-4)  # ... and clipping holds every step to it


def test_early_stopping_stops_when_the_monitor_stalls(tmp_path, monkeypatch, tiny_prepared):
    stall = {"lr": 1e-9, "scheduler": "none"}  # too small to change a prediction: val_acc never improves
    _, stopped, _ = tiny_fit(tmp_path, monkeypatch, tiny_prepared, epochs=8,
                             early_stopping={"enabled": True, "patience": 2}, **stall)
    assert stopped.epochs_run == 3  # the best epoch, then two without improvement
    _, full, _ = tiny_fit(tmp_path, monkeypatch, tiny_prepared, epochs=4,
                          early_stopping={"enabled": False, "patience": 2}, **stall)
    assert full.epochs_run == 4


class Snapshots(pl.Callback):
    """The module's weights after every epoch's validation (where the best-weights rule looks)."""

    def __init__(self) -> None:
        self.states: list[dict] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_training_without_files_keeps_the_best_and_the_last_epochs_weights(tmp_path, monkeypatch, tiny_prepared):
    """Sweeps' and claims' trainings keep their best and last weights in memory: the same best epoch as the
    checkpoint file's rule (a tie keeps the first), the last epoch's weights handed back, and no file written."""
    from pipeline.data.datamodule import ImageDataModule

    monkeypatch.chdir(tmp_path)
    data = tiny_prepared
    # a rate too small to change a prediction: val_acc ties every epoch, so the first epoch is the best; the
    # BatchNorm running statistics still move, so the first and the last epoch's weights differ
    p = parse({"train": {"epochs": 3, "batch_size": 32, "warmup_epochs": 0, "lr": 1e-9, "scheduler": "none"}})
    outcomes = {}
    for keep in (False, True):
        seed_all(0)
        module = ClassifierModule(Classifier(CNN(spec_from_params(p.model), 1, 28, 10), data.mean, data.std, 1),
                                  p.train)
        snaps = Snapshots()
        result = fit(module, ImageDataModule({s: (data.x[s], data.y[s]) for s in ("train", "val")}, 32, 0),
                     FitConfig(p.trainer, 3, quiet=True, callbacks=(snaps,)), keep_checkpoint=keep)
        outcomes[keep] = (module.state_dict(), result, snaps.states)
        if keep:
            assert result.best_checkpoint is not None
            result.discard_checkpoints()
    state, result, snaps = outcomes[False]
    assert len({r["val_acc"] for r in result.rows}) == 1 and len(snaps) == 3
    assert not _same(snaps[0], snaps[-1])
    assert _same(state, snaps[0])  # the best (first) epoch's weights, not the last
    assert _same(result.last_state, {k[len("model."):]: v for k, v in snaps[-1].items()})
    assert _same(state, outcomes[True][0])  # what the checkpoint file's rule restores
    assert result.checkpoint_dir is None and not any((tmp_path / ".cache/checkpoints").glob("**/*.ckpt"))


@pytest.mark.parametrize(("cuda", "bf16", "cpu_bf16", "accelerator", "expected"), [
    (False, False, False, "auto", "32-true"),  # a CPU without native bf16: full precision
    (False, False, True, "auto", "bf16-mixed"),  # a CPU with AVX512-BF16 or AMX (this project's machine)
    (True, True, False, "auto", "bf16-mixed"),  # an Ampere-or-newer GPU
    (True, False, False, "auto", "16-mixed"),  # an older GPU
    (True, True, False, "cpu", "32-true"),  # a GPU present but the CPU asked for
    (True, True, True, "cpu", "bf16-mixed"),
    (True, True, False, "gpu", "bf16-mixed"),
])
def test_precision_auto_resolves_per_device(monkeypatch, cuda, bf16, cpu_bf16, accelerator, expected):
    from pipeline.training import fit as fit_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    monkeypatch.setattr(fit_module, "cpu_has_bf16", lambda: cpu_bf16)
    assert resolve_precision("auto", accelerator) == expected
    assert resolve_precision("16-mixed", accelerator) == "16-mixed"  # an explicit value is kept


def test_native_bf16_is_read_off_the_cpu():
    """What the detection says is what /proc/cpuinfo says (avx512_bf16 or amx_bf16 flags), on Linux."""
    from pathlib import Path

    from pipeline.training.fit import cpu_has_bf16

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo")
    flags = set(cpuinfo.read_text().split())
    assert cpu_has_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)


def test_the_trainer_on_this_cpu_runs_in_its_precision(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU path")
    from pipeline.training.fit import cpu_has_bf16

    p = parse({})
    trainer, _ = build_trainer(FitConfig(p.trainer, 1, quiet=True), tmp_path)
    assert trainer.precision == ("bf16-mixed" if cpu_has_bf16() else "32-true")
    assert trainer.accelerator.__class__.__name__ == "CPUAccelerator"


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_lays_out_the_convolutions(tmp_path, monkeypatch, tiny_prepared, channels_last):
    from pipeline.data.datamodule import ImageDataModule

    monkeypatch.chdir(tmp_path)
    p = parse({"trainer": {"channels_last": channels_last}, "train": {"epochs": 1, "batch_size": 32, "warmup_epochs": 0}})
    model = Classifier(CNN(spec_from_params(p.model), 1, 28, 10), tiny_prepared.mean, tiny_prepared.std, 1)
    dm = ImageDataModule({s: (tiny_prepared.x[s], tiny_prepared.y[s]) for s in ("train", "val")}, 32, 0)
    fit(ClassifierModule(model, p.train), dm, FitConfig.from_train(p.train, p.trainer, quiet=True))
    weight = model.net.features[3].weight  # the second convolution: 64 x 32 x 3 x 3
    assert weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert weight.is_contiguous() != channels_last
    x = torch.rand(2, 1, 28, 28)
    assert model.eval()(x).shape == (2, 10)  # the model still takes plain NCHW images


@pytest.mark.slow
def test_compile_trains_the_same_model_through_torch_compile(tmp_path, monkeypatch, tiny_prepared):
    """trainer.compile: the steps run through torch.compile (dynamo compiles graphs), the losses are the eager
    run's, and afterwards the model is the plain one (same state_dict keys, picklable for MLflow)."""
    import io

    from torch._dynamo.utils import counters

    from pipeline.data.datamodule import ImageDataModule

    monkeypatch.chdir(tmp_path)
    small = {"preset": "custom", "dense": [], "blocks": [
        {"filters": 4, "kernel_size": 3, "padding": "same", "stride": 1, "batch_norm": False, "pool": "max"}]}

    def run(compile_: bool):
        p = parse({"train": {"epochs": 2, "batch_size": 32, "warmup_epochs": 0}, "model": small,
                   "trainer": {"compile": compile_}})
        seed_all(0)
        model = Classifier(CNN(spec_from_params(p.model), 1, 28, 10), tiny_prepared.mean, tiny_prepared.std, 1)
        module = ClassifierModule(model, p.train)
        dm = ImageDataModule({s: (tiny_prepared.x[s], tiny_prepared.y[s]) for s in ("train", "val")}, 32, 0)
        return module, fit(module, dm, FitConfig.from_train(p.train, p.trainer, quiet=True))

    eager_module, eager = run(False)
    graphs = counters["stats"]["unique_graphs"]
    module, compiled = run(True)
    assert counters["stats"]["unique_graphs"] > graphs  # dynamo compiled the forward
    assert "compiled" not in module.__dict__ and module.net() is module.model
    assert module.state_dict().keys() == eager_module.state_dict().keys()
    torch.save(module.model, io.BytesIO())  # the plain model, as MLflow pickles it
    for got, want in zip(compiled.rows, eager.rows, strict=True):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4)
        assert got["val_acc"] == pytest.approx(want["val_acc"], abs=1e-6)


def test_precision_auto_keeps_strided_depthwise_models_in_fp32_on_a_bf16_cpu(monkeypatch):
    """Strided depthwise convolutions step slower in bf16 on this CPU (MobileNetV2 282 vs 191 ms measured): auto
    leaves such models in fp32 and gives the others bf16, the end of a frozen EfficientNet-Lite0 (depthwise
    without a stride) included."""
    from pipeline.models import registry
    from pipeline.models.transfer import Suffix, TransferNet, freeze_base, frozen_prefix
    from pipeline.training import fit as fit_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(fit_module, "cpu_has_bf16", lambda: True)
    mobilenet = registry.get("mobilenet_v2").build(10, 64, 3)
    seed = CNN(spec_from_params(parse({}).model), 1, 28, 10)
    lite = TransferNet("efficientnet_lite0", 4, 16, 0.0, 64, 3)
    freeze_base(lite, 3)
    end = Suffix(lite, frozen_prefix(lite))
    assert any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 for m in end.modules())  # depthwise, stride 1
    assert resolve_precision("auto", "auto", mobilenet) == "32-true"
    assert resolve_precision("auto", "auto", lite) == "32-true"  # the whole Lite0 downsamples depthwise
    assert resolve_precision("auto", "auto", seed) == "bf16-mixed"
    assert resolve_precision("auto", "auto", end) == "bf16-mixed"
    assert fit_module.inference_autocast("auto", "auto") == torch.bfloat16  # forward only: any model
    monkeypatch.setattr(fit_module, "cpu_has_bf16", lambda: False)
    assert fit_module.inference_autocast("auto", "auto") is None
    assert fit_module.inference_autocast("32-true", "auto") is None


@pytest.mark.parametrize("driver", [False, True])
def test_the_nvml_check_lightning_asks_for_stays_only_where_nvml_loads(monkeypatch, driver):
    """Lightning's fork-safe CUDA check (PYTORCH_NVML_BASED_CUDA_CHECK=1) stays where libnvidia-ml loads (a GPU
    machine) and is dropped where it cannot (no driver: every Adam step would try to load it); torch's answer is
    the same either way."""
    import ctypes

    from pipeline.training import fit as fit_mod

    answer = torch.cuda.is_available()

    def cdll(name, *args, **kwargs):
        if not driver:
            raise OSError(f"{name}: cannot open shared object file")
        return object()

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    assert fit_mod.skip_nvml_without_a_driver() is (not driver)
    assert (os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == "1") is driver
    assert torch.cuda.is_available() == answer
    monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK", raising=False)
    assert fit_mod.skip_nvml_without_a_driver() is False  # not asked for: nothing to drop


def test_a_training_process_on_this_machine_checks_cuda_as_the_machine_allows():
    """In a fresh process that imports the training code (Lightning first), the NVML check is on exactly when
    libnvidia-ml can be loaded here."""
    import ctypes
    import subprocess
    import sys

    try:
        ctypes.CDLL("libnvidia-ml.so.1")
        loads = True
    except OSError:
        loads = False
    code = ("import pytorch_lightning, os; import pipeline.training.fit; "
            "print(os.environ.get('PYTORCH_NVML_BASED_CUDA_CHECK'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[-1] == ("1" if loads else "None")
