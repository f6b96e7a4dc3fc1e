"""Parameter counts by formula, per layer: conv (K*K*C_in/groups + 1) * C_out, dense (in + 1) * out,
pooling 0, BatchNorm 2 * C trainable. Checked against torch's own counts for every registry architecture."""

from __future__ import annotations

from torch import nn


def conv_params(k: int, c_in: int, c_out: int, bias: bool = True, groups: int = 1) -> int:
    return (k * k * c_in // groups + (1 if bias else 0)) * c_out


def dense_params(n_in: int, n_out: int, bias: bool = True) -> int:
    return (n_in + (1 if bias else 0)) * n_out


def dense_weights(sizes: list[int]) -> int:
    """Weights (no biases) of a fully connected stack: 784 -> 512 -> 10 is 784*512 + 512*10."""
    return sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=False))


def formula_params(module: nn.Module) -> int:
    """A layer's parameters from the course formulas (raises for a layer type they do not cover)."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return (kh * kw * module.in_channels // module.groups + (module.bias is not None)) * module.out_channels
    if isinstance(module, nn.Linear):
        return dense_params(module.in_features, module.out_features, module.bias is not None)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return 2 * module.num_features if module.affine else 0
    if not any(True for _ in module.parameters(recurse=False)):
        return 0  # pooling, activations, dropout, flatten
    raise TypeError(f"no formula for {type(module).__name__}")


def model_formula_params(model: nn.Module) -> int:
    return sum(formula_params(m) for m in model.modules())
