"""transfer_learn: a registry backbone reused on a small new task, three ways, side by side.

1. Base weights: `source_task` pretrains the backbone on params.transfer.source_classes of the prepared data
   (works offline), `imagenet` loads torchvision's weights from $TORCH_HOME, or a checkpoint path, or none.
2. On the target task (target_classes, target_per_class labelled images each):
   feature_extraction  base frozen, only the head trains (on cached base features by default)
   fine_tuning         head warm-up, then the last N base blocks train at lr * backbone_lr_factor
   scratch             the same architecture from random weights: the baseline transfer must beat
Reads params: seed, transfer, trainer, mlflow (and the augmentation pipeline). Writes models/transfer/,
metrics/transfer_learn.json, plots/transfer_learn.csv; one MLflow run per model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pipeline import params as params_mod
from pipeline import plots, tracking
from pipeline.atomic import atomic_dir, write_csv, write_json
from pipeline.data import augment as aug
from pipeline.data.datamodule import ImageDataModule, ImageDataset, make_loader
from pipeline.data.prepared import PreparedData
from pipeline.errors import PipelineError, stage_main
from pipeline.evaluation import device_for, predict_proba
from pipeline.models import checkpoint, registry
from pipeline.models.classifier import IMAGENET_MEAN, IMAGENET_STD, Classifier
from pipeline.models.transfer import (
    TransferNet,
    freeze_base,
    load_base_from_checkpoint,
    load_imagenet_base,
)
from pipeline.stages.common import fit, is_rank_zero, seed_all
from pipeline.training.callbacks import HeadWarmup
from pipeline.training.module import ClassifierModule, OptimConfig

MODEL_DIR = Path("models/transfer")
SPLITS = ("train", "val", "test")


def task_splits(data: PreparedData, classes: list[int], train_per_class: int | None, seed: int
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The images of `classes`, labels remapped to 0..k-1; the train split capped at `train_per_class`."""
    for c in classes:
        if not 0 <= c < data.num_classes:
            raise PipelineError(f"transfer: class id {c} is out of range (the data has classes "
                                f"0..{data.num_classes - 1}: {', '.join(data.class_names)})")
    rng = np.random.default_rng(seed)
    out = {}
    for split in SPLITS:
        x, y = data.x[split], data.y[split]
        idx = []
        for c in classes:
            members = np.flatnonzero(y == c)
            if split == "train" and train_per_class is not None:
                if len(members) < train_per_class:
                    raise PipelineError(f"transfer.target_per_class={train_per_class}: class "
                                        f"{data.class_names[c]} has only {len(members)} training images")
                members = np.sort(rng.permutation(members)[:train_per_class])
            idx.append(members)
        idx = np.sort(np.concatenate(idx))
        remap = {c: i for i, c in enumerate(classes)}
        out[split] = (x[idx], np.array([remap[int(v)] for v in y[idx]], dtype=np.int64))
    return out


