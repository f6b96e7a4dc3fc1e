"""Output sizes from the seed's table, checked against torch too."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.fundamentals.sizes import conv_output_size


@pytest.mark.parametrize(("h", "k", "p", "s", "expected"),
                         [(28, 3, 0, 1, 26), (28, 3, "same", 1, 28), (28, 3, 1, 1, 28), (28, 3, 0, 2, 13),
                          (224, 7, 3, 2, 112)])
def test_seed_output_sizes(h, k, p, s, expected):
    assert conv_output_size(h, k, s, p).size == expected
    pad = 1 if p == "same" else p
    conv = torch.nn.Conv2d(1, 1, k, s, pad)
    assert conv(torch.zeros(1, 1, h, h)).shape[-1] == expected


def test_non_integer_division_is_floored_and_explained():
    out = conv_output_size(28, 3, 2, 0)
    assert not out.exact and "floored to 13" in out.explain()


def test_kernel_larger_than_input_is_an_error():
    with pytest.raises(PipelineError, match="kernel 7x7 is larger than its 5x5 input"):
        conv_output_size(5, 7, 1, 0)
