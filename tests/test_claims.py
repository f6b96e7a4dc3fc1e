"""The claims: the verdict rule, the shift by hand, claims as data through the stage and its report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from pipeline.errors import PipelineError
from pipeline.evaluation import spread, verdict
from pipeline.params import parse
from tests.conftest import ready_to_train


@pytest.mark.parametrize(("expected", "other", "gap", "width", "outcome"), [
    ([0.90, 0.92, 0.91], [0.80, 0.81, 0.82], 0.10, 0.01, "holds"),
    ([0.80, 0.81, 0.82], [0.90, 0.92, 0.91], -0.10, 0.01, "contradicted"),
    ([0.90, 0.80, 0.85], [0.84, 0.86, 0.85], 0.0, 0.05, "inconclusive"),
    ([0.88, 0.80, 0.84], [0.80, 0.81, 0.82], 0.03, 0.04, "inconclusive"),  # the right direction, inside the spread
])
def test_the_verdict_rule_on_fixed_numbers(expected, other, gap, width, outcome):
    assert verdict(expected, other) == {"gap": pytest.approx(gap, abs=1e-6), "spread": pytest.approx(width, abs=1e-6),
                                        "outcome": outcome}


def test_a_gap_equal_to_the_spread_is_inconclusive_and_one_run_is_refused():
    assert verdict([1.0, 3.0], [0.0, 0.0]) == {"gap": 2.0, "spread": pytest.approx(1.414214), "outcome": "holds"}
    tie = verdict([2.0, 4.0, 6.0], [0.0, 2.0, 4.0])  # gap 2 == spread 2 (std of both)
    assert tie["gap"] == tie["spread"] == 2.0 and tie["outcome"] == "inconclusive"
    with pytest.raises(PipelineError, match=r"a spread needs at least 2 runs \(got 1\)"):
        verdict([0.9], [0.8, 0.7])
    s = spread([0.80, 0.84, 0.82])
    assert s["min"] == 0.80 and s["max"] == 0.84 and s["ci95"][0] < 0.82 < s["ci95"][1] and s["n"] == 3
    # a 95% interval of the mean from 3 runs: mean +- t(0.975, 2) * std / sqrt(3) = 0.82 +- 4.303 * 0.02 / 1.732
    assert s["ci95"] == pytest.approx([0.82 - 0.049686, 0.82 + 0.049686], abs=1e-5)


def test_the_shift_by_hand():
    from pipeline.claims import shift

    images = np.arange(1, 17, dtype=np.uint8).reshape(1, 4, 4, 1)
    right = shift(images, 1, 0)[0, ..., 0]
    assert right.tolist() == [[0, 1, 2, 3], [0, 5, 6, 7], [0, 9, 10, 11], [0, 13, 14, 15]]
    up = shift(images, 0, -2)[0, ..., 0]
    assert up.tolist() == [[9, 10, 11, 12], [13, 14, 15, 16], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert shift(images, 0, 0).tolist() == images.tolist() and shift(images, 5, 0).sum() == 0
    assert shift(np.ones((3, 28, 28, 1), np.uint8), 2, 3).shape == (3, 28, 28, 1)


@pytest.mark.parametrize(("claims", "message"), [
    ({"lesson": {"x": {"section": "§1", "says": "s", "arms": {"a": {"colour": 1}, "b": {}}, "expects": "a > b"}}},
     "params.yaml: unknown key claims.lesson.x.arms.a.colour (allowed: optimizer, lr,"),
    ({"lesson": {"x": {"section": "§1", "says": "s", "arms": {"a": {}}, "expects": "a > b"}}},
     "params.yaml: claims.lesson.x needs at least 2 arms to compare (got 1: a)"),
    ({"lesson": {"x": {"section": "§1", "says": "s", "arms": {"a": {}, "b": {}}, "expects": "a >> b"}}},
     "params.yaml: claims.lesson.x expects must be '<arm> > <arm>' or '<arm> < <arm>' (got 'a >> b')"),
    ({"lesson": {"x": {"section": "§1", "says": "s", "arms": {"a": {}, "b": {}}, "expects": "a > c"}}},
     "params.yaml: claims.lesson.x expects names arm 'c', not one of its arms (a, b)"),
    ({"only": ["nope"]}, "params.yaml: claims only names 'nope', not a claim of the lesson (weight_sharing,"),
    ({"lesson": {"x": {"section": "§1", "says": "s", "arms": {"a": {"epochs": 2, "warmup_epochs": 3}, "b": {}},
                       "expects": "a > b"}}},
     "params.yaml: claims lesson.x.arms.a: Value error, warmup_epochs must be < epochs (2) (got 3)"),
])
def test_bad_claim_definitions_are_one_line(claims, message):
    with pytest.raises(PipelineError) as err:
        parse({"claims": claims})
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def tiny_claims(repo, **claims) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["claims"] |= claims
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_an_unknown_model_in_a_claim_is_one_line_before_any_training(tmp_path, tiny_prepared, run_stage):
    repo = ready_to_train(tmp_path / "repo", tiny_prepared)
    tiny_claims(repo, only=None, lesson={"x": {"section": "§1", "says": "s", "arms": {"a": {"model": "resnet999"},
                                                                                     "b": {}}, "expects": "a > b"}})
    result = run_stage(repo, "claims")
    assert result.code == 2
    assert result.err.strip().startswith("error: claims.lesson.x.arms.a.model: unknown CNN preset 'resnet999'; known: "
                                         "seed_mnist, keras_tutorial")
    assert not (repo / "metrics/claims.json").exists()


def test_claims_through_the_stage_and_the_report(tmp_path, tiny_prepared, mlflow_store, run_stage):
    """Two claims of the lesson and one a user adds in params.yaml: each arm over the seeds, the verdict from the
    numbers, a figure each, the report's rows, and a nested MLflow run per (claim, arm, seed)."""
    from mlflow import MlflowClient

    repo = ready_to_train(tmp_path / "repo", tiny_prepared)
    added = {"section": "§9.2", "says": "A higher learning rate learns faster here", "metric": "test_acc",
             "expects": "fast > slow", "arms": {"slow": {"lr": 0.0001}, "fast": {"lr": 0.003}}}
    tiny_claims(repo, only=["weight_sharing", "skip_gradients", "learning_rate"], seeds=2,
                lesson=yaml.safe_load((repo / "params.yaml").read_text())["claims"]["lesson"] | {"learning_rate": added})
    result = run_stage(repo, "claims")
    assert result.code == 0, result.err
    claims = json.loads((repo / "metrics/claims.json").read_text())
    assert set(claims) == {"weight_sharing", "skip_gradients", "learning_rate", "_meta"}
    assert claims["_meta"]["trainings"] == 2 * 2 + 2 * 2  # weight sharing's 2 arms, the added claim's 2; 2 seeds
    from pipeline.params import TrainerParams
    from pipeline.training.pool import workers_for

    assert claims["_meta"]["processes"] == workers_for(TrainerParams(), 8) > 1  # auto: a process per core here
    for cid, c in claims.items():
        if cid == "_meta":
            continue
        assert len(c["arms"]) == 2 and all(a["n"] == 2 for a in c["arms"].values())
        high, low = {"weight_sharing": ("cnn", "dense"), "skip_gradients": ("residual", "plain"),
                     "learning_rate": ("fast", "slow")}[cid]
        assert c["gap"] == pytest.approx(c["arms"][high]["mean"] - c["arms"][low]["mean"], abs=1e-5)
        assert c["spread"] == pytest.approx(max(c["arms"][high]["std"], c["arms"][low]["std"]), abs=1e-5)
        expected = "holds" if c["gap"] > c["spread"] else "contradicted" if c["gap"] < -c["spread"] else "inconclusive"
        assert c["outcome"] == expected
        assert (repo / c["figure"]).stat().st_size > 5000
    assert claims["weight_sharing"]["arms"]["dense"]["params"] == 407_050
    assert claims["weight_sharing"]["arms"]["cnn"]["params"] == 421_642
    # at initialization the residual network's first layer gets more gradient than the plain one's: 20 layers
    assert claims["skip_gradients"]["outcome"] == "holds"
    report = run_stage(repo, "claims_report")
    assert report.code == 0, report.err
    text = (repo / "reports/claims.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| #")]
    assert len(rows) == 3 and "A higher learning rate learns faster here (§9.2)" in rows[2]
    assert "[weight_sharing](../plots/claims/weight_sharing.png)" in rows[0]
    client = MlflowClient(mlflow_store)
    parent = client.get_run(claims["_meta"]["mlflow_parent_run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(
        f"claims/{cid}/{arm}/seed{s}" for cid, arms in (("weight_sharing", ("dense", "cnn")),
                                                       ("skip_gradients", ("plain", "residual")),
                                                       ("learning_rate", ("slow", "fast"))) for arm in arms
        for s in range(2))
    fast = next(r for r in children if r.info.run_name == "claims/learning_rate/fast/seed0")
    assert fast.data.params["recipe.lr"] == "0.003" and "test_acc" in fast.data.metrics
    from pipeline.training.fit import cpu_has_bf16  # the precision trainer.precision auto chose, per training

    assert fast.data.params.get("trainer.precision_used") == ("bf16-mixed" if cpu_has_bf16() else "32-true")
    probe = next(r for r in children if r.info.run_name == "claims/skip_gradients/plain/seed0")
    assert "trainer.precision_used" not in probe.data.params  # a probe trains nothing