class HeadOnly(nn.Module):
    """The transfer head as a model of its own, trained on cached base features."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)


@torch.no_grad()
def cached_features(model: Classifier, splits, image_size: int, batch_size: int) -> dict[str, TensorDataset]:
    """Run the frozen base once over every image (no augmentation): the features the head trains on."""
    device = device_for()
    model = model.to(device).eval()
    out = {}
    for split, (x, y) in splits.items():
        # make_loader's own generator: a plain DataLoader draws its seed from the global RNG and would shift the
        # dropout masks of the training that follows (the naive path would then diverge).
        loader = make_loader(ImageDataset(x, y, None, image_size), 256, shuffle=False, num_workers=0, seed=0)
        feats = []
        for images, _ in loader:
            images = images.to(device)
            if images.shape[1] == 1 and model.net_channels == 3:
                images = images.expand(-1, 3, -1, -1)
            feats.append(model.net.features((images - model.mean) / model.std).float().cpu())
        out[split] = TensorDataset(torch.cat(feats), torch.as_tensor(y, dtype=torch.long))
    model.cpu()
    return out


class FeatureDataModule(pl.LightningDataModule):
    def __init__(self, datasets: dict[str, TensorDataset], batch_size: int, seed: int) -> None:
        super().__init__()
        self.datasets, self.batch_size, self.seed = datasets, batch_size, seed

    def train_dataloader(self):
        return make_loader(self.datasets["train"], self.batch_size, True, 0, self.seed)

    def val_dataloader(self):
        return make_loader(self.datasets["val"], self.batch_size, False, 0, self.seed)


def feature_extraction_setup(model: Classifier, target, size: int, batch_size: int, num_workers: int, seed: int,
                             config: OptimConfig, cached: bool):
    """Frozen base, trainable head. Cached: the base runs once and the head trains on its features;
    naive: every step runs the frozen base. Same head init, data order and updates, so both agree."""
    freeze_base(model.net, 0)
    num_classes = int(target["train"][1].max()) + 1
    val_images = ImageDataset(target["val"][0][:2], target["val"][1][:2], None, size)
    example = torch.stack([val_images[i][0] for i in range(2)])
    if cached:
        feats = cached_features(model, target, size, batch_size)
        module = ClassifierModule(HeadOnly(model.net.head), num_classes, config)
        return module, FeatureDataModule(feats, batch_size, seed), example
    module = ClassifierModule(model, num_classes, config)
    return module, ImageDataModule(target, batch_size, num_workers, seed, None, size), example


@stage_main
def main() -> None:
    p = params_mod.load()
    tp = p.transfer
    arch = registry.get(tp.backbone, "transfer.backbone")
    data = PreparedData.load()
    transform = aug.load(aug.PIPELINE_PATH, seed=p.seed)
    tracking.check_store()
    size = tp.image_size
    net_channels = 3 if arch.torchvision else data.channels
    imagenet = tp.weights == "imagenet"
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if imagenet else (data.mean, data.std)
    target = task_splits(data, tp.target_classes, tp.target_per_class, p.seed)
    target_names = [data.class_names[c] for c in tp.target_classes]
    shape = (net_channels, size, size)
    logged = params_mod.flatten({"seed": p.seed, "transfer": tp, "trainer": p.trainer, "augment": p.augment})
    base_tags = {"backbone": tp.backbone, "weights": tp.weights}

    def new_model(num_classes: int) -> Classifier:
        net = TransferNet(tp.backbone, num_classes, tp.head_units, tp.head_dropout, size, net_channels)
        return Classifier(net, mean, std, net_channels)

    def datamodule(splits, augment: bool) -> ImageDataModule:
        return ImageDataModule(splits, tp.batch_size, p.trainer.num_workers, p.seed,
                               transform if augment else None, size)

    def optim(**kw) -> OptimConfig:
        return OptimConfig(optimizer="adam", lr=tp.lr, scheduler="none", **kw)

    # ---------------------------------------------------------------------- 1. the base weights
    seed_all(p.seed)
    base_state = None
    pretrain = None
    if tp.weights == "source_task":
        source = task_splits(data, tp.source_classes, None, p.seed)
        model = new_model(len(tp.source_classes))
        print(f"transfer_learn: pretraining {tp.backbone} on source classes {tp.source_classes}", flush=True)
        pretrain = fit(
            ClassifierModule(model, len(tp.source_classes), optim()), datamodule(source, augment=True),
            trainer_params=p.trainer, epochs=tp.pretrain_epochs, experiment=p.mlflow.experiment,
            run_name=f"transfer_learn/pretrain/{tp.backbone}",
            tags=tracking.run_tags("transfer_learn", tp.backbone, data.data_hash) | base_tags
            | {"strategy": "pretrain_source"}, log_params=logged, input_shape=shape,
            checkpoint_name="transfer_pretrain", label="pretrain ", log_model=False, artifacts=aug.artifacts(),
        )
        base_state = {k: v.clone() for k, v in model.net.base.state_dict().items()}
    elif tp.weights != "none":
        model = new_model(len(tp.target_classes))
        if imagenet:
            load_imagenet_base(model.net)
        else:
            load_base_from_checkpoint(model.net, Path(tp.weights))
        base_state = {k: v.clone() for k, v in model.net.base.state_dict().items()}

    # ---------------------------------------------------------------------- 2. the strategies
    results: dict[str, dict] = {}
    curve_rows: list[dict] = []
    saved: dict[str, tuple[Classifier, dict]] = {}
    for strategy in tp.strategies:
        seed_all(p.seed)
        model = new_model(len(tp.target_classes))
        if strategy != "scratch" and base_state is not None:
            model.net.base.load_state_dict(base_state)
        tags = tracking.run_tags("transfer_learn", tp.backbone, data.data_hash) | base_tags | {"strategy": strategy}
        run_name = f"transfer_learn/{strategy}/{tp.backbone}"
        common = dict(trainer_params=p.trainer, epochs=tp.epochs, experiment=p.mlflow.experiment,
                      run_name=run_name, tags=tags, log_params=logged | {"strategy": strategy}, input_shape=shape,
                      checkpoint_name=f"transfer_{strategy}", label=f"{strategy} ",
                      artifacts=aug.artifacts() if strategy != "feature_extraction" else [])
        if strategy == "feature_extraction":
            module, dm, example = feature_extraction_setup(
                model, target, size, tp.batch_size, p.trainer.num_workers, p.seed, optim(), tp.cache_features)
            result = fit(module, dm, tracked=model, example=example, **common)
        elif strategy == "fine_tuning":
            freeze_base(model.net, tp.unfreeze_blocks)  # the final trainable state, for the logged table
            callbacks = []
            if tp.head_warmup_epochs:
                callbacks.append(HeadWarmup(tp.head_warmup_epochs, tp.unfreeze_blocks,
                                            tp.lr * tp.backbone_lr_factor))
                config = optim()
            else:
                config = optim(base_prefix="net.base", base_lr_factor=tp.backbone_lr_factor)
            result = fit(ClassifierModule(model, len(tp.target_classes), config), datamodule(target, True),
                         extra_callbacks=callbacks, **common)
        else:
            result = fit(ClassifierModule(model, len(tp.target_classes), optim()), datamodule(target, True),
                         **common)
        if not is_rank_zero():
            continue
        probs = predict_proba(model, target["test"][0], size, device=device_for(p.trainer.accelerator))
        test_acc = float((probs.argmax(1) == target["test"][1]).mean())
        tracking.log_metrics(result.run_id, {"target_test_acc": test_acc})
        results[strategy] = {"best_val_acc": round(result.best_val_acc, 6), "test_acc": round(test_acc, 6),
                             "train_time_s": round(result.train_time_s, 2),
                             "params_trainable": result.counts.get("trainable"),
                             "params_frozen": result.counts.get("non_trainable"), "mlflow_run_id": result.run_id}
        curve_rows += [{"strategy": strategy} | row for row in result.rows]
        meta = {"stage": "transfer_learn", "name": f"{strategy}_{tp.backbone}", "strategy": strategy,
                "class_names": target_names, "class_ids": list(tp.target_classes), "image_size": size,
                "mlflow_run_id": result.run_id, "model_uri": result.model_uri}
        saved[strategy] = (model, meta)
        print(f"transfer_learn: {strategy}: val_acc {result.best_val_acc:.4f} test_acc {test_acc:.4f} "
              f"({result.train_time_s:.1f}s)", flush=True)
    if not is_rank_zero():
        return

    # ---------------------------------------------------------------------- 3. outputs
    arch_desc = checkpoint.transfer_arch(tp.backbone, len(tp.target_classes), tp.head_units, tp.head_dropout,
                                         size, net_channels)
    with atomic_dir(MODEL_DIR) as tmp:
        for strategy, (model, meta) in saved.items():
            checkpoint.save(tmp / f"{strategy}.pt", model, arch_desc, meta)
    write_csv("plots/transfer_learn.csv", curve_rows)
    for strategy in saved:
        rows = [r for r in curve_rows if r["strategy"] == strategy]
        plots.learning_curves(rows, Path(f"plots/transfer_learn/{strategy}.png"), f"{strategy} ({tp.backbone})")
    summary = {"backbone": tp.backbone, "weights": tp.weights, "target_per_class": tp.target_per_class,
               "strategies": results}
    if pretrain is not None:
        summary["pretrain"] = {"best_val_acc": round(pretrain.best_val_acc, 6), "mlflow_run_id": pretrain.run_id}
    if "scratch" in results:
        for strategy in ("feature_extraction", "fine_tuning"):
            if strategy in results:
                summary[f"{strategy}_gain_over_scratch"] = round(
                    results[strategy]["test_acc"] - results["scratch"]["test_acc"], 6)
    write_json("metrics/transfer_learn.json", summary)


if __name__ == "__main__":
    main()
