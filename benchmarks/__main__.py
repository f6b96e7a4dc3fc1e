"""`python -m benchmarks [--quick]`: every benchmark, measured side by side in one process.

Each benchmark warms up first, then alternates its two variants over several rounds (A B A B ...), and prints
the median ratio with its min-max over the rounds and the goal. The last lines, one per benchmark, are the ones
to grep: `benchmark <name>: ratio <x.xxx> (goal >= <y>) met|not met`. Ratios compare variants measured in the
same run on the same machine; absolute figures are printed for context only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from benchmarks import suite


@dataclass
class Benchmark:
    name: str
    goal: float
    what: str  # what the ratio compares
    setup: Callable[[bool], tuple[Callable[[], float], Callable[[], float]]]  # quick -> (measure A, measure B)


BENCHMARKS = [
    Benchmark("lightning_step", 0.97, "steps/s: the project's LightningModule and Trainer settings / a plain loop",
              suite.lightning_step),
    Benchmark("augment_end_to_end", 0.90, "epoch time without / with the default augmentation",
              suite.augment_end_to_end),
    Benchmark("feature_cache", 10.0, "time of the naive frozen loop / cached features, at the stage's head_steps",
              suite.feature_cache),
    Benchmark("in_memory_loader", 0.90, "images/s: the data path without augmentation / indexing one tensor",
              suite.in_memory_loader),
    Benchmark("roofline", 0.50, "FLOP/s of the seed CNN's training step / FLOP/s of a 2048^3 float32 matmul",
              suite.roofline),
]


def run(bench: Benchmark, quick: bool, rounds: int) -> tuple[float, float, float]:
    measure_a, measure_b = bench.setup(quick)
    measure_a(), measure_b()  # warm-up: allocator, thread pools, caches, lazy imports
    ratios = []
    for r in range(rounds):
        # A B, then B A: neither variant always runs first
        a, b = (measure_a(), measure_b()) if r % 2 == 0 else tuple(reversed((measure_b(), measure_a())))
        ratios.append(a / b)
        print(f"  {bench.name} round {r + 1}: A {a:.4g}  B {b:.4g}  ratio {a / b:.3f}", flush=True)
    return statistics.median(ratios), min(ratios), max(ratios)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 rounds: about a minute or two; "
                        "without it, 5 rounds at full sizes, then the full-MNIST time to 99.2%% test accuracy")
    parser.add_argument("--only", nargs="*", help="benchmark names to run")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tempfile.mkdtemp()}/mlflow.db")
    os.chdir(tempfile.mkdtemp())  # checkpoints and stores of the measured trainings stay out of the repository
    rounds = 3 if args.quick else 5
    chosen = [b for b in BENCHMARKS if not args.only or b.name in args.only]
    results = {}
    for bench in chosen:
        print(f"{bench.name}: {bench.what}", flush=True)
        start = time.perf_counter()
        results[bench.name] = run(bench, args.quick, rounds)
        median, low, high = results[bench.name]
        print(f"  median {median:.3f} (min {low:.3f}, max {high:.3f}) over {rounds} rounds, goal >= {bench.goal}; "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    if not args.quick and not args.only:  # full mode also times the full-MNIST recipe to 99.2%
        from benchmarks import time_to_accuracy

        time_to_accuracy.main([])
    for bench in chosen:
        median = results[bench.name][0]
        print(f"benchmark {bench.name}: ratio {median:.3f} (goal >= {bench.goal:g}) "
              f"{'met' if median >= bench.goal else 'not met'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
