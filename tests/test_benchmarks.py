"""The benchmark harness: its output format (what people grep), not its figures (benchmarks measure, tests don't)."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import PYTHON, REPO, run_module


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


def test_a_misspelt_benchmark_name_is_one_line_and_runs_nothing(run_stage):
    """In process (run_stage): the argument checks come before any measurement, so they need no new
    interpreter and its torch import."""
    r = run_stage(REPO, "benchmarks.__main__", "--only", "roofline", "rooflin")
    assert r.code == 2
    assert "--only: unknown benchmark 'rooflin'; known: lightning_step" in r.err
    assert "roofline:" not in r.out  # nothing measured before the error
    r = run_stage(REPO, "benchmarks.__main__", "--quick", "--only", "roofline", "time_to_accuracy")
    assert r.code == 2 and "--only time_to_accuracy: runs in full mode only" in r.err


def test_time_to_accuracy_names_a_misspelt_params_key_and_its_likely_meaning(run_stage):
    r = run_stage(REPO, "benchmarks.time_to_accuracy", "--set", "trian.lr=0.1")
    assert r.code == 2 and "Traceback" not in r.err, r.err[-2000:]
    assert r.err.strip().splitlines()[-1].startswith("error: --set trian.lr: no such params key; did you mean")
    assert "train.lr" in r.err
    r = run_stage(REPO, "benchmarks.time_to_accuracy", "--set", "train.lr")
    assert r.code == 2 and "expected KEY=VALUE" in r.err
    r = run_stage(REPO, "benchmarks.time_to_accuracy", "--set", "model.blocks.5=3")
    assert r.code == 2 and "model.blocks has 3 items" in r.err and "Traceback" not in r.err
    r = run_stage(REPO, "benchmarks.time_to_accuracy", "--set", "train.lr=-1")
    assert r.code == 2 and "train.lr must be > 0" in r.err and "Traceback" not in r.err
    # The script itself, as the README runs it: the same one line and exit code from a new interpreter.
    out = subprocess.run([PYTHON, "benchmarks/time_to_accuracy.py", "--set", "trian.lr=0.1"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith("error: --set trian.lr: no such params key")
