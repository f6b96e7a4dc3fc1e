"""CNN fundamentals: output sizes, parameter counts, manual convolution and pooling, classic filters."""

from pipeline.fundamentals.sizes import conv_output_size, resolve_padding
from pipeline.fundamentals.summary import LayerRow, layer_table, param_counts

__all__ = ["conv_output_size", "resolve_padding", "LayerRow", "layer_table", "param_counts"]
