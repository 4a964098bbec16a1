"""The paper's steps as cached, file-producing functions: Hessian traces -> ILP bit maps -> evaluations.

The CLI and the notebooks call these. Each writes one JSON under ``results/`` atomically, with a ``cache_key``
built from everything that determines the result (checkpoint hash, image ids, seeds, settings), and returns the
cached file instead of recomputing when the key matches.

``run_traces`` and ``run_evaluation`` also run sharded: inside a torchrun process group (the CLI under torchrun)
the ranks share the work and rank 0 writes the file, and with a ``launch.Launch`` of ``nproc`` > 1 the step
starts those ranks itself and reads their file. The number of ranks is in no cache key: the result is one
process's.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from detrq.data.coco import CocoDetection, class_balanced_subset
from detrq.data.loading import eval_dataset, hessian_batches
from detrq.evaluation.bootstrap import save_detections
from detrq.evaluation.evaluate import TrunkCache, evaluate
from detrq.io.cache import cache_key, find_twin, load_cached
from detrq.io.errors import DetrqError
from detrq.io.layout import kind_dir, results_file
from detrq.io.results import atomic_output, environment, read_json, write_json_atomic
from detrq.models.detr import DETR
from detrq.parallel import distributed
from detrq.parallel.launch import Launch, run_ranks
from detrq.quant.allocate import allocate_bits
from detrq.quant.bitmaps import average_bits, model_size_bits, quantizable_layers, quantized
from detrq.quant.codes import QuantizerSettings
from detrq.quant.quantizers import EQ6, WeightQuantizer
from detrq.sensitivity import (ALL_METRICS, FIRST_ORDER, METRIC_NAMES, METRICS, TraceSettings, approximates,
                               check_metric, distillation_term_traces, first_order_sensitivity, sensitivity,
                               total_trace)
from detrq.sensitivity.costs import cost_table
from detrq.sensitivity.estimates import TraceEstimate
from detrq.sensitivity.modelopt import MODELOPT, MODELOPT_BITS, MODELOPT_NAME, modelopt_scores
from detrq.sensitivity.trace_checks import check_traces

# Every metric a scheme can use: the paper's, the first-order metric, and ModelOpt's auto_quantize score (its one
# estimator is "fisher": one backward per image, no probes; its file holds one estimate per layer and bit width).
SCHEME_METRICS: tuple[str, ...] = (*ALL_METRICS, MODELOPT)
SCHEME_NAMES: dict[str, str] = {**METRIC_NAMES, MODELOPT: MODELOPT_NAME}


@dataclass(frozen=True)
class Scheme:
    """A sensitivity metric estimated one way: a Table 1 row group, and the name of its traces and bit-map files.

    The default scheme of a metric (``variant=False``) is named after the metric; a variant (an extra,
    labelled row) is named ``<metric>-<estimator>``. The paper's three rows use the paper's Hessian, estimated
    well: a GGN estimate of Loss Sen or Out Sen Quant is only an approximation of it and can only be a variant.
    """

    metric: str
    estimator: str
    variant: bool = False
    probes: tuple[int, int] | None = None  # (min, max) probes of this scheme; None: the trace settings'

    def __post_init__(self) -> None:
        check_metric(self.metric, SCHEME_METRICS)
        TraceSettings(estimator=self.estimator, **self._probe_fields())  # validates the name and probe counts
        if self.metric == MODELOPT and self.estimator != "fisher":
            raise DetrqError(f"the {MODELOPT} metric has one estimator, fisher (one backward per image, no probes), "
                             f"not {self.estimator!r}")
        if not self.variant and self.approximate:
            raise DetrqError(f"the {SCHEME_NAMES[self.metric]} row uses the Hessian: {self.estimator} only "
                             f"approximates it there; list '{self.metric}:{self.estimator}' under extra_variants "
                             "instead")

    @property
    def name(self) -> str:
        return f"{self.metric}-{self.estimator}" if self.variant else self.metric

    def _probe_fields(self) -> dict[str, int]:
        return {} if self.probes is None else {"min_probes": self.probes[0], "max_probes": self.probes[1]}

    def settings(self, base: TraceSettings, replica: int = 0) -> TraceSettings:
        """``base`` with this scheme's estimator and probe counts, and probe seed ``base.seed + replica``."""
        return replace(base, estimator=self.estimator, seed=base.seed + replica, **self._probe_fields())

    @property
    def stochastic(self) -> bool:
        """True when the estimate depends on the probe seed. The fisher estimator (ModelOpt's score included) takes
        one backward per image and no probes: another seed gives the same numbers, so it gets no replicas."""
        return self.estimator != "fisher"

    @property
    def approximate(self) -> bool:
        """True when the estimate is of an approximation of the metric's Hessian (``hessian.approximates``); ModelOpt's
        score is computed exactly as it is defined."""
        return self.metric != MODELOPT and approximates(self.metric, self.estimator)

    @property
    def label(self) -> str:
        label = SCHEME_NAMES[self.metric]
        if self.variant:
            note = {"ggn": "GGN approximation", "fisher": "empirical Fisher"}.get(self.estimator, self.estimator)
            label = f"{label.replace(' (beyond the paper)', '')} [{note}] (beyond the paper)"
        return label


