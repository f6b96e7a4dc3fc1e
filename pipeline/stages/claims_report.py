"""claims_report: the lesson's claims as one readable table, reports/claims.md.

Reads metrics/claims.json (the claims stage) and the transfer sweeps' verdicts (metrics/transfer_learn.json,
metrics/transfer_photos.json: §7's claim, linked, not recomputed). A stage of its own, so that a change to a
transfer sweep rewrites the table without training the claims again.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import tasks
from pipeline.atomic import write_text
from pipeline.errors import PipelineError, stage_main
from pipeline.outputs import check_writable
from pipeline.params import load

CLAIMS, REPORT = Path("metrics/claims.json"), Path("reports/claims.md")
WORDS = {"holds": "holds", "contradicted": "**contradicted**", "inconclusive": "inconclusive"}


def _arm(name: str, a: dict) -> str:
    return f"{name} {a['mean']:.4g} ± {a['std']:.2g} [{a['min']:.4g}-{a['max']:.4g}]"


def transfer_rows() -> list[dict]:
    """§7, per task: the sweep's transfer-vs-scratch verdict at each N."""
    rows = []
    for task in tasks.TASKS.values():
        if not task.transfer_metrics.exists():
            continue
        sweep = json.loads(task.transfer_metrics.read_text())
        per_n = {n: v["transfer_vs_scratch"] for n, v in sweep["verdict"].items() if "transfer_vs_scratch" in v}
        if not per_n:
            continue
        outcomes = {v["outcome"] for v in per_n.values()}
        outcome = outcomes.pop() if len(outcomes) == 1 else "inconclusive"
        measured = "; ".join(f"N={n}: {v['pretrained']} - scratch {v['gap']:+.3f} (spread {v['spread']:.3f})"
                             for n, v in per_n.items())
        rows.append({"task": task.name, "outcome": outcome, "measured": measured,
                     "figure": (task.transfer_plots / "crossover.png").as_posix(),
                     "n": ", ".join(per_n), "backbone": sweep["backbone"], "seeds": sweep["seeds"]})
    return rows


def markdown(claims: dict, transfer: list[dict]) -> str:
    meta = claims.get("_meta", {})
    lines = ["# The CNN lesson, measured", "",
             f"Each claim of the seed, tested on the digits over {meta.get('seeds', '?')} seeds per arm "
             f"({meta.get('trainings', '?')} trainings, {meta.get('time_s', '?')} s; "
             f"{meta.get('test_images', '?')} test images). Verdict: **holds** when the arm the lesson predicts "
             "higher is higher by more than the spread, **contradicted** when it is lower by more than the spread, "
             f"inconclusive otherwise; the spread is {meta.get('spread', 'the larger std')}. Arms: mean ± std "
             "[min-max] over seeds.", "",
             "| # | The seed says | Metric | Measured | Gap (spread) | Verdict | Figure |",
             "|---|---|---|---|---|---|---|"]
    number = 0
    for cid, c in claims.items():
        if cid.startswith("_"):
            continue
        number += 1
        high, low = c["expects"].replace(" ", "").split(">" if ">" in c["expects"] else "<")
        if "<" in c["expects"]:
            high, low = low, high
        measured = f"{_arm(high, c['arms'][high])} vs {_arm(low, c['arms'][low])}"
        for arm in (high, low):
            steps = c["arms"][arm].get("steps_to_target")
            if steps and c["metric"] == "test_acc" and steps["mean"] is not None:
                measured += f"; {arm} reached the target val acc in {steps['mean']:.0f} steps ({steps['reached']})"
        lines.append(f"| {number} | {c['says']} ({c['section']}) | {c['metric']} | {measured} | "
                     f"{c['gap']:+.4g} ({c['spread']:.2g}) | {WORDS[c['outcome']]} | [{cid}](../{c['figure']}) |")
    for t in transfer:
        number += 1
        lines.append(f"| {number} | Transfer learning pays off with small data (§7), {t['task']}: "
                     f"{t['backbone']} over {t['seeds']} seeds, N = {t['n']} per class | test_acc | {t['measured']} | "
                     f"per N | {WORDS[t['outcome']]} | [crossover](../{t['figure']}) |")
    return "\n".join(lines) + "\n"


def run() -> str:
    if not CLAIMS.exists():
        raise PipelineError(f"{CLAIMS}: no claims measured yet (run `dvc repro claims`)")
    text = markdown(json.loads(CLAIMS.read_text()), transfer_rows())
    write_text(REPORT, text)
    print(f"claims_report: wrote {REPORT}", flush=True)
    return text


@stage_main
def main() -> None:
    load()  # every stage validates params.yaml first
    check_writable("claims_report")
    run()


if __name__ == "__main__":
    main()
