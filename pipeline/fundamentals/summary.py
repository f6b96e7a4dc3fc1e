"""A Keras-`summary()`-like table of any torch model (layer, type, output shape, parameters, mult-adds,
trainable), measured by torchinfo; the project's own formulas (`fundamentals.params`) cross-check it in tests."""

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
    mult_adds: int = 0

    @property
    def frozen(self) -> bool:
        return self.params > 0 and self.trainable == 0


def param_counts(model: nn.Module) -> dict[str, int]:
    """Total, trainable and non-trainable parameter counts (buffers such as BN running stats excluded)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "non_trainable": total - trainable}


def layer_table(model: nn.Module, input_shape: tuple[int, ...]) -> list[LayerRow]:
    """One zero batch of `input_shape` (C, H, W) through the model (torchinfo.summary): its leaf layers, in call
    order, named by their path in the model."""
    import torchinfo

    names = {id(module): name for name, module in model.named_modules()}
    was_training = model.training
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        stats = torchinfo.summary(model, input_size=(1, *input_shape), device=device, mode="eval", verbose=0,
                                  depth=100, col_names=("output_size", "num_params", "mult_adds", "trainable"))
    finally:
        model.train(was_training)
    return [LayerRow(name=names.get(id(info.module), info.var_name), type=info.class_name,
                     output_shape=tuple(info.output_size[1:]) if info.output_size else (),
                     params=info.num_params, trainable=info.trainable_params, mult_adds=int(info.macs))
            for info in stats.summary_list if info.is_leaf_layer]


def format_table(rows: list[LayerRow], title: str = "") -> str:
    """Render the table as fixed-width text, with totals, as Keras' model.summary() does."""
    header = f"{'Layer':<28}{'Type':<22}{'Output shape':<20}{'Params':>12}{'Mult-adds':>15}  {'':<6}"
    lines = [title, "=" * len(header), header, "-" * len(header)] if title else ["=" * len(header), header,
                                                                              "-" * len(header)]
    for r in rows:
        shape = "x".join(str(s) for s in r.output_shape) or "-"
        flag = "frozen" if r.frozen else ""
        lines.append(f"{r.name[:27]:<28}{r.type[:21]:<22}{shape:<20}{r.params:>12,}{r.mult_adds:>15,}  {flag:<6}")
    total = sum(r.params for r in rows)
    trainable = sum(r.trainable for r in rows)
    lines += ["=" * len(header), f"Total params: {total:,}", f"Trainable params: {trainable:,}",
              f"Non-trainable params: {total - trainable:,}"]
    return "\n".join(lines)


def table_rows(rows: list[LayerRow]) -> list[dict[str, object]]:
    """The table as CSV-ready dicts."""
    return [{"layer": r.name, "type": r.type, "output_shape": "x".join(map(str, r.output_shape)),
             "params": r.params, "trainable_params": r.trainable, "mult_adds": r.mult_adds, "frozen": r.frozen}
            for r in rows]
