"""A Keras-`summary()`-like table of any torch model: layer, type, output shape, parameters, trainable."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LayerRow:
    name: str
    type: str
    output_shape: tuple[int, ...]
    params: int
    trainable: int

    @property
    def frozen(self) -> bool:
        return self.params > 0 and self.trainable == 0


def param_counts(model: nn.Module) -> dict[str, int]:
    """Total, trainable and non-trainable parameter counts (buffers such as BN running stats excluded)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "non_trainable": total - trainable}


def layer_table(model: nn.Module, input_shape: tuple[int, ...]) -> list[LayerRow]:
    """Run one zero batch of `input_shape` (C, H, W) through the model and list its leaf layers."""
    rows: list[LayerRow] = []
    hooks = []

    def hook(name: str):
        def record(module: nn.Module, _inp, out) -> None:
            shape = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else ()
            params = list(module.parameters(recurse=False))
            rows.append(LayerRow(
                name=name, type=type(module).__name__, output_shape=shape,
                params=sum(p.numel() for p in params),
                trainable=sum(p.numel() for p in params if p.requires_grad),
            ))
        return record

    for name, module in model.named_modules():
        if name and not list(module.children()):
            hooks.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    # Leaf layers only: no architecture here keeps parameters directly on a container module.
    return rows


def format_table(rows: list[LayerRow], title: str = "") -> str:
    """Render the table as fixed-width text, with totals, as Keras' model.summary() does."""
    header = f"{'Layer':<28}{'Type':<22}{'Output shape':<20}{'Params':>12}  {'':<6}"
    lines = [title, "=" * len(header), header, "-" * len(header)] if title else ["=" * len(header), header,
                                                                              "-" * len(header)]
    for r in rows:
        shape = "x".join(str(s) for s in r.output_shape) or "-"
        flag = "frozen" if r.frozen else ""
        lines.append(f"{r.name[:27]:<28}{r.type[:21]:<22}{shape:<20}{r.params:>12,}  {flag:<6}")
    total = sum(r.params for r in rows)
    trainable = sum(r.trainable for r in rows)
    lines += ["=" * len(header), f"Total params: {total:,}", f"Trainable params: {trainable:,}",
              f"Non-trainable params: {total - trainable:,}"]
    return "\n".join(lines)


def table_rows(rows: list[LayerRow]) -> list[dict[str, object]]:
    """The table as CSV-ready dicts."""
    return [{"layer": r.name, "type": r.type, "output_shape": "x".join(map(str, r.output_shape)),
             "params": r.params, "trainable_params": r.trainable, "frozen": r.frozen} for r in rows]
