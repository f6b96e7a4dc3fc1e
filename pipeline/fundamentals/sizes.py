"""Output size of a convolution or pooling layer: H' = floor((H + 2P - D*(K-1) - 1) / S) + 1.

With dilation D = 1 this is the course formula H' = (H - K + 2P) / S + 1, floored as frameworks do.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import PipelineError


def resolve_padding(padding: str | int, kernel_size: int, dilation: int = 1) -> int:
    """`valid` is 0; `same` keeps the size at stride 1: P = D*(K-1)/2 (odd effective kernels only)."""
    if isinstance(padding, int):
        if padding < 0:
            raise PipelineError(f"padding must be >= 0 (got {padding})")
        return padding
    if padding == "valid":
        return 0
    if padding == "same":
        effective = dilation * (kernel_size - 1)
        if effective % 2:
            raise PipelineError(f"padding 'same' needs an odd effective kernel (K={kernel_size}, D={dilation})")
        return effective // 2
    raise PipelineError(f"padding must be 'same', 'valid' or an integer >= 0 (got {padding!r})")


@dataclass(frozen=True)
class OutputSize:
    size: int
    exact: bool  # False when (H + 2P - D(K-1) - 1) is not divisible by S and the result was floored
    numerator: int
    stride: int

    def explain(self) -> str:
        if self.exact:
            return f"{self.numerator}/{self.stride} + 1 = {self.size}"
        return (f"{self.numerator}/{self.stride} + 1 = {self.numerator / self.stride + 1:g}, "
                f"floored to {self.size} (frameworks drop the last partial window)")


def conv_output_size(
    size: int, kernel_size: int, stride: int = 1, padding: str | int = 0, dilation: int = 1,
    layer: str = "layer",
) -> OutputSize:
    """Output height (or width) of a conv/pool layer; a kernel larger than the padded input is an error."""
    if size < 1 or kernel_size < 1 or stride < 1 or dilation < 1:
        raise PipelineError(f"{layer}: sizes must be >= 1 (H={size}, K={kernel_size}, S={stride}, D={dilation})")
    pad = resolve_padding(padding, kernel_size, dilation)
    effective_k = dilation * (kernel_size - 1) + 1
    padded = size + 2 * pad
    if effective_k > padded:
        raise PipelineError(
            f"{layer}: kernel {effective_k}x{effective_k} is larger than its {padded}x{padded} input "
            f"(H={size}, P={pad})"
        )
    numerator = padded - effective_k
    return OutputSize(numerator // stride + 1, numerator % stride == 0, numerator, stride)
