"""Independent trainings in worker processes: how many, and that a pool changes where a job runs, never what it
computes or the order its results come back in."""

from __future__ import annotations

import os
import signal
import time
from functools import partial

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.params import ClaimRecipe, TrainerParams
from pipeline.training import pool
from tests.conftest import ready_to_train


@pytest.mark.parametrize(("trainer", "jobs", "expected"), [
    ({}, 54, "cores"),  # auto on the CPU: one process per core
    ({}, 1, 1),  # one job runs here
    ({"accelerator": "cpu"}, 54, "cores"),
    ({"devices": 2, "strategy": "ddp"}, 54, 1),  # DDP owns the processes
    ({"strategy": "ddp"}, 54, 1),
    ({"num_nodes": 2}, 54, 1),
    ({"sweep_workers": 1}, 54, 1),
    ({"sweep_workers": 3}, 54, 3),
    ({"sweep_workers": 8}, 5, 5),  # never more processes than jobs
])
def test_how_many_processes_run_the_jobs(trainer, jobs, expected, monkeypatch):
    monkeypatch.setattr(pool, "cores", lambda: 4)
    expected = min(4, jobs) if expected == "cores" else expected
    assert pool.workers_for(TrainerParams(**trainer), jobs) == expected


def test_the_auto_count_follows_the_cores_this_process_may_use():
    assert pool.cores() == len(os.sched_getaffinity(0))
    assert pool.workers_for(TrainerParams(), 100) == (1 if torch.cuda.is_available() else pool.cores())


def _square_in_order(context, job):
    if job == "bad":
        raise PipelineError("claims: job 'bad' is not a number")
    time.sleep(0.05 * job)  # the first jobs take longest: results in finishing order would come back shuffled
    return context * job * job, torch.get_num_threads()


def _die(context, job):
    if job == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's out-of-memory killer would
    time.sleep(0.2)
    return job


def test_a_worker_that_dies_is_one_line_not_a_hang():
    with pytest.raises(Exception) as err:  # noqa: PT011 (the type is the point: asserted below)
        list(pool.run(_die, [1, 2, 3, 4], 2))
    assert isinstance(err.value, PipelineError), repr(err.value)
    assert str(err.value).startswith("a training worker process died (") and "\n" not in str(err.value)
    assert "trainer.sweep_workers: 1 runs the trainings in the stage's own process" in str(err.value)


def _context():
    return 10


def _ctrl_c(context, job):
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C reaches every process of the terminal's group
    time.sleep(0.1)
    return job


def test_workers_start_by_fork_without_cuda_and_leave_ctrl_c_to_the_stage(monkeypatch):
    """fork (a worker starts in milliseconds) unless CUDA is initialized here; a worker ignores Ctrl-C, which the
    stage handles by stopping its workers, instead of raising it inside a job."""
    assert pool.start_method() == "fork"
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert pool.start_method() == "spawn"
    monkeypatch.undo()
    stages_handler = signal.signal(signal.SIGINT, signal.default_int_handler)  # as a stage's, raising here
    try:
        assert list(pool.run(_ctrl_c, [1, 2, 3], 2)) == [1, 2, 3]
    except KeyboardInterrupt:  # came back from a worker's job (here, it would stop the whole test session)
        pytest.fail("a worker ran the stage's Ctrl-C handler inside its job")
    finally:
        signal.signal(signal.SIGINT, stages_handler)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_results_come_back_in_the_jobs_order_from_one_thread_workers_and_an_error_is_one_line(method, monkeypatch):
    monkeypatch.setattr(pool, "start_method", lambda: method)
    jobs = [5, 1, 4, 2, 3]
    assert list(pool.run(_square_in_order, jobs, 2, _context)) == [(10 * j * j, 1) for j in jobs]
    with pytest.raises(PipelineError, match=r"^claims: job 'bad' is not a number$"):
        list(pool.run(_square_in_order, [1, "bad", 2], 2, _context))


