"""Held-out evaluation: classification metrics, calibration, speed on the current device, and sweep summaries."""

from __future__ import annotations

import contextlib
import statistics
import time

import numpy as np
import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.predict import as_served, served_layout


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """Weighted mean |accuracy - confidence| over equal-width confidence bins."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def top_k_accuracy(y_true: np.ndarray, probs: np.ndarray, k: int) -> float:
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1)[:, :k]
    return float((top == y_true[:, None]).any(axis=1).mean())


def classification_report(y_true: np.ndarray, probs: np.ndarray, class_names: list[str], top_k: int,
                          ece_bins: int) -> dict:
    """Accuracy, top-k, macro/weighted F1, ECE, per-class precision/recall/F1 and the confusion matrix."""
    # sklearn here, not at import: the stages that only train skip its 1-2 s import
    from sklearn import metrics as skm

    y_pred = probs.argmax(axis=1)
    labels = list(range(len(class_names)))
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    return {
        "accuracy": float((y_pred == y_true).mean()),
        f"top_{min(top_k, len(class_names))}_accuracy": top_k_accuracy(y_true, probs, top_k),
        "f1_macro": float(skm.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "f1_weighted": float(skm.f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
        "ece": expected_calibration_error(y_true, probs, ece_bins),
        "per_class": [
            {"class": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(class_names, precision, recall, f1, support, strict=True)
        ],
        "confusion": skm.confusion_matrix(y_true, y_pred, labels=labels),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def latency_ms(model: nn.Module, input_shape: tuple[int, ...], runs: int, warmup: int,
               device: torch.device) -> dict[str, float]:
    """Batch-1 latency: `warmup` untimed runs first (allocator, caches, lazy init), then `runs` timed ones; in the
    layout predictions run in (channels-last)."""
    model = model.to(device).eval()
    x = as_served(torch.rand((1, *input_shape), device=device))
    times = []
    with served_layout(model):
        for _ in range(warmup):
            model(x)
        _sync(device)
        for _ in range(runs):
            start = time.perf_counter()
            model(x)
            _sync(device)
            times.append((time.perf_counter() - start) * 1000.0)
    times.sort()
    return {"latency_ms_p50": statistics.median(times),
            "latency_ms_p90": times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))],
            "latency_runs": len(times), "latency_warmup_runs": warmup}


@torch.no_grad()
def throughput(model: nn.Module, input_shape: tuple[int, ...], batch_size: int, device: torch.device,
               repeats: int = 3) -> float:
    """Images per second at `batch_size`, best of `repeats` after one warm-up batch; channels-last, as predicted."""
    model = model.to(device).eval()
    x = as_served(torch.rand((batch_size, *input_shape), device=device))
    best = float("inf")
    with served_layout(model):
        model(x)
        _sync(device)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            _sync(device)
            best = min(best, time.perf_counter() - start)
    return batch_size / best


@contextlib.contextmanager
def _native_stderr_muted():
    """The profiler's C++ library writes a start and a stop line straight to file descriptor 2 whatever its log
    level (KINETO_LOG_LEVEL): muted for the one step it profiles (an exception still propagates, and prints
    after)."""
    import os
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _peak_mb(work, device: torch.device) -> float:
    """Peak memory `work()` allocates on top of what was allocated before. CUDA: the allocator's peak. CPU: torch's
    profiler records every allocation and free; their running sum, in time order, peaks at the answer."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        work()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with _native_stderr_muted(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    current = peak = 0
    for event in events:
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 2**20


def peak_memory_mb(model: nn.Module, input_shape: tuple[int, ...], batch_size: int,
                   device: torch.device) -> float:
    """Peak memory one forward pass at `batch_size` allocates on top of the weights (activations, workspace), in
    the layout predictions run in."""
    model = model.to(device).eval()
    x = as_served(torch.rand((batch_size, *input_shape), device=device))
    with torch.no_grad(), served_layout(model):
        return _peak_mb(lambda: model(x), device)


