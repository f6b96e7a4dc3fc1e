"""The benchmark harness: its output format (what people grep), not its figures (benchmarks measure, tests don't)."""

from __future__ import annotations

import re

from tests.conftest import REPO, run_module


def test_harness_prints_rounds_and_the_greppable_line():
    out = run_module("benchmarks", REPO, "--quick", "--only", "in_memory_loader")
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    rounds = [line for line in lines if re.match(r"  in_memory_loader round \d: A \S+  B \S+  ratio \d+\.\d{3}$", line)]
    assert len(rounds) == 3  # quick mode: three alternated rounds after the warm-up
    ratios = sorted(float(line.rsplit(" ", 1)[1]) for line in rounds)
    final = re.fullmatch(r"benchmark in_memory_loader: ratio (\d+\.\d{3}) \(goal >= 0\.9\) (met|not met)", lines[-1])
    assert final, lines[-1]
    assert float(final.group(1)) == ratios[1]  # the median of the rounds
    assert (final.group(2) == "met") == (float(final.group(1)) >= 0.9)
