"""claims: every claim of the CNN lesson (params.claims.lesson) measured on the digits over seeds, with a verdict.

Reads params: seed, claims, trainer, mlflow; the prepared digits and their augmentation pipeline. Each arm of a
claim is the claims' base recipe with a few keys changed, trained (or, for gradients and memory, probed) once
per seed; arms that are the same training share it. The verdict is `pipeline.evaluation.verdict`: holds (the
direction the lesson predicts, gap larger than the spread), contradicted (the opposite, gap larger than the
spread), inconclusive (otherwise); the spread is the larger of the two arms' sample standard deviations.
Writes metrics/claims.json and plots/claims/<claim>.png; an MLflow parent run `claims` with a nested run per
(claim, arm, seed). The claims_report stage turns them, with the transfer sweeps' verdicts, into
reports/claims.md.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import numpy as np

from pipeline import claims, plots, tracking
from pipeline import params as params_mod
from pipeline.atomic import atomic_set, write_json
from pipeline.claims import Result, probe
from pipeline.errors import stage_main
from pipeline.evaluation import spread, verdict
from pipeline.models.cnn import preset
from pipeline.outputs import check_writable
from pipeline.params import PROBE_METRICS
from pipeline.predict import device_for
from pipeline.training import pool

METRICS, PLOTS = Path("metrics/claims.json"), Path("plots/claims")
SPREAD = "the larger of the two arms' sample standard deviations over seeds"


def run(p: params_mod.Params) -> dict:
    """Every claim's arms over seeds; metrics/claims.json and the figures, then the MLflow runs."""
    c = p.claims
    recipes = {cid: {arm: params_mod.resolve_arm(c.base, a) for arm, a in claim.arms.items()}
               for cid, claim in c.measured.items()}
    for cid, arms in recipes.items():  # unknown models fail before any training
        for arm, recipe in arms.items():
            preset(recipe.model, f"claims.lesson.{cid}.arms.{arm}.model")
    data, _ = claims.context(p.seed)  # a missing pipeline or data set fails here, before any training
    tracking.check_store()
    device = device_for(p.trainer.accelerator)
    parent = tracking.start_run(p.mlflow.experiment, "claims", tracking.run_tags("claims", "lesson", data.data_hash))
    with tracking.ended(parent):
        tracking.log_params(parent, params_mod.flatten({"seed": p.seed, "claims": c, "trainer": p.trainer}))
        points = [(cid, arm, s) for cid, claim in c.measured.items() for arm in recipes[cid] for s in range(c.seeds)]
        results: dict[str, dict[str, list]] = {cid: {arm: [None] * c.seeds for arm in recipes[cid]}
                                               for cid in c.measured}
        start = time.perf_counter()
        for cid, arm, s in points:  # probes measure an initialization: nothing to train
            if c.measured[cid].metric in PROBE_METRICS:
                results[cid][arm][s] = probe(c.measured[cid].metric, recipes[cid][arm], p.seed + s, data, device)
                report(cid, arm, s, c.measured[cid].metric, results[cid][arm][s])
        trained = [(cid, arm, s) for cid, arm, s in points if c.measured[cid].metric not in PROBE_METRICS]
        jobs, where = claims.plan([(c.measured[cid].metric, recipes[cid][arm], p.seed + s) for cid, arm, s in trained],
                                  p.trainer, c.shift_pixels, c.target_val_acc)
        workers = pool.workers_for(p.trainer, len(jobs))
        print(f"claims: {len(jobs)} trainings in {workers} process{'es' if workers > 1 else ''}", flush=True)
        for j, measured in enumerate(pool.run(claims.run_job, jobs, workers, partial(claims.context, p.seed))):
            for (cid, arm, s), (i, m) in zip(trained, where, strict=True):
                if i == j:
                    results[cid][arm][s] = measured[m]
                    report(cid, arm, s, c.measured[cid].metric, measured[m], f"[{j + 1}/{len(jobs)}] ")
        summary = summarize(c, results, recipes)
        summary["_meta"] = {"spread": SPREAD, "seeds": c.seeds, "trainings": len(jobs), "processes": workers,
                            "time_s": round(time.perf_counter() - start, 1), "mlflow_parent_run_id": parent,
                            "test_images": int(len(data.y["test"]))}
        write_outputs(c, summary, results)
        publish(p, parent, results, recipes, summary)
    for cid, s in summary.items():
        if not cid.startswith("_"):
            print(f"claims: {cid}: {s['line']}", flush=True)
    return summary


