"""The pipeline's portable model file: an architecture description plus weights, loadable weights_only.

Stages write one per trained model (models/scratch/model.pt, models/transfer/<strategy>.pt); evaluate and
explain rebuild the model from it without importing any training code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.atomic import atomic_path
from pipeline.errors import PipelineError
from pipeline.models import registry
from pipeline.models.classifier import Classifier
from pipeline.models.cnn import CNN, CNNSpec
from pipeline.models.state import check_fits, read
from pipeline.models.transfer import TransferNet

FORMAT = "cnn-pipeline/1"


def cnn_arch(spec: CNNSpec, in_channels: int, image_size: int, num_classes: int) -> dict[str, Any]:
    return {"kind": "cnn", "spec": spec.to_dict(), "in_channels": in_channels, "image_size": image_size,
            "num_classes": num_classes}


def transfer_arch(backbone: str, num_classes: int, head_units: int, head_dropout: float, image_size: int,
                  in_channels: int) -> dict[str, Any]:
    return {"kind": "transfer", "backbone": backbone, "num_classes": num_classes, "head_units": head_units,
            "head_dropout": head_dropout, "image_size": image_size, "in_channels": in_channels}


def _cnn(arch: dict[str, Any]) -> tuple[nn.Module, int]:
    net = CNN(CNNSpec.from_dict(arch["spec"]), arch["in_channels"], arch["image_size"], arch["num_classes"])
    return net, arch["in_channels"]


def _transfer(arch: dict[str, Any]) -> tuple[nn.Module, int]:
    channels = registry.get(arch["backbone"]).input_channels(arch["in_channels"])
    net = TransferNet(arch["backbone"], arch["num_classes"], arch["head_units"], arch["head_dropout"],
                      arch["image_size"], channels)
    return net, channels


BUILDERS = {"cnn": _cnn, "transfer": _transfer}


def build_net(arch: dict[str, Any]) -> tuple[nn.Module, int]:
    """The bare network an arch description names, and the input channels it expects."""
    if arch.get("kind") not in BUILDERS:
        raise PipelineError(f"unknown model kind {arch.get('kind')!r} in checkpoint (known: {', '.join(BUILDERS)})")
    return BUILDERS[arch["kind"]](arch)


def build_classifier(arch: dict[str, Any], mean: list[float], std: list[float]) -> Classifier:
    """The deployable model; transfer models resize their input to the size their base was trained at."""
    net, channels = build_net(arch)
    return Classifier(net, mean, std, channels, arch["image_size"] if arch["kind"] == "transfer" else None)


def save(path: Path, model: Classifier, arch: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write the checkpoint atomically. `meta` holds class names/ids, image size, MLflow run id, ..."""
    payload = {"format": FORMAT, "arch": arch, "state_dict": {k: v.detach().cpu() for k, v in
                                                              model.state_dict().items()},
               "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist(), "meta": meta}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load(path: Path) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the classifier a pipeline checkpoint describes and load its weights; meta alongside."""
    payload = read(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise PipelineError(f"checkpoint {path}: not a cnn-pipeline model file (format {FORMAT})")
    model = build_classifier(payload["arch"], payload["mean"], payload["std"])
    check_fits(model.state_dict(), payload["state_dict"], f"checkpoint {path}", "the model")
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, payload["meta"] | {"arch": payload["arch"]}
