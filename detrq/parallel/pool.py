"""Independent jobs side by side in worker processes, one CPU thread each.

On a small CPU most of detrq's steps use one core however many threads torch is given (an evaluation of the mini
DETR takes as long on one thread as on two), so a list of independent jobs, the evaluations of Table 1 or of the
Pareto sweep, the bootstrap of each row, finishes sooner in ``workers`` processes than in one process with
``workers`` threads. ``run_jobs`` starts the processes (``spawn``: safe inside a Jupyter kernel that already runs
torch threads), builds each worker's context once with ``setup(*setup_args)`` (a model, a dataset), hands out the
jobs one at a time, and returns their results in the jobs' order.

Every job runs on one thread whichever worker takes it, so a result does not depend on the number of workers or
on the order the jobs finish in. ``setup``, ``job`` and their arguments must be picklable: module-level functions
and plain data. A job that raises ``DetrqError`` raises the same one-line error here; any other failure raises
``WorkerError`` with the worker's traceback.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from tqdm import tqdm

from detrq.io.errors import DetrqError

C = TypeVar("C")
A = TypeVar("A")
R = TypeVar("R")

_POLL_SECONDS = 1.0  # how often the parent checks that no worker died while it waits for a result


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def given(*parts: Any) -> tuple:
    """A ``setup`` whose context is its arguments as they are: for jobs that need data, not a model."""
    return parts


class WorkerError(RuntimeError):
    """A job failed in a worker process with something other than a ``DetrqError``."""


def _serve(setup: Callable[..., Any], setup_args: tuple, job: Callable[[Any, Any], Any],
           tasks: multiprocessing.Queue, results: multiprocessing.Queue) -> None:
    """A worker's life: one thread, one context, then jobs until the parent sends None."""
    # torch is imported here only if the job's module uses it (unpickling the job imported it), and a job that
    # imports it later reads the environment: a data-only job does not pay for loading torch.
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    try:
        context = setup(*setup_args)
    except BaseException as exc:  # report it against the first job this worker would have run
        context, failure = None, _failure(exc)
    else:
        failure = None
    while (task := tasks.get()) is not None:
        index, item = task
        if failure is not None:
            results.put((index, False, failure))
            continue
        try:
            results.put((index, True, job(context, item)))
        except BaseException as exc:
            results.put((index, False, _failure(exc)))


def _failure(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, DetrqError):
        return ("detrq", str(exc))
    return ("other", "".join(traceback.format_exception(exc)))


def run_jobs(workers: int, setup: Callable[..., C], setup_args: tuple, job: Callable[[C, A], R],
             items: Sequence[A], *, desc: str = "jobs", unit: str = "job", progress: bool = True,
             sizes: Sequence[int] | None = None) -> list[R]:
    """``[job(context, item) for item in items]`` in ``workers`` processes, where each process made its
    ``context = setup(*setup_args)`` once. A progress bar counts the finished jobs, or their ``sizes`` (the
    ``unit``s each job holds) when given."""
    if workers < 1:
        raise DetrqError(f"workers must be a whole number >= 1, got {workers!r}")
    items = list(items)
    if not items:
        return []
    sizes = [1] * len(items) if sizes is None else list(sizes)
    if len(sizes) != len(items):
        raise DetrqError(f"run_jobs: {len(sizes)} sizes for {len(items)} jobs")
    ctx = multiprocessing.get_context("spawn")
    tasks: multiprocessing.Queue = ctx.Queue()
    results: multiprocessing.Queue = ctx.Queue()
    count = min(workers, len(items))
    for task in enumerate(items):
        tasks.put(task)
    for _ in range(count):
        tasks.put(None)
    procs = [ctx.Process(target=_serve, args=(setup, setup_args, job, tasks, results), daemon=True)
             for _ in range(count)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    try:
        with tqdm(total=sum(sizes), desc=f"{desc} ({count} processes)", unit=unit, disable=not progress) as bar:
            while len(out) < len(items):
                try:
                    index, ok, value = results.get(timeout=_POLL_SECONDS)
                except queue.Empty:
                    dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
                    if dead:
                        raise WorkerError(f"a worker process of {desc!r} died (exit code {dead[0].exitcode}); "
                                          "was it out of memory?") from None
                    continue
                if not ok:
                    kind, message = value
                    raise DetrqError(message) if kind == "detrq" else WorkerError(f"{desc}: {message}")
                out[index] = value
                bar.update(sizes[index])
    finally:
        for p in procs:
            if p.is_alive() and len(out) < len(items):
                p.terminate()
            p.join()
        tasks.close()
        results.close()
    return [out[i] for i in range(len(items))]