@pytest.mark.slow
def test_claims_trainings_in_the_pool_equal_the_same_jobs_run_here_on_one_thread(tmp_path, tiny_prepared,
                                                                               monkeypatch):
    """The claims' jobs (shared trainings, both checkpoints, a shift metric, augmentation) through two worker
    processes give exactly what the same jobs give in this process on one thread: the seeds, the data and the
    measures travel with the job, nothing depends on the worker or the order."""
    from pipeline import claims

    monkeypatch.chdir(ready_to_train(tmp_path / "repo", tiny_prepared))
    base = ClaimRecipe(epochs=2, steps_per_epoch=2, batch_size=16)
    recipes = [base, base.model_copy(update={"checkpoint": "best"}), base.model_copy(update={"augment": True}),
               base.model_copy(update={"model": "dense_mnist"})]
    points = [("test_acc", recipes[0], 0), ("test_acc", recipes[1], 0), ("shift_drop", recipes[0], 1),
              ("test_acc", recipes[2], 0), ("generalization_gap", recipes[3], 1), ("test_acc", recipes[0], 1)]
    jobs, where = claims.plan(points, TrainerParams(), [0, 2], 0.5)
    assert len(jobs) == 4 and where == [(0, 0), (0, 1), (1, 0), (2, 0), (3, 0), (1, 1)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = list(pool.run(claims.run_job, jobs, 1, lambda: claims.context(0)))
    finally:
        torch.set_num_threads(threads)
    pooled = list(pool.run(claims.run_job, jobs, 2, partial(claims.context, 0)))
    assert [[r.value for r in rs] for rs in pooled] == [[r.value for r in rs] for rs in here]
    untimed = [[[{k: v for k, v in row.items() if k != "epoch_time_s"} for row in r.rows] for r in rs] for rs in pooled]
    assert untimed == [[[{k: v for k, v in row.items() if k != "epoch_time_s"} for row in r.rows] for r in rs]
                       for rs in here]
    assert all(len(r.rows) == 2 for rs in here for r in rs)
    assert [[r.shifted for r in rs] for rs in pooled] == [[r.shifted for r in rs] for rs in here]
    assert pooled[1][0].shifted.keys() == {0, 2}


@pytest.mark.slow
def test_a_transfer_sweep_in_the_pool_equals_the_same_sweep_run_here_on_one_thread(tmp_path, tiny_prepared,
                                                                                  monkeypatch, mlflow_store):
    """The transfer sweep's points (feature extraction on the cached features, fine-tuning from that head on the
    cached activations, our CNN on augmented images) through two worker processes: every row and every kept
    model exactly as the same sweep in this process on one thread, the rows in the sweep's order, a run each."""
    import csv

    from mlflow import MlflowClient

    from pipeline import params as params_mod
    from pipeline.data import augment as aug
    from pipeline.models import loading
    from pipeline.stages import transfer_learn

    monkeypatch.chdir(tmp_path)
    tiny_prepared.save(tmp_path / "data/prepared")
    aug.save(aug.build(params_mod.AugmentParams(), 0))
    sweep = {"image_size": 32, "target_per_class": [2, 3], "seeds": 2, "steps": 3, "head_steps": 4, "cnn_steps": 4,
             "val_per_class": 2, "batch_size": 4}
    untimed = ("train_time_s", "mlflow_run_id")
    rows, weights, results = {}, {}, {}
    for workers in (1, 2):
        p = params_mod.parse({"transfer": sweep, "trainer": {"sweep_workers": workers}})
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            results[workers] = transfer_learn.run(p)
        finally:
            torch.set_num_threads(threads)
        rows[workers] = [{k: v for k, v in r.items() if k not in untimed}
                         for r in csv.DictReader(open(tmp_path / "plots/transfer_learn/sweep.csv"))]
        weights[workers] = {st: loading.load(tmp_path / f"models/transfer/{st}.pt")[0].state_dict()
                            for st in ("feature_extraction", "fine_tuning", "scratch")}
    assert len(rows[2]) == 12 and rows[2] == rows[1]
    assert [(r["target_per_class"], r["seed"]) for r in rows[2]][::3] == [("2", "0"), ("2", "1"), ("3", "0"),
                                                                          ("3", "1")]
    for st, state in weights[2].items():
        assert state.keys() == weights[1][st].keys()
        assert all(torch.equal(v, weights[1][st][k]) for k, v in state.items()), st
    client = MlflowClient(mlflow_store)
    parent = results[2]["mlflow_parent_run_id"]
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent}'", max_results=100)
    assert all(c.info.status == "FINISHED" for c in children)
    assert sorted(c.info.run_name for c in children) == sorted(  # each point's runs under its own name
        f"transfer_learn/n{r['target_per_class']}/seed{r['seed']}/{r['strategy']}" for r in rows[2])
