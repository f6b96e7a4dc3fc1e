"""params.yaml validation: one line naming the value and what is allowed, exit code 2, no traceback."""

from __future__ import annotations

import pytest
import yaml

from pipeline.errors import PipelineError
from pipeline.params import Params, apply_profile, flatten, load, parse
from tests.conftest import REPO, run_module


def test_repository_params_are_valid():
    p = load(REPO / "params.yaml")
    assert p.model.preset == "seed_mnist"
    assert p.data.source == "embedded"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"train": {"lr": -0.1}}, "params.yaml: train.lr must be > 0.0 (got -0.1)"),
        ({"train": {"epochs": "ten"}}, "params.yaml: train.epochs must be an integer (got 'ten')"),
        ({"train": {"lrr": 0.1}}, "params.yaml: unknown key train.lrr"),
        ({"colour": 1}, "params.yaml: unknown key colour"),
        ({"augment": {"affine_p": 1.5}}, "params.yaml: augment.affine_p must be <= 1.0 (got 1.5)"),
        ({"augment": {"rotation_range": -5}}, "params.yaml: augment.rotation_range must be >= 0.0 (got -5)"),
        ({"train": {"optimizer": "adagrad"}},
         "params.yaml: train.optimizer must be one of 'adam', 'adamw' or 'sgd' (got 'adagrad')"),
        ({"data": {"ratios": {"train": 0.5, "val": 0.2, "test": 0.2}}},
         "params.yaml: data.ratios train + val + test must sum to 1 (got 0.9)"),
        ({"trainer": {"devices": "many"}}, "params.yaml: trainer.devices must be an integer or 'auto' (got 'many')"),
        ({"transfer": {"weights": "imagenet21k"}}, "params.yaml: transfer.weights must be source_task, imagenet"),
    ],
)
def test_bad_values_give_one_line(raw, message):
    with pytest.raises(PipelineError) as err:
        parse(raw)
    text = str(err.value)
    assert text.startswith(message)
    assert "\n" not in text


STAGES = ["prepare", "augment", "train_scratch", "transfer_learn", "evaluate", "compare", "explain"]


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_validates_all_params_first(tmp_path, monkeypatch, capsys, stage):
    """A bad value in any section stops every stage (not only the ones that read it) before it reads data or
    writes anything: one line, exit 2."""
    import importlib
    import signal

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["lr"] = -0.1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(f"pipeline.stages.{stage}")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as exit_:
            module.main()
    finally:  # stage_main installs its own signal handlers: pytest gets its own back
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == "error: params.yaml: train.lr must be > 0.0 (got -0.1)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


def test_stage_exits_2_with_one_line_from_the_command_line(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["lr"] = -0.1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = run_module("pipeline.stages.train_scratch", tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: params.yaml: train.lr must be > 0.0 (got -0.1)"
    assert "Traceback" not in result.stdout + result.stderr


def test_invalid_yaml_is_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text("train: {lr: [\n")
    result = run_module("pipeline.params", tmp_path, "check")
    assert result.returncode == 2
    assert result.stderr.startswith("error: params.yaml: not valid YAML at line")
    assert len(result.stderr.strip().splitlines()) == 1


def test_flatten_uses_dotted_keys():
    flat = flatten(Params())
    assert flat["train.lr"] == 0.001
    assert flat["model.blocks.0.filters"] == 32
    assert flat["data.ratios.train"] == 0.7


def test_tiny_profile_overlays_and_keeps_comments(tmp_path):
    target = tmp_path / "params.yaml"
    target.write_text((REPO / "params.yaml").read_text())
    apply_profile("tiny", target)
    p = load(target)
    assert p.train.epochs == 2 and p.data.max_per_class == 20
    assert p.train.lr == 0.001  # untouched keys stay
    assert "# prepare: where images come from" in target.read_text()


def test_unknown_profile_lists_known(tmp_path):
    target = tmp_path / "params.yaml"
    target.write_text((REPO / "params.yaml").read_text())
    with pytest.raises(PipelineError, match="unknown profile 'huge'; known profiles: mnist_full, tiny"):
        apply_profile("huge", target)


def test_params_yaml_states_the_schemas_defaults():
    """One set of defaults: params.yaml writes out exactly what the schema would use."""
    assert flatten(Params()) == flatten(load(REPO / "params.yaml"))