def schemes_from_params(estimators: dict[str, str], extra_variants: Iterable[str] = (),
                        probes: dict[str, Sequence[int]] | None = None) -> list[Scheme]:
    """The schemes of a run: one per metric in ``estimators`` ({metric: estimator}), in ``SCHEME_METRICS`` order,
    then one per ``"metric:estimator"`` in ``extra_variants``. ``probes`` ({scheme name: [min, max]}) sets the
    probe counts of the schemes it names (a blockwise probe costs one HVP per layer); the others use the trace
    settings'."""
    unknown = [m for m in estimators if m not in SCHEME_METRICS]
    if unknown:
        raise DetrqError(f"estimators: unknown metric {unknown[0]!r}; choose from {', '.join(SCHEME_METRICS)}")
    specs = [(m, estimators[m], False) for m in SCHEME_METRICS if m in estimators]
    for text in extra_variants:
        metric, sep, estimator = str(text).partition(":")
        if not sep:
            raise DetrqError(f"extra variant {text!r} is not of the form METRIC:ESTIMATOR, e.g. out-quant:ggn")
        specs.append((metric, estimator, True))
    probes = dict(probes or {})
    schemes = []
    for metric, estimator, variant in specs:
        name = Scheme(metric, estimator, variant).name
        counts = probes.pop(name, None)
        if counts is not None and (len(counts) != 2 or not all(isinstance(c, int) for c in counts)):
            raise DetrqError(f"probes for {name!r} must be [min, max], got {counts!r}")
        schemes.append(Scheme(metric, estimator, variant, None if counts is None else (counts[0], counts[1])))
    if probes:
        raise DetrqError(f"probes: {next(iter(probes))!r} is not a scheme of this run "
                         f"({', '.join(s.name for s in schemes)})")
    return schemes


