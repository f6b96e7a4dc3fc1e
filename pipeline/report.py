"""Markdown reports the stages write for people to read (reports/*.md)."""

from __future__ import annotations


def compare_markdown(static: list[dict], trained: list[dict]) -> str:
    """The compare stage's tables as Markdown (reports/compare.md)."""
    lines = ["# Architectures side by side", "",
             "## Static: the seed's table, counted from the real models", "",
             "\"Seed says\" quotes the seed's table; a dash where the seed gives no figure.", "",
             "| Architecture | Year | Input | Parameters | Seed says | Diff | MACs/image | Size (MB) | Key idea |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in static:
        diff = f"{r['rel_diff_vs_seed']:+.1%}" if r["rel_diff_vs_seed"] is not None else "—"
        idea = r["key_idea"] + (f" ({r['note']})" if r["note"] else "")
        lines.append(f"| {r['architecture']} | {r['year']} | {r['input']} | {r['params']:,} | "
                     f"{r['seed_says'] or '—'} | {diff} | {r['macs']:,} | {r['size_mb']} | {idea} |")
    if trained:
        lines += ["", "## Trained on the prepared data (same epochs, optimizer and augmentation)", "",
                  "Each architecture trains at compare.image_size or, where its downsampling needs more, at its "
                  "own smallest useful input (the Input column says which, and why).", "",
                  "| Architecture | Input | Parameters | MACs/image | Test acc | Train time (s) | Latency p50 (ms) | "
                  "Limited by |", "|---|---|---:|---:|---:|---:|---:|---|"]
        for r in trained:
            lines.append(f"| {r['architecture']} | {r['input']} | {r['params']:,} | {r['macs']:,} | "
                         f"{r['test_acc']:.4f} | {r['train_time_s']:.1f} | {r['latency_ms_p50']:.2f} | "
                         f"{r['limited_by']} |")
    return "\n".join(lines) + "\n"