def training_memory_mb(model: nn.Module, input_shape: tuple[int, ...], batch_size: int,
                       device: torch.device) -> float:
    """Peak memory one training step (forward, loss, backward) at `batch_size` allocates on top of the weights:
    activations kept for the backward pass, gradients, workspace."""
    model = model.to(device).train()
    x = torch.rand((batch_size, *input_shape), device=device)
    y = torch.zeros(batch_size, dtype=torch.long, device=device)

    def step() -> None:
        nn.functional.cross_entropy(model(x), y).backward()

    peak = _peak_mb(step, device)
    model.zero_grad(set_to_none=True)
    return peak


def macs_per_image(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass, counted by torch's own FLOP counter (FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros((1, *input_shape)))
    return int(counter.get_total_flops() // 2)


# ------------------------------------------------------------------------------- spreads and verdicts
OUTCOMES = ("holds", "contradicted", "inconclusive")


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample std, min-max and a 95% confidence interval of the mean (Student's t) of repeated runs."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        raise PipelineError(f"a spread needs at least 2 runs (got {len(v)}): raise the seeds")
    mean, std = float(v.mean()), float(v.std(ddof=1))
    half = float(stats.t.ppf(0.975, len(v) - 1) * std / np.sqrt(len(v)))
    return {"mean": round(mean, 6), "std": round(std, 6), "min": round(float(v.min()), 6),
            "max": round(float(v.max()), 6), "ci95": [round(mean - half, 6), round(mean + half, 6)], "n": int(len(v))}


def verdict(expected: list[float], other: list[float]) -> dict:
    """The one verdict rule of the project (transfer sweeps and the course's claims): `expected` is the arm a
    claim predicts higher. gap = mean(expected) - mean(other); spread = the larger of the two arms' sample
    standard deviations over seeds. holds: gap > spread; contradicted: gap < -spread; inconclusive otherwise (a
    gap equal to the spread included)."""
    a, b = spread(expected), spread(other)
    gap, width = a["mean"] - b["mean"], max(a["std"], b["std"])
    outcome = "holds" if gap > width else "contradicted" if gap < -width else "inconclusive"
    return {"gap": round(gap, 6), "spread": round(width, 6), "outcome": outcome}


PRETRAINED = ("feature_extraction", "fine_tuning")


def sweep_summary(rows: list[dict], strategies: list[str], ns: list[int]) -> tuple[dict, dict, list[str]]:
    """Per (N, strategy) the spread of test accuracy over seeds; per N the winner, and the two comparisons the
    lesson is about, by the verdict rule: the better ImageNet strategy against scratch (transfer wins: holds),
    and fine-tuning against feature extraction."""
    summary, verdicts, lines = {}, {}, []
    for n in ns:
        accs = {st: [r["test_acc"] for r in rows if r["target_per_class"] == n and r["strategy"] == st]
                for st in strategies}
        summary[str(n)] = {st: spread(v) for st, v in accs.items()}
        ranked = sorted(strategies, key=lambda st: -summary[str(n)][st]["mean"])
        entry: dict = {"winner": ranked[0], "mean": summary[str(n)][ranked[0]]["mean"]}
        pretrained = [st for st in PRETRAINED if st in strategies]
        if pretrained and "scratch" in strategies:
            best = max(pretrained, key=lambda st: summary[str(n)][st]["mean"])
            entry["transfer_vs_scratch"] = {"pretrained": best} | verdict(accs[best], accs["scratch"])
        if set(PRETRAINED) <= set(strategies):
            entry["fine_tuning_vs_feature_extraction"] = verdict(accs["fine_tuning"], accs["feature_extraction"])
        verdicts[str(n)] = entry
        parts = [f"N={n}: " + ", ".join(f"{st} {summary[str(n)][st]['mean']:.3f} +- {summary[str(n)][st]['std']:.3f}"
                                       for st in ranked)]
        if "transfer_vs_scratch" in entry:
            v = entry["transfer_vs_scratch"]
            word = {"holds": "transfer wins", "contradicted": "scratch wins", "inconclusive": "within the spread"}
            parts.append(f"{v['pretrained']} - scratch = {v['gap']:+.3f} (spread {v['spread']:.3f}): "
                         f"{word[v['outcome']]}")
        lines.append("; ".join(parts))
    return summary, verdicts, lines
