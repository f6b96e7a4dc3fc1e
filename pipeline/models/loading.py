"""Reading a model file (pipeline.models.checkpoint writes it): the deployable classifier it describes, with its
weights and its ModelMeta, built from the architecture registry without any training code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from pipeline.errors import PipelineError
from pipeline.models import registry
from pipeline.models.checkpoint import FORMAT, ModelMeta
from pipeline.models.cnn import CNN, Classifier, CNNSpec
from pipeline.models.state import check_fits, read
from pipeline.models.transfer import TransferNet


def _cnn(arch: dict[str, Any]) -> tuple[nn.Module, int, int | None]:
    net = CNN(CNNSpec.from_dict(arch["spec"]), arch["in_channels"], arch["image_size"], arch["num_classes"])
    return net, arch["in_channels"], arch["image_size"]


def _transfer(arch: dict[str, Any]) -> tuple[nn.Module, int, int | None]:
    channels = registry.get(arch["backbone"]).input_channels(arch["in_channels"])
    net = TransferNet(arch["backbone"], arch["num_classes"], arch["head_units"], arch["head_dropout"],
                      arch["image_size"], channels)
    return net, channels, arch["image_size"]


BUILDERS = {"cnn": _cnn, "transfer": _transfer}


def build_classifier(arch: dict[str, Any], mean: list[float], std: list[float],
                     stored_size: int | None = None) -> Classifier:
    """The deployable model an arch description names. It resizes its input to the size its network was built
    for when that differs from the stored images' (a transfer backbone at 64 px on 28 px digits, our CNN at 64 px
    on 224 px photos)."""
    if arch.get("kind") not in BUILDERS:
        raise PipelineError(f"unknown model kind {arch.get('kind')!r} in checkpoint (known: {', '.join(BUILDERS)})")
    net, channels, net_size = BUILDERS[arch["kind"]](arch)
    return Classifier(net, mean, std, channels, net_size if net_size != stored_size else None)


def load(path: Path) -> tuple[Classifier, ModelMeta, dict[str, Any]]:
    """The classifier a model file describes with its weights, its ModelMeta and its arch description."""
    payload = read(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise PipelineError(f"checkpoint {path}: not a cnn-pipeline model file (format {FORMAT}); rerun the stage "
                            "that trained it")
    meta = ModelMeta.of(payload.get("meta"), f"checkpoint {path}")
    model = build_classifier(payload["arch"], payload["mean"], payload["std"], meta.image_size)
    check_fits(model.state_dict(), payload["state_dict"], f"checkpoint {path}", "the model")
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, meta, payload["arch"]
