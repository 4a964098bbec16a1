"""Pipeline steps whose jobs run side by side: a ``Launch`` with ``workers`` > 1 computes the uncached evaluations
and trace estimates of a step in that many processes (``parallel.pool``: one thread each), with the cached checks
on the float model that the step makes beside them (``ModelCheck``), and the step then reads them as cache hits.

Each job is the pipeline's own call (``run_evaluation``, ``run_traces``) writing the file it always writes, so the
files, their keys and the later cache hits are those of a run in one process; only the thread count of the
arithmetic differs (one per job), which moves floats in their last digits at most. Jobs with the same cache key run
once: the others become copies (``pipeline.run_evaluation``'s twins). A step with fewer than two jobs to run, or a
``Launch`` with one worker, computes in the calling process as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detrq.artifact.pipeline import (Scheme, evaluation_folders, evaluation_key, kl_sources, replica_schemes,
                                     run_all_traces, run_evaluation, run_traces, serves, traces_key, traces_path)
from detrq.data.coco import CocoDetection
from detrq.data.loading import eval_dataset
from detrq.evaluation.evaluate import TRUNK_PREFIX, TrunkCache
from detrq.io.cache import cache_key, keys_in, load_cached
from detrq.io.errors import DetrqError
from detrq.models.detr import DETR
from detrq.models.loading import load_model
from detrq.parallel.launch import Launch
from detrq.parallel.pool import run_jobs
from detrq.quant.quantizers import EQ6, WeightQuantizer
from detrq.sensitivity import FIRST_ORDER, TraceSettings
from detrq.sensitivity.modelopt import MODELOPT
from detrq.sensitivity.trace_checks import check_traces


@dataclass(frozen=True)
class EvaluationJob:
    """One ``run_evaluation`` of a step: ``bit_map`` applied by ``quantizer``, cached in ``out``."""

    bit_map: dict[str, int]
    out: Path
    label: str | None = None
    keep_detections: bool = False
    quantizer: WeightQuantizer = EQ6


def run_evaluations(model: DETR, checkpoint_sha: str, dataset: CocoDetection, jobs: Sequence[EvaluationJob], *,
                    batch_size: int, device: str = "cpu", launch: Launch = Launch(), progress: bool = False
                    ) -> list[dict[str, Any]]:
    """``run_evaluation`` of every job, in order; with ``launch.workers`` > 1 the uncached ones run side by side
    first. Torchrun ranks (``launch.nproc`` > 1) apply Eq. (6) only: other quantizers evaluate here."""
    if launch.workers > 1:
        _evaluate_side_by_side(checkpoint_sha, dataset, jobs, batch_size, launch, progress)
    return [run_evaluation(model, checkpoint_sha, dataset, job.bit_map, job.out, batch_size=batch_size, device=device,
                           progress=progress, label=job.label, keep_detections=job.keep_detections,
                           quantizer=job.quantizer, launch=launch if job.quantizer.name == EQ6.name else Launch())
            for job in jobs]


def _evaluate_side_by_side(checkpoint_sha: str, dataset: CocoDetection, jobs: Sequence[EvaluationJob],
                           batch_size: int, launch: Launch, progress: bool) -> None:
    known: dict[Path, dict[str, Path]] = {}  # per results folder: the keys its evaluation files hold
    todo: dict[str, EvaluationJob] = {}
    for job in jobs:
        key = evaluation_key(checkpoint_sha, dataset, job.bit_map, batch_size, job.quantizer)
        folders = evaluation_folders(job.out)
        if folders[0] not in known:
            known[folders[0]] = keys_in(folders)
        twin = known[folders[0]].get(key)
        if not any(f is not None and serves(f, job.keep_detections)
                   for f in (job.out if load_cached(job.out, key) else None, twin)):
            first = todo.setdefault(key, job)  # a twin of an earlier job is copied after it, detections included
            if job.keep_detections and not first.keep_detections:
                todo[key] = EvaluationJob(first.bit_map, first.out, first.label, True, first.quantizer)
    if len(todo) < 2:
        return
    # Each quantizer travels once per worker (GPTQ's with its Hessians and the codes it has memoised).
    quantizers: dict[str, WeightQuantizer] = {}
    # A job is the evaluations whose bit maps quantize the backbone alike: one worker runs them one after another,
    # so the backbone runs once for them (``TrunkCache``); the largest groups go first.
    groups: dict[str, list[tuple]] = {}
    for job in todo.values():
        quantizer = cache_key(quantizer=job.quantizer.key)
        quantizers.setdefault(quantizer, job.quantizer)
        trunk_bits = {n: b for n, b in job.bit_map.items() if n.startswith(TRUNK_PREFIX)}
        groups.setdefault(cache_key(quantizer=quantizer, bits=trunk_bits), []).append(
            (job.bit_map, str(job.out), job.label, job.keep_detections, quantizer))
    items = sorted(groups.values(), key=len, reverse=True)
    run_jobs(launch.workers, _evaluation_worker, (launch, checkpoint_sha, str(dataset.root), dataset.split,
                                                  list(dataset.ids), batch_size, quantizers),
             _evaluate_group, items, desc="evaluations", unit="eval", progress=progress,
             sizes=[len(group) for group in items])


def _worker_model(launch: Launch, checkpoint_sha: str) -> DETR:
    model, sha = load_model(launch.preset, launch.checkpoint, launch.device, min_size=launch.min_size,
                            max_size=launch.max_size)
    if sha != checkpoint_sha:
        raise DetrqError(f"a worker loaded another checkpoint ({sha[:12]}) than the step's ({checkpoint_sha[:12]}): "
                         "was the checkpoint file replaced during the run?")
    return model


def _evaluation_worker(launch: Launch, checkpoint_sha: str, root: str, split: str, image_ids: list[int],
                       batch_size: int, quantizers: dict[str, WeightQuantizer]) -> tuple:
    model = _worker_model(launch, checkpoint_sha)
    dataset = eval_dataset(model, root, split, image_ids=image_ids)
    # Backbone features are smaller than the images they come from: kept only where the images are.
    trunk = TrunkCache() if dataset.in_memory else None
    return model, checkpoint_sha, dataset, batch_size, launch.device, quantizers, trunk


def _evaluate_group(context: tuple, group: list[tuple]) -> None:
    model, sha, dataset, batch_size, device, quantizers, trunk = context
    for bit_map, out, label, keep_detections, quantizer in group:
        run_evaluation(model, sha, dataset, bit_map, out, batch_size=batch_size, device=device, progress=False,
                       label=label, keep_detections=keep_detections, quantizer=quantizers[quantizer], trunk=trunk)


@dataclass(frozen=True)
class ModelCheck:
    """A cached computation on the float model, ``fn(model, checkpoint_sha, root, split, out, **kwargs)``, that a
    step can run beside its trace estimates: ``stability.loss_stability`` or ``pipeline.run_curvature_check``.
    ``fn`` takes ``device`` and ``cached_only`` (return None unless ``out`` already holds the result)."""

    fn: Callable[..., dict[str, Any] | None]
    out: Path
    kwargs: dict[str, Any] = field(default_factory=dict)

    def run(self, model: DETR, checkpoint_sha: str, root: str | Path, split: str, *, device: str = "cpu",
            cached_only: bool = False) -> dict[str, Any] | None:
        """The check's result, computed and written to ``out`` unless cached (or None: ``cached_only``)."""
        return self.fn(model, checkpoint_sha, root, split, self.out, device=device, cached_only=cached_only,
                       **self.kwargs)