def run_traces(model: DETR, checkpoint_sha: str, root: str | Path, split: str, metric: str, out: str | Path,
               settings: TraceSettings = TraceSettings(), *, device: str = "cpu", progress: bool = True,
               launch: Launch = Launch(), bits_range: range = MODELOPT_BITS, quantizer: WeightQuantizer = EQ6,
               kl_source: str | Path | None = None) -> dict[str, Any]:
    """Per-layer sensitivities for one metric on the class-balanced image set; writes and returns the JSON.

    For the paper's metrics ``layers`` holds one trace estimate per layer (``settings.estimator``); for the
    first-order metric each layer holds ``{"kl": trace estimate, "jacobian": row-norm sum}`` and the file
    holds Eq. (5)'s ``l1_scale``. Its KL term is Out Sen Float with the same settings (the same probes, the same
    numbers): with ``kl_source``, the Out Sen Float traces file for these very settings (``kl_sources`` finds it), it
    is read from there (computed into it first when that file does not hold them), so the two are estimated once, and
    ``seconds`` adds that file's; a sharded ``launch`` computes both terms in its ranks. For ModelOpt's score
    (``sensitivity.modelopt``) each layer holds one estimate per bit width of ``bits_range``, made with
    ``quantizer`` (both enter the key for it alone). A sharded ``launch``
    computes it in torchrun ranks (``launch.device``; not ModelOpt's); inside a process group every rank returns the
    result and rank 0 writes it.
    """
    check_metric(metric, SCHEME_METRICS)
    full = eval_dataset(model, root, split)
    key, image_ids = traces_key(model, checkpoint_sha, full, metric, settings, bits_range, quantizer)
    cached = load_cached(out, key, check=check_traces)
    if cached is not None:
        return cached
    if launch.sharded and metric == MODELOPT:
        raise DetrqError(f"the {MODELOPT} scores run in one process; use nproc 1")
    if launch.sharded:
        options = [f"--{k.replace('_', '-')}={v}" for k, v in settings.to_dict().items()]
        run_ranks(launch, ["traces", "--coco", str(root), "--split", split, "--metric", metric, "--out", str(out),
                           *options])
        return launched_result(out, key, check_traces)
    subset = eval_dataset(model, root, split, image_ids=image_ids)
    batches = hessian_batches(subset, settings.batch_size, device)
    start = time.perf_counter()
    extra: dict[str, Any] = {}
    if metric == FIRST_ORDER:
        kl = None
        if kl_source is not None:
            kl_file = run_traces(model, checkpoint_sha, root, split, "out-float", kl_source, settings, device=device,
                                 progress=progress)
            kl = {n: TraceEstimate(**v) for n, v in kl_file["layers"].items()}
            # The seconds of the estimate, wherever its KL part was computed: those of its file plus the Jacobian's.
            start = time.perf_counter() - kl_file["seconds"]
        terms = first_order_sensitivity(model, batches, settings, progress=progress, kl=kl)
        layers = {n: {"kl": est.to_dict(), "jacobian": terms["jacobian"][n]} for n, est in terms["kl"].items()}
        extra = {"l1_scale": terms["l1_scale"], "num_queries": terms["num_queries"]}
    elif metric == MODELOPT:
        scores = modelopt_scores(model, batches, bits_range, quantizer, progress=progress)
        layers = {n: {str(b): est.to_dict() for b, est in per.items()} for n, per in scores.items()}
        extra = {"bits": list(bits_range), "quantizer": quantizer.name, "quantizer_key": quantizer.key}
    else:
        layers = {n: est.to_dict() for n, est in sensitivity(model, batches, metric, settings,
                                                              progress=progress).items()}
    result = {
        "cache_key": key, "metric": metric, "estimator": settings.estimator,
        "approximation": metric != MODELOPT and approximates(metric, settings.estimator),
        "checkpoint_sha256": checkpoint_sha, "split": split, "image_ids": image_ids,
        "settings": settings.to_dict(), "transform": full.transform.describe(), "layers": layers, **extra,
        # Soft problems of the data (data.validate), so a reader of the traces knows, as evaluations record them.
        **({"data_warnings": full.data_report.protocol()} if full.data_report.warnings else {}),
        "seconds": time.perf_counter() - start, "ranks": distributed.world_size(), "environment": environment(),
    }
    if distributed.is_main():
        write_json_atomic(out, result)
    return result


def traces_key(model: DETR, checkpoint_sha: str, full: CocoDetection, metric: str, settings: TraceSettings,
               bits_range: range = MODELOPT_BITS, quantizer: WeightQuantizer = EQ6) -> tuple[str, list[int]]:
    """``run_traces``' cache key for the split ``full`` (``eval_dataset`` of it), and the Hessian image ids."""
    image_ids = class_balanced_subset(full, settings.num_images, settings.image_seed)
    scored = {"bits": list(bits_range), "quantizer": quantizer.key} if metric == MODELOPT else {}
    key = cache_key(kind="traces", metric=metric, checkpoint=checkpoint_sha, split=full.split, image_ids=image_ids,
                    settings=settings.to_dict(), transform=full.transform.describe(),
                    layers=list(quantizable_layers(model)), **scored)
    return key, image_ids