def report(cid: str, arm: str, s: int, metric: str, r: Result, progress: str = "") -> None:
    print(f"claims: {progress}{cid}/{arm} seed {s}: {metric} {r.value:.4g}"
          + (f", test acc {r.test_acc:.4f}" if r.test_acc is not None else ""), flush=True)


def summarize(c, results: dict, recipes: dict) -> dict:
    """Per claim: each arm's spread of the metric (and of test accuracy, parameters), the gap and the verdict."""
    out = {}
    for cid, claim in c.measured.items():
        arms = {}
        for arm, rs in results[cid].items():
            arms[arm] = spread([r.value for r in rs]) | {"params": rs[0].params}
            if rs[0].test_acc is not None and claim.metric != "test_acc":
                arms[arm]["test_acc_mean"] = round(float(np.mean([r.test_acc for r in rs])), 6)
            reached = [r.steps_to_target for r in rs if r.steps_to_target is not None]
            if rs[0].rows:
                arms[arm]["steps_to_target"] = {"reached": f"{len(reached)}/{len(rs)}",
                                                "mean": round(float(np.mean(reached)), 1) if reached else None}
        high, low = claim.predicted
        v = verdict([r.value for r in results[cid][high]], [r.value for r in results[cid][low]])
        line = (f"{claim.says} ({claim.section}): {high} {arms[high]['mean']:.4g} +- {arms[high]['std']:.2g} vs "
                f"{low} {arms[low]['mean']:.4g} +- {arms[low]['std']:.2g} ({claim.metric}); gap {v['gap']:+.4g}, "
                f"spread {v['spread']:.2g}: {v['outcome']}")
        out[cid] = {"section": claim.section, "says": claim.says, "metric": claim.metric, "expects": claim.expects,
                    "arms": arms, **v, "figure": (PLOTS / f"{cid}.png").as_posix(), "line": line}
    return out


def write_outputs(c, summary: dict, results: dict) -> None:
    """The metrics and one figure per claim, as one set."""
    with atomic_set() as stage:
        folder = stage(PLOTS, folder=True)
        for cid, claim in c.measured.items():
            title = f"{claim.says} ({claim.section}): {summary[cid]['outcome']}"
            rs = results[cid]
            if claim.metric == "shift_drop":
                curves = {arm: [(list(r.shifted), list(r.shifted.values())) for r in runs] for arm, runs in rs.items()}
                plots.claim_curves(curves, "shift (pixels, each direction)", "test accuracy", title,
                                   folder / f"{cid}.png")
            elif claim.metric == "test_acc" and all(r.rows and len(r.rows) > 2 for runs in rs.values() for r in runs):
                curves = {arm: [([row["step"] for row in r.rows], [row.get("val_acc") for row in r.rows])
                                for r in runs] for arm, runs in rs.items()}
                plots.claim_curves(curves, "training step", "validation accuracy", title, folder / f"{cid}.png")
            else:
                plots.claim_bars({arm: [r.value for r in runs] for arm, runs in rs.items()}, claim.metric, title,
                                 folder / f"{cid}.png")
        write_json(stage(METRICS), summary)


def publish(p: params_mod.Params, parent: str, results: dict, recipes: dict, summary: dict) -> None:
    """A nested run per (claim, arm, seed): the arm's recipe, its numbers and the claim's figure; the parent gets
    the metrics file and every verdict."""
    from pipeline.claims import log_result

    for cid, claim in p.claims.measured.items():
        for arm, runs in results[cid].items():
            for s, r in enumerate(runs):
                run_id = tracking.start_run(p.mlflow.experiment, f"claims/{cid}/{arm}/seed{s}",
                                            {"stage": "claims", "claim": cid, "arm": arm, "seed": str(s)},
                                            parent_id=parent)
                with tracking.ended(run_id):
                    tracking.log_params(run_id, params_mod.flatten({"recipe": recipes[cid][arm]})
                                        | {"claim": cid, "arm": arm, "seed": p.seed + s, "metric": claim.metric,
                                           "expects": claim.expects}
                                        | r.run_params)
                    log_result(run_id, claim.metric, r)
                    tracking.log_artifact(run_id, PLOTS / f"{cid}.png", "claims")
    tracking.log_artifact(parent, METRICS, "claims")
    outcomes = {f"{cid}_holds": float(s["outcome"] == "holds") for cid, s in summary.items() if not cid.startswith("_")}
    tracking.log_metrics(parent, outcomes)


@stage_main
def main() -> None:
    p = params_mod.load()
    check_writable("claims")
    run(p)


if __name__ == "__main__":
    main()
