"""Independent short trainings side by side: a pool of worker processes, one CPU thread each.

A small network's step on a batch of 28x28 images does not fill two cores with one process (the seed CNN at
batch 64: 87 steps/s on 2 threads, 71 on 1; two 1-thread processes together 136; Lightning's Python between the
steps runs on one core whatever the threads). So a stage with many independent trainings (the claims' arms,
the transfer sweeps' points) runs them in `trainer.sweep_workers` processes at once, forked from the stage
(`start_method`), so that they start at once with its data in memory. Each job seeds itself and runs on one
thread, so its numbers do not depend on which worker runs it, in which order, or how many cores the machine
has; they are the numbers of the same job run in the stage's own process on one thread (tests/test_pool.py).
`python -m benchmarks --only sweep_pool` measures the pool against one process.

This is job-level parallelism over whole trainings, not a way of distributing one training: that stays
Lightning's own DDP (trainer.devices, trainer.strategy), and a pool is not used under it or on a GPU.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

import torch

from pipeline.errors import PipelineError
from pipeline.params import TrainerParams

J = TypeVar("J")
R = TypeVar("R")


def cores() -> int:
    """The CPU cores this process may run on (a container's or taskset's limit, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def workers_for(trainer: TrainerParams, jobs: int) -> int:
    """How many processes run `jobs` independent trainings: `trainer.sweep_workers`, or for `auto` one per core
    on the CPU (never more than the jobs); 1 (the stage's own process) on a GPU, under DDP or several devices."""
    if jobs <= 1:
        return 1
    if trainer.sweep_workers != "auto":
        return min(int(trainer.sweep_workers), jobs)
    on_gpu = trainer.accelerator != "cpu" and torch.cuda.is_available()
    distributed = trainer.devices not in ("auto", 1) or trainer.num_nodes > 1 or trainer.strategy != "auto"
    if on_gpu or distributed:
        return 1
    return max(1, min(cores(), jobs))


_state: dict[str, Any] = {}


def start_method() -> str:
    """fork where it is safe: a worker starts in milliseconds with the stage's modules and data already in its
    memory (spawn imports torch and Lightning again and receives the data pickled: about 6 s before the first
    job here). Safe because a worker runs one thread, set before its first job: OpenMP, which can hang in a
    forked child that starts a thread team, then runs every region inline. spawn where this process has
    initialized CUDA (a forked child cannot use it) or the platform cannot fork."""
    if "fork" in multiprocessing.get_all_start_methods() and not torch.cuda.is_initialized():
        return "fork"
    return "spawn"


def _start(setup: Callable[[], Any] | None) -> None:
    torch.set_num_threads(1)
    # The stage handles Ctrl-C and SIGTERM and stops its workers: a worker ignores Ctrl-C (the terminal sends it
    # to the whole process group) and dies at once on SIGTERM, instead of running the stage's own handlers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _state["context"] = setup() if setup is not None else None


def _call(fn: Callable, job: Any) -> Any:
    return fn(_state["context"], job)


def run(fn: Callable[[Any, J], R], jobs: Iterable[J], workers: int,
        setup: Callable[[], Any] | None = None) -> Iterator[R]:
    """`fn(context, job)` for every job, results in the jobs' order. With more than one worker each process
    builds its `context` once with `setup()` (a module-level function: under spawn it is sent by name) and runs
    on one thread; with one, the jobs run here, on this process's threads. A job's exception is raised here, a worker
    that dies (killed, out of memory) is one PipelineError, and on either, or on Ctrl-C or SIGTERM, the workers
    are stopped at once."""
    jobs = list(jobs)
    if workers <= 1:
        context = setup() if setup is not None else None
        for job in jobs:
            yield fn(context, job)
        return
    executor: ProcessPoolExecutor | None = None
    futures: list = []
    done = False
    try:  # from the first fork on: a signal that lands while the workers start still stops them
        executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(start_method()),
                                       initializer=_start, initargs=(setup,))
        for job in jobs:
            futures.append(executor.submit(_call, fn, job))
        for future in futures:
            yield future.result()
        done = True
    except BrokenProcessPool as exc:
        raise PipelineError(f"a training worker process died ({exc}); trainer.sweep_workers: 1 runs the trainings "
                            "in the stage's own process") from None
    finally:
        if executor is not None:
            if not done:  # an error, a signal, or the caller stopped reading: running jobs stop too, not only queued
                for future in futures:
                    future.cancel()
                for process in list((getattr(executor, "_processes", None) or {}).values()):
                    process.terminate()
            executor.shutdown(wait=True, cancel_futures=True)