def launched_result(out: str | Path, key: str, check: Callable[[Any, str], Any] | None = None) -> dict[str, Any]:
    """The file the torchrun ranks wrote at ``out``, which must carry the key this process computed."""
    result = load_cached(out, key, check=check)
    if result is None:
        raise DetrqError(f"the torchrun ranks did not write {out} for these inputs (its cache key differs from "
                         "this process's); check that they load the same checkpoint and data")
    return result


def quantizer_key(quantizer: WeightQuantizer) -> dict[str, Any]:
    """The cache-key part of a quantizer: empty for Eq. (6), so that results made before quantizers existed
    keep their keys."""
    return {} if quantizer.name == "eq6" else {"quantizer": quantizer.key}


def build_quantizer(model: DETR, checkpoint_sha: str, root: str | Path, split: str,
                    settings: QuantizerSettings = QuantizerSettings(), *, batch_size: int = 10,
                    device: str = "cpu") -> WeightQuantizer:
    """The quantizer ``settings`` names, ready to use. GPTQ collects its input-activation Hessians on a
    class-balanced sample of ``settings.calib_images`` images of ``split`` (the training split: never val)
    with the float model; the sample's ids and the checkpoint enter its key."""
    if settings.name != "gptq":
        return WeightQuantizer(settings)
    if split.lower().startswith("val"):  # val2017, val: the images every result is evaluated on
        raise DetrqError(f"GPTQ calibration images must come from the training split, not {split!r}")
    from detrq.quant.gptq import collect_input_hessians

    full = eval_dataset(model, root, split)
    image_ids = class_balanced_subset(full, settings.calib_images, settings.calib_seed)
    batches = hessian_batches(eval_dataset(model, root, split, image_ids=image_ids), batch_size, device)
    hessians = collect_input_hessians(model, batches, quantizable_layers(model))
    return WeightQuantizer(settings, hessians, {"checkpoint": checkpoint_sha, "split": split,
                                                "image_ids": image_ids, "transform": full.transform.describe()})


def run_allocation(model: nn.Module, source: dict[str, Any] | str | Path, avg_bits: float, bits_range: range,
                   out: str | Path, *, negative_traces: str = "keep", time_limit: float = 60.0,
                   quantizer: WeightQuantizer = EQ6) -> dict[str, Any]:
    """The ILP bit map for one cost source and budget: a traces file (Eq. (2) for loss/out-float, Eq. (4) for
    out-quant, the first-order cost for out-first-order) or a measured-costs file ("Measured Sen"); the costs
    use ``quantizer``'s error."""
    if not isinstance(source, dict):
        source = read_json(source)
    if "layers" not in source:
        raise DetrqError("the cost source has no 'layers': pass a file written by `detrq traces` or a "
                         "measured-costs file")
    layers = quantizable_layers(model)
    missing = [n for n in source["layers"] if n not in layers]
    if missing:
        raise DetrqError(f"layer {missing[0]!r} of the cost source is not a quantizable layer of this model")
    weights = {n: layers[n].detach() for n in source["layers"]}
    numel = {n: w.numel() for n, w in weights.items()}
    # The weights enter the key by their exact bytes: a float reduction would depend on the thread count.
    weights_digest = hashlib.sha256(b"".join(w.cpu().numpy().tobytes() for w in weights.values())).hexdigest()
    key = cache_key(kind="allocation", source=source.get("cache_key"), avg_bits=float(avg_bits),
                    bits=[bits_range.start, bits_range.stop - 1], weights=weights_digest,
                    negative_traces=negative_traces, **quantizer_key(quantizer))
    cached = load_cached(out, key)
    if cached is not None:
        return cached
    omega = cost_table(source, weights, bits_range, negative_traces, quantizer)
    bit_map = allocate_bits(omega, numel, avg_bits, time_limit=time_limit)
    result = {
        "cache_key": key, "metric": source.get("metric", "measured"), "estimator": source.get("estimator"),
        "negative_traces": negative_traces, "quantizer": quantizer.name, "avg_bits_target": avg_bits,
        "bits_range": [bits_range.start, bits_range.stop - 1], "avg_bits": average_bits(bit_map, numel),
        "objective": sum(omega[n][b] for n, b in bit_map.items()),
        "size_bits": model_size_bits(model, bit_map, quantizer), "float_size_bits": model_size_bits(model, {}),
        "bit_map": bit_map, "source_key": source.get("cache_key"),
    }
    write_json_atomic(out, result)
    return result


