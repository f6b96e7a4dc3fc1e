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

import torch

from benchmarks import suite
from pipeline.training.fit import cpu_has_bf16


@dataclass
class Benchmark:
    name: str
    goal: float
    what: str  # what the ratio compares
    setup: Callable[[bool], tuple[Callable[[], float], Callable[[], float]]]  # quick -> (measure A, measure B)
    full_only: bool = False  # too long for --quick
    rounds: int | None = None  # None: the harness's (3 quick, 5 full)
    warmup: bool = True  # False: each measurement is a whole training, warm from the one before


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
    Benchmark("roofline_bf16", 0.0, "the same in bf16 mixed precision / a 2048^3 bfloat16 matmul (printed)",
              suite.roofline_bf16),
    Benchmark("bf16_step", 2.5, "steps/s of the seed CNN at batch 128: bf16 autocast / fp32", suite.bf16_step),
    Benchmark("predict_layout", 1.0, "images/s of prediction, EfficientNet-Lite0 at 224 px: channels-last (what the "
              "stages run) / NCHW", suite.predict_layout),
    Benchmark("cuda_check", 0.0, "steps/s of the photo sweep's scratch arm: the CUDA check the training code "
              "leaves / Lightning's NVML check (printed)", suite.cuda_check),
    Benchmark("sweep_pool", 1.0, "trainings/s of 12 short seed-CNN trainings (4 quick): sweep_workers auto (one 1-thread "
              "process per core on the CPU, start-up included) / one process on every thread", suite.sweep_pool,
              rounds=3),
    Benchmark("time_to_accuracy", 3.0, "seconds to 99.2% test accuracy on full MNIST: the recipe before "
              "(3 epochs, fp32) / today's mnist_full", suite.time_to_accuracy, full_only=True, rounds=2,
              warmup=False),
]


def run(bench: Benchmark, quick: bool, rounds: int) -> tuple[float, float, float]:
    measure_a, measure_b = bench.setup(quick)
    if bench.warmup:
        measure_a(), measure_b()  # warm-up: allocator, thread pools, caches, lazy imports
    rounds = bench.rounds or rounds
    ratios = []
    for r in range(rounds):
        # A B, then B A: neither variant always runs first
        a, b = (measure_a(), measure_b()) if r % 2 == 0 else tuple(reversed((measure_b(), measure_a())))
        ratios.append(a / b)
        print(f"  {bench.name} round {r + 1}: A {a:.4g}  B {b:.4g}  ratio {a / b:.3f}", flush=True)
    return statistics.median(ratios), min(ratios), max(ratios)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 rounds: about two minutes; without "
                        "it, 5 rounds at full sizes and the full-MNIST time to 99.2%% test accuracy, before and now")
    parser.add_argument("--only", nargs="*", help="benchmark names to run")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to run: auto (the GPU when there is one), cpu or cuda")
    args = parser.parse_args(argv)
    names = [b.name for b in BENCHMARKS]
    unknown = [n for n in args.only or [] if n not in names]
    if unknown:
        parser.error(f"--only: unknown benchmark {', '.join(map(repr, unknown))}; known: {', '.join(names)}")
    full_only = [b.name for b in BENCHMARKS if b.full_only and b.name in (args.only or [])]
    if args.quick and full_only:
        parser.error(f"--only {', '.join(full_only)}: runs in full mode only (drop --quick)")
    device = suite.configure(args.device)
    print(f"benchmarks on {device.type}" + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else
                                             f" ({os.cpu_count()} cores; native bf16: {cpu_has_bf16()})"), flush=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tempfile.mkdtemp()}/mlflow.db")
    os.chdir(tempfile.mkdtemp())  # checkpoints and stores of the measured trainings stay out of the repository
    rounds = 3 if args.quick else 5
    chosen = [b for b in BENCHMARKS if (not args.only or b.name in args.only) and not (args.quick and b.full_only)]
    results = {}
    for bench in chosen:
        print(f"{bench.name}: {bench.what}", flush=True)
        start = time.perf_counter()
        results[bench.name] = run(bench, args.quick, rounds)
        median, low, high = results[bench.name]
        print(f"  median {median:.3f} (min {low:.3f}, max {high:.3f}) over {bench.rounds or rounds} rounds, goal >= "
              f"{bench.goal}; {time.perf_counter() - start:.0f} s", flush=True)
    for bench in chosen:
        median = results[bench.name][0]
        verdict = "met" if median >= bench.goal else "not met"
        if bench.name == "bf16_step" and device.type == "cpu" and not cpu_has_bf16():
            verdict = "not applicable (no native bf16 on this CPU)"
        goal = f"goal >= {bench.goal:g}" if bench.goal else "printed"
        print(f"benchmark {bench.name}: ratio {median:.3f} ({goal}) {verdict if bench.goal else 'measured'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
