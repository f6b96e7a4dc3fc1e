"""Held-out evaluation: classification metrics, calibration, speed on the current device, and sweep summaries."""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from sklearn import metrics as skm
from torch import nn


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
    """Batch-1 latency: `warmup` untimed runs first (allocator, caches, lazy init), then `runs` timed ones."""
    model = model.to(device).eval()
    x = torch.rand((1, *input_shape), device=device)
    for _ in range(warmup):
        model(x)
    _sync(device)
    times = []
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
    """Images per second at `batch_size`, best of `repeats` after one warm-up batch."""
    model = model.to(device).eval()
    x = torch.rand((batch_size, *input_shape), device=device)
    model(x)
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return batch_size / best


@torch.no_grad()
def peak_memory_mb(model: nn.Module, input_shape: tuple[int, ...], batch_size: int,
                   device: torch.device) -> float:
    """Peak memory one forward pass at `batch_size` allocates on top of the weights (activations, workspace).

    CUDA: the allocator's peak minus what was allocated before. CPU: torch's profiler records every
    allocation and free; their running sum, in time order, peaks at the answer.
    """
    model = model.to(device).eval()
    x = torch.rand((batch_size, *input_shape), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        model(x)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(x)
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    current = peak = 0
    for event in events:
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 2**20


def macs_per_image(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass, counted by torch's own FLOP counter (FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros((1, *input_shape)))
    return int(counter.get_total_flops() // 2)


def sweep_summary(rows: list[dict], strategies: list[str], ns: list[int]) -> tuple[dict, dict, list[str]]:
    """Mean and std per (N, strategy); per N the winner, the runner-up, and whether the gap beats the spread."""
    summary, verdict, lines = {}, {}, []
    for n in ns:
        summary[str(n)] = {}
        for strategy in strategies:
            accs = np.array([r["test_acc"] for r in rows if r["target_per_class"] == n and r["strategy"] == strategy])
            summary[str(n)][strategy] = {"mean": round(float(accs.mean()), 6),
                                         "std": round(float(accs.std(ddof=1)) if len(accs) > 1 else 0.0, 6),
                                         "runs": int(len(accs))}
        ranked = sorted(strategies, key=lambda st: -summary[str(n)][st]["mean"])
        best = summary[str(n)][ranked[0]]
        entry = {"winner": ranked[0], "mean": best["mean"]}
        if len(ranked) > 1:
            second = summary[str(n)][ranked[1]]
            gap = best["mean"] - second["mean"]
            spread = max(best["std"], second["std"])
            entry |= {"runner_up": ranked[1], "gap": round(gap, 6), "spread": round(spread, 6),
                      "clear": bool(gap > spread)}
            lines.append(f"N={n}: {ranked[0]} {best['mean']:.3f} +- {best['std']:.3f} vs {ranked[1]} "
                         f"{second['mean']:.3f} +- {second['std']:.3f}: gap {gap:.3f} "
                         f"{'>' if gap > spread else '<='} spread {spread:.3f} "
                         f"({'clear' if gap > spread else 'within the spread'})")
        verdict[str(n)] = entry
    return summary, verdict, lines