def detections_path(out: str | Path) -> Path:
    """The detections kept beside an evaluation file (``eval_X.json`` -> ``eval_X.detections.npz``)."""
    out = Path(out)
    return out.with_name(out.stem + ".detections.npz")


def serves(evaluation: str | Path, keep_detections: bool) -> bool:
    """Whether an evaluation file with the right key serves a request: it does unless the request keeps the
    detections and the file has none beside it."""
    return not keep_detections or detections_path(evaluation).is_file()


def run_evaluation(model: DETR, checkpoint_sha: str, dataset: CocoDetection, bit_map: dict[str, int],
                   out: str | Path | None, *, batch_size: int = 8, device: str = "cpu", progress: bool = True,
                   label: str | None = None, keep_detections: bool = False, quantizer: WeightQuantizer = EQ6,
                   launch: Launch = Launch(), trunk: TrunkCache | None = None) -> dict[str, Any] | None:
    """COCO metrics of ``model`` with ``bit_map`` applied by ``quantizer`` (restored after), cached in ``out``
    when given. The result holds the per-class AP and the ideal packed size (``size_bits``).

    With ``keep_detections`` the raw detections go to ``detections_path(out)`` (what the paired bootstrap
    resamples) and a cache hit needs that file too. A sharded ``launch`` evaluates in torchrun ranks (Eq. (6)
    only; ``out`` required); inside a process group only rank 0 returns the result (the others: None). ``trunk``
    shares backbone features between evaluations of one process (``evaluate.TrunkCache``).
    """
    key = evaluation_key(checkpoint_sha, dataset, bit_map, batch_size, quantizer)
    cached = load_cached(out, key) if out else None
    if cached is not None and serves(out, keep_detections):
        return cached
    twin = find_twin(evaluation_folders(out), key, exclude=out) if out else None
    if twin is not None and serves(twin, keep_detections):
        # Every rank of a process group sees the same twin; rank 0 alone writes and returns it.
        return _adopt_evaluation(twin, out, label, keep_detections) if distributed.is_main() else None
    if launch.sharded:
        return _launch_evaluation(launch, dataset, bit_map, out, key, batch_size=batch_size, label=label,
                                  keep_detections=keep_detections, quantizer=quantizer)
    with quantized(model, bit_map, quantizer):
        metrics = evaluate(model, dataset, batch_size=batch_size, device=device, progress=progress, trunk=trunk)
    if metrics is None:
        return None
    numel = {n: p.numel() for n, p in quantizable_layers(model).items()}
    result = {
        "cache_key": key, "label": label,
        "metrics": {k: v for k, v in metrics.items() if k not in ("protocol", "detections")},
        "protocol": metrics["protocol"], "checkpoint_sha256": checkpoint_sha, "bit_map": bit_map,
        "avg_bits": average_bits(bit_map, numel) if bit_map else 32.0, "quantizer": quantizer.name,
        "size_bits": model_size_bits(model, bit_map, quantizer), "environment": environment(),
    }
    if out:
        if keep_detections:
            save_detections(detections_path(out), metrics["detections"])
        write_json_atomic(out, result)
    return result


def evaluation_key(checkpoint_sha: str, dataset: CocoDetection, bit_map: dict[str, int], batch_size: int,
                   quantizer: WeightQuantizer = EQ6) -> str:
    """``run_evaluation``'s cache key: the checkpoint, the annotations' bytes, the images, the batching, the size
    policy, the bit map and the quantizer."""
    return cache_key(kind="evaluate", checkpoint=checkpoint_sha,
                     annotations=dataset.annotations_sha256,
                     split=dataset.split, images=dataset.ids, batch_size=batch_size,
                     transform=dataset.transform.describe(), bit_map=bit_map, **quantizer_key(quantizer))


