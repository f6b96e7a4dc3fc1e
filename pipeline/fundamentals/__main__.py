"""Command line: `python -m pipeline.fundamentals size|params|conv-demo ...` (also `cnn-fundamentals`)."""

from __future__ import annotations

import argparse

from pipeline.errors import stage_main
from pipeline.fundamentals.ops import EXAMPLE_FILTER, EXAMPLE_IMAGE, EXAMPLE_POOL_INPUT, conv2d, pool2d
from pipeline.fundamentals.params import dense_weights
from pipeline.fundamentals.sizes import conv_output_size
from pipeline.fundamentals.summary import format_table, layer_table


def _padding(value: str) -> str | int:
    return value if value in ("same", "valid") else int(value)


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.fundamentals", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    size = sub.add_parser("size", help="output size H' = floor((H - K + 2P) / S) + 1")
    size.add_argument("--input", type=int, required=True)
    size.add_argument("--kernel", type=int, required=True)
    size.add_argument("--padding", type=_padding, default=0, help="same, valid or an integer")
    size.add_argument("--stride", type=int, default=1)
    size.add_argument("--dilation", type=int, default=1)
    params = sub.add_parser("params", help="per-layer parameter table of a registry architecture")
    params.add_argument("name", help="e.g. seed_mnist, lenet5, resnet50")
    params.add_argument("--size", type=int, help="input size (default: the architecture's canonical one)")
    sub.add_parser("conv-demo", help="the course's worked convolution and pooling examples")
    sub.add_parser("dense-vs-conv", help="why images need convolutions: fully connected weight counts")
    args = parser.parse_args(argv)

    if args.command == "size":
        out = conv_output_size(args.input, args.kernel, args.stride, args.padding, args.dilation, layer="conv")
        print(f"H' = {out.size}   ({out.explain()})")
    elif args.command == "params":
        from pipeline.models import registry

        arch = registry.get(args.name)
        size = args.size or arch.canonical_size
        model = arch.build(arch.canonical_classes, size, arch.channels)
        print(format_table(layer_table(model, (arch.channels, size, size)), f"{arch.display} at {size}x{size}"))
    elif args.command == "conv-demo":
        print("5x5 image * 3x3 filter (valid, stride 1) ->")
        print(conv2d(EXAMPLE_IMAGE[None, None], EXAMPLE_FILTER[None, None])[0, 0].astype(int))
        print("4x4 max pool 2x2 ->")
        print(pool2d(EXAMPLE_POOL_INPUT[None, None], 2)[0, 0].astype(int))
        print("4x4 average pool 2x2 ->")
        print(pool2d(EXAMPLE_POOL_INPUT[None, None], 2, mode="avg")[0, 0])
    else:
        first, mnist = dense_weights([784, 512]), dense_weights([784, 512, 10])
        rgb = 224 * 224 * 3 * 512
        print(f"MNIST 28x28 -> 512 -> 10, fully connected: 784x512 = {first:,} weights in the first layer, "
              f"{mnist:,} with 512x10")
        print(f"RGB 224x224x3 -> 512, one dense layer: {rgb:,} weights (a 3x3 conv with 64 filters: "
              f"{(3 * 3 * 3 + 1) * 64:,} parameters)")


if __name__ == "__main__":
    main()
