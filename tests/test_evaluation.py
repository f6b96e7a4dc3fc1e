"""Metrics on hand-made predictions equal hand-computed values; latency is measured after warm-up."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.evaluation import classification_report, expected_calibration_error, latency_ms


def hand_made():
    # 6 samples, 3 classes; predictions: 0,0,1,1,2,0 ; truth: 0,0,1,2,2,1. No ties among the two highest
    # probabilities of any sample, so top-2 does not depend on how a sort orders equal values.
    probs = np.array([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1],
                      [0.15, 0.8, 0.05], [0.3, 0.1, 0.6], [0.5, 0.4, 0.1]])
    return np.array([0, 0, 1, 2, 2, 1]), probs


def test_metrics_equal_hand_computed_values():
    y, probs = hand_made()
    report = classification_report(y, probs, ["a", "b", "c"], top_k=2, ece_bins=10)
    assert report["accuracy"] == pytest.approx(4 / 6)
    # top-2 sets: {0,1} {0,1} {1,0} {1,0} {2,0} {0,1}: only sample 3 (truth 2) misses
    assert report["top_2_accuracy"] == pytest.approx(5 / 6)
    # per class: a: P=2/3 R=1 F1=0.8 ; b: P=1/2 R=1/2 F1=0.5 ; c: P=1 R=1/2 F1=2/3
    f1 = [0.8, 0.5, 2 / 3]
    assert [r["f1"] for r in report["per_class"]] == pytest.approx(f1)
    assert [r["support"] for r in report["per_class"]] == [2, 2, 2]
    assert report["f1_macro"] == pytest.approx(np.mean(f1))
    assert report["f1_weighted"] == pytest.approx((0.8 * 2 + 0.5 * 2 + 2 / 3 * 2) / 6)
    # ECE, 10 bins of width 0.1; confidence (correct?): 0.9 (y) 0.6 (y) 0.7 (y) 0.8 (n) 0.6 (y) 0.5 (n)
    # bins: (0.4,0.5] {0.5 n}: |0-0.5|; (0.5,0.6] {0.6 y, 0.6 y}: 2 x |1-0.6|; (0.6,0.7] {0.7 y}: |1-0.7|;
    # (0.7,0.8] {0.8 n}: |0-0.8|; (0.8,0.9] {0.9 y}: |1-0.9|; weighted by 1/6 a sample
    assert report["ece"] == pytest.approx((0.5 + 2 * 0.4 + 0.3 + 0.8 + 0.1) / 6)
    cm = report["confusion"]
    assert cm.tolist() == [[2, 0, 0], [1, 1, 0], [0, 1, 1]]
    assert cm.sum(axis=1).tolist() == np.bincount(y).tolist()


def test_ece_by_hand():
    y = np.array([0, 1])
    probs = np.array([[0.9, 0.1], [0.6, 0.4]])  # confident right (0.9), wrong at 0.6
    # bins of width 0.5: (0.5, 1.0] holds both: acc 0.5, conf 0.75 -> ECE 0.25
    assert expected_calibration_error(y, probs, bins=2) == pytest.approx(0.25)


def test_latency_times_only_the_runs_after_warm_up(monkeypatch):
    """A fake clock: each forward pass advances it by a known amount (warm-up passes by 1 s each, timed passes
    by 1..7 ms), so the reported latencies show exactly which passes were timed."""
    import pipeline.evaluation as evaluation

    clock = {"now": 0.0, "calls": 0}
    durations = [1.0] * 3 + [0.001 * k for k in (3, 1, 7, 2, 6, 4, 5)]  # 3 warm-up passes, then 7 timed

    class Ticking(torch.nn.Module):
        def forward(self, x):
            # a pass beyond the planned ten (a product that times warm-up too) takes a second, visibly
            clock["now"] += durations[clock["calls"]] if clock["calls"] < len(durations) else 1.0
            clock["calls"] += 1
            return x

    monkeypatch.setattr(evaluation.time, "perf_counter", lambda: clock["now"])
    result = latency_ms(Ticking(), (1, 4, 4), runs=7, warmup=3, device=torch.device("cpu"))
    assert clock["calls"] == 10 and result["latency_runs"] == 7 and result["latency_warmup_runs"] == 3
    assert result["latency_ms_p50"] == pytest.approx(4.0)  # median of 1..7 ms: no warm-up second in it
    assert result["latency_ms_p90"] == pytest.approx(6.0)  # the 90th percentile of 7 runs: the 6th fastest


def test_peak_memory_grows_with_batch_size():
    from pipeline.evaluation import peak_memory_mb

    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU())
    small = peak_memory_mb(conv, (3, 32, 32), 8, torch.device("cpu"))
    large = peak_memory_mb(conv, (3, 32, 32), 64, torch.device("cpu"))
    one_output_mb = 64 * 64 * 32 * 32 * 4 / 2**20  # the conv's output at batch 64: 16 MB
    assert small > 0 and large == pytest.approx(8 * small, rel=0.25)
    assert one_output_mb <= large <= 3 * one_output_mb


def test_speed_figures_run_the_model_as_predictions_do():
    """Latency, throughput and peak memory time the model in the layout predict_logits runs it in (channels-last
    weights and inputs), not another one; the model's weights get their own layout back."""
    from pipeline.evaluation import peak_memory_mb, throughput

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    seen = []
    model[2].register_forward_hook(lambda m, inp, _o: seen.append(all(
        t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() for t in (inp[0], m.weight))))
    cpu = torch.device("cpu")
    latency_ms(model, (3, 12, 12), runs=4, warmup=2, device=cpu)
    assert throughput(model, (3, 12, 12), 8, cpu, repeats=2) > 0
    assert peak_memory_mb(model, (3, 12, 12), 8, cpu) > 0
    assert seen == [True] * (6 + 3 + 1)
    assert all(w.is_contiguous() for w in model.parameters() if w.dim() == 4)