def evaluation_folders(out: str | Path) -> list[Path]:
    """Where an evaluation's twins may lie: every evaluation folder of the results directory ``out`` is in
    (Table 1's and the Pareto sweep's), or ``out``'s own folder when it is in none."""
    out = Path(out)
    if out.parent.name in ("evaluations", "pareto"):
        return [kind_dir(out.parent.parent, k) for k in ("evaluations", "pareto")]
    return [out.parent]


def _adopt_evaluation(twin: Path, out: str | Path, label: str | None, keep_detections: bool) -> dict[str, Any]:
    """The evaluation at ``twin`` (same cache key) written at ``out`` under ``label``, its detections too. Each copy
    keeps the twin's modification time, so a twin taken from a cache is still seen as reused (``reproduction``)."""
    out = Path(out)
    result = {**read_json(twin), "label": label}
    pairs = [(twin, write_json_atomic(out, result))]
    if keep_detections:
        with atomic_output(detections_path(out)) as tmp:
            shutil.copyfile(detections_path(twin), tmp)
        pairs.append((detections_path(twin), detections_path(out)))
    for src, dst in pairs:
        stat = src.stat()
        os.utime(dst, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return result


def _launch_evaluation(launch: Launch, dataset: CocoDetection, bit_map: dict[str, int], out: str | Path | None,
                       key: str, *, batch_size: int, label: str | None, keep_detections: bool,
                       quantizer: WeightQuantizer) -> dict[str, Any]:
    if quantizer.name != EQ6.name:
        raise DetrqError(f"nproc > 1 evaluates with the eq6 quantizer only, not {quantizer.name!r}; use nproc 1")
    if out is None:
        raise DetrqError("nproc > 1 needs a result file to evaluate into")
    with tempfile.TemporaryDirectory() as tmp:
        bit_map_file = Path(tmp) / "bit_map.json"
        write_json_atomic(bit_map_file, {"bit_map": bit_map})
        run_ranks(launch, ["evaluate", "--coco", str(dataset.root), "--split", dataset.split,
                           "--max-images", str(len(dataset)), "--batch-size", str(batch_size),
                           "--bit-map", str(bit_map_file), "--out", str(out),
                           *(["--label", label] if label is not None else []),
                           *(["--keep-detections"] if keep_detections else [])])
    return launched_result(out, key)


# --- The whole experiment as the notebooks run it: file layout and one call per step ---------------------------

# Result files of the checks beside the traces and bit maps (names; ``io.layout.results_file`` places them).
STABILITY_FILE = "stability.json"
CURVATURE_FILE = "curvature_check.json"
CLAIMS_FILE = "claims.json"
SEED_STABILITY_FILE = "seed_stability.json"


def _replica_suffix(replica: int) -> str:
    return f"_seed{replica}" if replica else ""


def traces_path(results_dir: str | Path, name: str, replica: int = 0) -> Path:
    """Where ``run_all_traces`` keeps one scheme's traces (the CLI's default name too); replica k > 0 is the
    same estimate with probe seed ``settings.seed + k``, for the convergence check."""
    return results_file(results_dir, f"traces_{name}{_replica_suffix(replica)}.json")


def bitmap_path(results_dir: str | Path, name: str, avg_bits: float, replica: int = 0) -> Path:
    """Where ``run_all_allocations`` keeps one scheme's bit map for one budget (the CLI's default name too)."""
    return results_file(results_dir, f"bitmap_{name}_{avg_bits:g}bit{_replica_suffix(replica)}.json")


def kl_sources(schemes: Iterable[Scheme], settings: TraceSettings, results_dir: str | Path, replica: int = 0
               ) -> dict[str, Path]:
    """For each first-order scheme, the traces file of an Out Sen Float scheme with the same settings (its KL
    term: ``run_traces``' ``kl_source``), where ``schemes`` has one."""
    schemes = list(schemes)
    float_files = {s.settings(settings, replica): traces_path(results_dir, s.name, replica)
                   for s in schemes if s.metric == "out-float"}
    return {s.name: float_files[s.settings(settings, replica)] for s in schemes
            if s.metric == FIRST_ORDER and s.settings(settings, replica) in float_files}


def replica_schemes(schemes: Iterable[Scheme], replica: int) -> list[Scheme]:
    """The schemes estimated again for probe-seed replica ``replica``: all of them for 0, the stochastic ones
    (``Scheme.stochastic``) after; a deterministic estimate would only repeat itself."""
    return [s for s in schemes if replica == 0 or s.stochastic]


def run_all_traces(model: DETR, checkpoint_sha: str, root: str | Path, split: str, results_dir: str | Path,
                   settings: TraceSettings, schemes: Iterable[Scheme], *, replica: int = 0, device: str = "cpu",
                   progress: bool = False, launch: Launch = Launch()) -> dict[str, dict[str, Any]]:
    """``run_traces`` for each scheme (its estimator) on the same Hessian image set; ``{scheme name: result}``.

    ``replica`` k > 0 reruns the stochastic schemes (``replica_schemes``) with probe seed ``settings.seed + k``
    into their own files.
    """
    sources = kl_sources(schemes, settings, results_dir, replica)
    return {s.name: run_traces(model, checkpoint_sha, root, split, s.metric, traces_path(results_dir, s.name, replica),
                               s.settings(settings, replica), device=device, progress=progress,
                               launch=Launch() if s.metric == MODELOPT else launch,  # ModelOpt: one process
                               kl_source=sources.get(s.name))
            for s in replica_schemes(schemes, replica)}


def quantizer_traces(model: DETR, checkpoint_sha: str, root: str | Path, split: str, results_dir: str | Path,
                     traces: dict[str, dict[str, Any]], quantizer: WeightQuantizer, *, device: str = "cpu",
                     progress: bool = False) -> dict[str, dict[str, Any]]:
    """``traces`` as cost sources for ``quantizer``: ModelOpt's score measures the output change that the quantizer
    makes, so a ModelOpt scheme is scored again with it (same images and settings, its own file
    ``traces_<name>_<quantizer>.json``); the Hessian traces do not depend on the quantizer and are kept."""
    if quantizer.name == EQ6.name:
        return dict(traces)
    return {name: tr if tr["metric"] != MODELOPT else
            run_traces(model, checkpoint_sha, root, split, MODELOPT,
                       traces_path(results_dir, f"{name}_{quantizer.name}"), TraceSettings(**tr["settings"]),
                       device=device, progress=progress,
                       bits_range=range(min(tr["bits"]), max(tr["bits"]) + 1), quantizer=quantizer)
            for name, tr in traces.items()}


def run_all_allocations(model: nn.Module, sources: dict[str, dict[str, Any]], results_dir: str | Path,
                        targets: tuple[float, ...], bits_range_for: Callable[[float], range], *,
                        negative_traces: str = "keep", replica: int = 0, time_limit: float = 60.0,
                        quantizer: WeightQuantizer = EQ6) -> dict[str, dict[float, dict[str, Any]]]:
    """``run_allocation`` for every cost source and average-bit target; ``{name: {target: allocation result}}``.

    ``bits_range_for(target)`` gives the per-layer choices, e.g. ``ilp.paper_bits_range``; the costs use
    ``quantizer``'s error.
    """
    return {name: {t: run_allocation(model, src, t, bits_range_for(t), bitmap_path(results_dir, name, t, replica),
                                     negative_traces=negative_traces, time_limit=time_limit, quantizer=quantizer)
                   for t in targets}
            for name, src in sources.items()}


def read_all_traces(results_dir: str | Path, checkpoint_sha: str | None = None,
                    names: Iterable[str] = METRICS, replica: int = 0) -> dict[str, dict[str, Any]]:
    """The traces files ``run_all_traces`` wrote, checked to belong to ``checkpoint_sha`` when given."""
    traces = {n: check_traces(read_json(path), str(path)) for n in names
              for path in [traces_path(results_dir, n, replica)]}
    for n, tr in traces.items():
        if checkpoint_sha is not None and tr.get("checkpoint_sha256") != checkpoint_sha:
            raise DetrqError(f"{traces_path(results_dir, n, replica).name} was computed for another checkpoint; "
                             "recompute the traces (notebook 01) for this one")
    return traces


def read_allocations(results_dir: str | Path, avg_bits: float, names: Iterable[str] = METRICS, replica: int = 0
                     ) -> dict[str, dict[str, Any]]:
    """The bit-map files ``run_all_allocations`` wrote for one budget, ``{name: allocation result}``."""
    return {n: read_json(bitmap_path(results_dir, n, avg_bits, replica)) for n in names}


def run_curvature_check(model: DETR, checkpoint_sha: str, root: str | Path, split: str, out: str | Path, *,
                        num_images: int, probes: int, image_seed: int = 0, seed: int = 0, batch_size: int = 10,
                        device: str = "cpu", cached_only: bool = False) -> dict[str, Any] | None:
    """Footnote 1's claim, measured: Hutchinson traces of Eq. (5)'s terms at float and at uniform 8-bit weights.

    At float weights the L1 term's Hessian is exactly 0 and the KL term carries all of Out Sen Float's
    curvature (see ``hessian.distillation_term_traces``). Uses a class-balanced sample of ``num_images`` drawn
    as the Hessian set is (seed ``image_seed``). Writes ``{"points": {"float"|"8bit": {term: total_trace(...)}}}``.
    ``cached_only``: return None instead of computing when ``out`` does not hold this result.
    """
    full = eval_dataset(model, root, split)
    image_ids = class_balanced_subset(full, num_images, image_seed)
    key = cache_key(kind="curvature", checkpoint=checkpoint_sha, split=split, image_ids=image_ids, probes=probes,
                    seed=seed, batch_size=batch_size, transform=full.transform.describe(),
                    layers=list(quantizable_layers(model)))
    cached = load_cached(out, key)
    if cached is not None or cached_only:
        return cached
    batches = hessian_batches(eval_dataset(model, root, split, image_ids=image_ids), batch_size, device)
    points = {}
    for point, bits in (("float", None), ("8bit", 8)):
        terms = distillation_term_traces(model, batches, quant_bits=bits, probes=probes, seed=seed)
        points[point] = {term: total_trace(est) for term, est in terms.items()}
    result = {"cache_key": key, "checkpoint_sha256": checkpoint_sha, "split": split, "image_ids": image_ids,
              "probes": probes, "seed": seed, "points": points, "environment": environment()}
    write_json_atomic(out, result)
    return result


def run_quant_curve(model: DETR, checkpoint_sha: str, dataset: CocoDetection, results_dir: str | Path,
                    bits: tuple[int, ...] = (8, 7, 6, 5, 4, 3), *, batch_size: int = 8, device: str = "cpu",
                    progress: bool = True) -> dict[str, Any]:
    """AP under uniform Eq. (6) weight quantization at each of ``bits`` (and float): how quantization hurts the
    model. The per-width evaluations share Table 1's cache files (``eval_<bits>_uniform.json``)."""
    results_dir = Path(results_dir)
    rows = []
    for b in (None, *bits):
        name = "eval_float_none.json" if b is None else f"eval_{b}_uniform.json"
        bit_map = {} if b is None else {n: b for n in quantizable_layers(model)}
        r = run_evaluation(model, checkpoint_sha, dataset, bit_map, results_file(results_dir, name),
                           batch_size=batch_size, device=device, progress=progress, label="float" if b is None else f"{b} uniform")
        rows.append({"label": "float" if b is None else f"W{b}", "bits": b, "AP": r["metrics"]["AP"],
                     "AP50": r["metrics"]["AP50"]})
    curve = {"rows": rows, "checkpoint_sha256": checkpoint_sha, "protocol": r["protocol"]}
    write_json_atomic(results_file(results_dir, "quant_curve.json"), curve)
    return curve
