"""The pipeline's portable model file: an architecture description, weights and a typed record of what the model
is (ModelMeta), loadable weights_only. This module writes it; `pipeline.models.loading` reads it.

Stages write one per trained model (models/scratch/model.pt, models/transfer/<strategy>.pt, ...); evaluate and
explain rebuild the model from it without importing any training code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from pipeline.atomic import atomic_path
from pipeline.errors import PipelineError
from pipeline.models.cnn import Classifier, CNNSpec

FORMAT = "cnn-pipeline/2"


@dataclass(frozen=True)
class ModelMeta:
    """What a model file holds, checked when it is loaded."""

    stage: str  # the stage that trained it: train_scratch | transfer_learn
    name: str  # seed_mnist, fine_tuning_efficientnet_lite0, ...
    task: str  # the data it was trained and is tested on: digits | photos
    class_names: list[str]
    class_ids: list[int]  # the prepared data's classes it predicts, in its output order
    image_size: int  # the size of the stored images it takes (it resizes them itself where its net needs)
    mlflow_run_id: str | None = None  # its training run
    registered_model: str | None = None  # the registered model its run adds a version to
    strategy: str | None = None  # transfer_learn: feature_extraction | fine_tuning | scratch | ...
    target_per_class: int | None = None  # transfer_learn: labelled training images per class

    @property
    def label(self) -> str:
        """The model's name in reports and metrics (evaluate.json's keys)."""
        if self.stage == "train_scratch":
            return self.name
        return f"transfer_{self.strategy}" if self.task == "digits" else f"{self.task}_{self.strategy}"

    @classmethod
    def of(cls, raw: Any, where: str) -> ModelMeta:
        known = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or not {"stage", "name", "task", "class_names", "class_ids",
                                            "image_size"} <= set(raw) or set(raw) - known:
            keys = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise PipelineError(f"{where}: its model record is not this pipeline's (keys {keys}; expected "
                                f"{', '.join(sorted(known))}); rerun the stage that trained it")
        return cls(**raw)


def cnn_arch(spec: CNNSpec, in_channels: int, image_size: int, num_classes: int) -> dict[str, Any]:
    return {"kind": "cnn", "spec": spec.to_dict(), "in_channels": in_channels, "image_size": image_size,
            "num_classes": num_classes}


def transfer_arch(backbone: str, num_classes: int, head_units: int, head_dropout: float, image_size: int,
                  in_channels: int) -> dict[str, Any]:
    return {"kind": "transfer", "backbone": backbone, "num_classes": num_classes, "head_units": head_units,
            "head_dropout": head_dropout, "image_size": image_size, "in_channels": in_channels}


def save(path: Path, model: Classifier, arch: dict[str, Any], meta: ModelMeta) -> None:
    """Write the model file atomically."""
    payload = {"format": FORMAT, "arch": arch, "state_dict": {k: v.detach().cpu() for k, v in
                                                              model.state_dict().items()},
               "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist(), "meta": asdict(meta)}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