def run_scheme_traces(model: DETR, checkpoint_sha: str, root: str | Path, split: str, results_dir: str | Path,
                      settings: TraceSettings, schemes: Sequence[Scheme], *, seeds: int = 1, device: str = "cpu",
                      launch: Launch = Launch(), progress: bool = False, checks: Sequence[ModelCheck] = ()
                      ) -> list[dict[str, dict[str, Any]]]:
    """``pipeline.run_all_traces`` for probe seeds ``settings.seed + k``, k < ``seeds`` (k > 0: the stochastic
    schemes' replicas); one ``{scheme name: result}`` per seed. With ``launch.workers`` > 1 the uncached estimates
    run side by side first, the longest first, and the uncached ``checks`` with them (their results are then cache
    hits of ``ModelCheck.run``); otherwise the checks are left to the caller's ``run``."""
    if launch.workers > 1:
        _traces_side_by_side(model, checkpoint_sha, root, split, results_dir, settings, schemes, seeds, launch,
                             progress, checks)
    return [run_all_traces(model, checkpoint_sha, root, split, results_dir, settings, schemes, replica=k,
                           device=device, progress=progress, launch=Launch() if launch.workers > 1 else launch)
            for k in range(seeds)]


def _traces_side_by_side(model: DETR, checkpoint_sha: str, root: str | Path, split: str, results_dir: str | Path,
                         settings: TraceSettings, schemes: Sequence[Scheme], seeds: int, launch: Launch,
                         progress: bool, checks: Sequence[ModelCheck]) -> None:
    full = eval_dataset(model, root, split)
    items = []
    for k in range(seeds):
        sources = {n: str(p) for n, p in kl_sources(schemes, settings, results_dir, k).items()}
        for s in replica_schemes(schemes, k):
            out, scheme_settings = traces_path(results_dir, s.name, k), s.settings(settings, k)
            key, _ = traces_key(model, checkpoint_sha, full, s.metric, scheme_settings)
            if load_cached(out, key, check=check_traces) is None:
                items.append((s, scheme_settings, str(out), sources.get(s.name)))
    # A first-order job computes the Out Sen Float file it takes its KL term from: that file is not a job of its own.
    made_by_first_order = {source for *_, source in items if source is not None}
    # A job is (relative cost, function, its arguments after the model's four, its keywords).
    jobs = [(_relative_cost(s), run_traces, (s.metric, out, st), {"kl_source": source, "progress": False})
            for s, st, out, source in items if out not in made_by_first_order]
    jobs += [(_CHECK_COST, check.fn, (str(check.out),), check.kwargs) for check in checks
             if check.run(model, checkpoint_sha, root, split, device=launch.device, cached_only=True) is None]
    if len(jobs) < 2:
        return
    jobs.sort(key=lambda job: -job[0])
    run_jobs(launch.workers, _model_worker, (launch, checkpoint_sha, str(root), split),
             _model_job, [job[1:] for job in jobs], desc="trace estimates and checks", unit="job", progress=progress)


# The stability and curvature checks take 5-15 s on the embedded default: between the probe-based estimates and
# the probe-free ones.
_CHECK_COST = 0.5


def _relative_cost(scheme: Scheme) -> float:
    """Which estimates take longest (the order of magnitude measured on the embedded default), so that they start
    first and the last job to finish is a short one."""
    if scheme.metric == MODELOPT or scheme.estimator == "fisher":
        return 0
    return 2 if scheme.estimator == "blockwise" or scheme.metric == FIRST_ORDER else 1


def _model_worker(launch: Launch, checkpoint_sha: str, root: str, split: str) -> tuple:
    return _worker_model(launch, checkpoint_sha), checkpoint_sha, root, split, launch.device


def _model_job(context: tuple, job: tuple) -> None:
    model, sha, root, split, device = context
    fn, args, kwargs = job
    fn(model, sha, root, split, *args, device=device, **kwargs)
