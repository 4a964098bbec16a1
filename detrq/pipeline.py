"""The paper's steps as cached, file-producing functions: Hessian traces -> ILP bit maps -> evaluations.

The CLI and the notebooks call these. Each writes one JSON under ``results/`` atomically, with a ``cache_key``
built from everything that determines the result (checkpoint hash, image ids, seeds, settings), and returns the
cached file instead of recomputing when the key matches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detrq.cache import cache_key, load_cached
from detrq.data.coco import CocoDetection, EvalTransform, class_balanced_subset, collate
from detrq.errors import DetrqError
from detrq.evaluate import evaluate
from detrq.hessian import METRICS, distillation_term_traces, sensitivity, total_trace
from detrq.ilp import allocate_bits, sensitivity_costs
from detrq.models.detr import DETR, build_detr, load_checkpoint
from detrq.paths import PROJECT_ROOT
from detrq.quant import average_bits, quantizable_layers, quantize_tensor, quantized, model_size_bits
from detrq.results import environment, read_json, sha256_file, write_json_atomic


@dataclass(frozen=True)
class TraceSettings:
    """How the Hutchinson traces are estimated (all of it goes into the cache key)."""

    num_images: int = 100  # the paper's Hessian image set size
    image_seed: int = 0  # seed of the class-balanced sample
    batch_size: int = 10
    max_probes: int = 100
    min_probes: int = 20
    rel_tol: float = 0.05
    probes_per_pass: int = 10
    seed: int = 0  # probe seed


def load_model(preset: str, checkpoint: str | Path, device: str = "cpu", *, min_size: int | None = None,
               max_size: int | None = None) -> tuple[DETR, str]:
    """A preset model with ``checkpoint`` loaded (strict), in eval mode, and the checkpoint's SHA-256.

    ``min_size``/``max_size`` override the preset's image-size policy (None keeps it); ``eval_dataset`` and
    therefore the Hessian images and every evaluation follow the model's policy.
    """
    model = build_detr(preset, min_size=min_size, max_size=max_size)
    load_checkpoint(model, checkpoint)
    return model.to(device).eval(), sha256_file(checkpoint)


def eval_dataset(model: DETR, root: str | Path, split: str, max_images: int | None = None,
                 image_ids: list[int] | None = None) -> CocoDetection:
    """A split with the model's evaluation size policy (also used for the Hessian images: no augmentation)."""
    return CocoDetection(root, split, EvalTransform(model.cfg.min_size, model.cfg.max_size), image_ids=image_ids,
                         max_images=max_images)


def hessian_batches(dataset: CocoDetection, batch_size: int, device: str = "cpu") -> list[tuple[list, list]]:
    """All of ``dataset`` as ``(images, targets)`` batches held in memory (every probe revisits them)."""
    items = [dataset[i] for i in range(len(dataset))]
    batches = []
    for k in range(0, len(items), batch_size):
        images, targets = collate(items[k:k + batch_size])
        batches.append(([im.to(device) for im in images],
                        [{k2: v.to(device) if torch.is_tensor(v) else v for k2, v in t.items()} for t in targets]))
    return batches


def run_traces(model: DETR, checkpoint_sha: str, root: str | Path, split: str, metric: str, out: str | Path,
               settings: TraceSettings = TraceSettings(), *, device: str = "cpu", progress: bool = True
               ) -> dict[str, Any]:
    """Per-layer Hessian traces for one metric on the class-balanced image set; writes and returns the JSON."""
    if metric not in METRICS:
        raise DetrqError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    full = eval_dataset(model, root, split)
    image_ids = class_balanced_subset(full, settings.num_images, settings.image_seed)
    key = cache_key(kind="traces", metric=metric, checkpoint=checkpoint_sha, split=split, image_ids=image_ids,
                    settings=settings.__dict__, transform=full.transform.describe(),
                    layers=list(quantizable_layers(model)))
    cached = load_cached(out, key)
    if cached is not None:
        return cached
    subset = eval_dataset(model, root, split, image_ids=image_ids)
    estimates = sensitivity(model, hessian_batches(subset, settings.batch_size, device), metric,
                            max_probes=settings.max_probes, min_probes=settings.min_probes,
                            rel_tol=settings.rel_tol, probes_per_pass=settings.probes_per_pass, seed=settings.seed,
                            progress=progress)
    result = {
        "cache_key": key, "metric": metric, "checkpoint_sha256": checkpoint_sha, "split": split,
        "image_ids": image_ids, "settings": settings.__dict__, "transform": full.transform.describe(),
        "layers": {name: est.to_dict() for name, est in estimates.items()}, "environment": environment(),
    }
    write_json_atomic(out, result)
    return result


def run_allocation(model: nn.Module, traces: dict[str, Any] | str | Path, avg_bits: float, bits_range: range,
                   out: str | Path, *, time_limit: float = 60.0) -> dict[str, Any]:
    """The ILP bit map for one traces file and budget (Eq. (2) for loss/out-float, Eq. (4) for out-quant)."""
    if not isinstance(traces, dict):
        traces = read_json(traces)
    if "layers" not in traces or "metric" not in traces:
        raise DetrqError("the traces file has no 'layers'/'metric': pass a file written by `detrq traces`")
    layers = quantizable_layers(model)
    missing = [n for n in traces["layers"] if n not in layers]
    if missing:
        raise DetrqError(f"traces layer {missing[0]!r} is not a quantizable layer of this model")
    weights = {n: layers[n].detach() for n in traces["layers"]}
    numel = {n: w.numel() for n, w in weights.items()}
    # The weights enter the key by their exact bytes: a float reduction would depend on the thread count.
    weights_digest = hashlib.sha256(b"".join(w.cpu().numpy().tobytes() for w in weights.values())).hexdigest()
    key = cache_key(kind="allocation", traces=traces.get("cache_key"), avg_bits=float(avg_bits),
                    bits=[bits_range.start, bits_range.stop - 1], weights=weights_digest)
    cached = load_cached(out, key)
    if cached is not None:
        return cached
    reference = {n: quantize_tensor(w, 8) for n, w in weights.items()} if traces["metric"] == "out-quant" else None
    avg_traces = {n: v["avg_trace"] for n, v in traces["layers"].items()}
    omega = sensitivity_costs(avg_traces, weights, bits_range, reference)
    bit_map = allocate_bits(omega, numel, avg_bits, time_limit=time_limit)
    result = {
        "cache_key": key, "metric": traces["metric"], "avg_bits_target": avg_bits,
        "bits_range": [bits_range.start, bits_range.stop - 1], "avg_bits": average_bits(bit_map, numel),
        "objective": sum(omega[n][b] for n, b in bit_map.items()),
        "size_bits": model_size_bits(model, bit_map), "float_size_bits": model_size_bits(model, {}),
        "bit_map": bit_map, "traces_key": traces.get("cache_key"),
    }
    write_json_atomic(out, result)
    return result


def run_evaluation(model: DETR, checkpoint_sha: str, dataset: CocoDetection, bit_map: dict[str, int],
                   out: str | Path | None, *, batch_size: int = 8, device: str = "cpu", progress: bool = True,
                   label: str | None = None) -> dict[str, Any]:
    """COCO metrics of ``model`` with ``bit_map`` applied (restored after), cached in ``out`` when given."""
    key = cache_key(kind="evaluate", checkpoint=checkpoint_sha,
                    annotations=sha256_file(dataset.root / "annotations" / f"instances_{dataset.split}.json"),
                    split=dataset.split, images=dataset.ids, batch_size=batch_size,
                    transform=dataset.transform.describe(), bit_map=bit_map)
    cached = load_cached(out, key) if out else None
    if cached is not None:
        return cached
    with quantized(model, bit_map):
        metrics = evaluate(model, dataset, batch_size=batch_size, device=device, progress=progress)
    numel = {n: p.numel() for n, p in quantizable_layers(model).items()}
    result = {
        "cache_key": key, "label": label, "metrics": {k: v for k, v in metrics.items() if k != "protocol"},
        "protocol": metrics["protocol"], "checkpoint_sha256": checkpoint_sha, "bit_map": bit_map,
        "avg_bits": average_bits(bit_map, numel) if bit_map else 32.0, "environment": environment(),
    }
    if out:
        write_json_atomic(out, result)
    return result


# --- The whole experiment as the notebooks run it: file layout and one call per step ---------------------------

# Result files of the checks beside the traces (names inside a results directory).
STABILITY_FILE = "stability.json"
CURVATURE_FILE = "curvature_check.json"
CLAIMS_FILE = "claims.json"


def resolve_path(path: str | Path) -> Path:
    """``path`` as given if absolute, else relative to the repository root, so that a notebook finds the same
    files whether papermill or nbval starts it in the repository root or in ``notebooks/``."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


def traces_path(results_dir: str | Path, metric: str) -> Path:
    """Where ``run_all_traces`` keeps one metric's traces (the CLI's default name too)."""
    return Path(results_dir) / f"traces_{metric}.json"


def bitmap_path(results_dir: str | Path, metric: str, avg_bits: float) -> Path:
    """Where ``run_all_allocations`` keeps one metric's bit map for one budget (the CLI's default name too)."""
    return Path(results_dir) / f"bitmap_{metric}_{avg_bits:g}bit.json"


def run_all_traces(model: DETR, checkpoint_sha: str, root: str | Path, split: str, results_dir: str | Path,
                   settings: TraceSettings, *, metrics: tuple[str, ...] = METRICS, device: str = "cpu",
                   progress: bool = False) -> dict[str, dict[str, Any]]:
    """``run_traces`` for each metric on the same Hessian image set; ``{metric: traces result}``."""
    return {m: run_traces(model, checkpoint_sha, root, split, m, traces_path(results_dir, m), settings,
                          device=device, progress=progress) for m in metrics}


def run_all_allocations(model: nn.Module, traces: dict[str, dict[str, Any]], results_dir: str | Path,
                        targets: tuple[float, ...], bits_range_for: Callable[[float], range], *,
                        time_limit: float = 60.0) -> dict[str, dict[float, dict[str, Any]]]:
    """``run_allocation`` for every metric and average-bit target; ``{metric: {target: allocation result}}``.

    ``bits_range_for(target)`` gives the per-layer choices, e.g. ``ilp.paper_bits_range``.
    """
    return {m: {t: run_allocation(model, tr, t, bits_range_for(t), bitmap_path(results_dir, m, t),
                                  time_limit=time_limit) for t in targets}
            for m, tr in traces.items()}


def read_all_traces(results_dir: str | Path, checkpoint_sha: str | None = None,
                    metrics: tuple[str, ...] = METRICS) -> dict[str, dict[str, Any]]:
    """The traces files ``run_all_traces`` wrote, checked to belong to ``checkpoint_sha`` when given."""
    traces = {m: read_json(traces_path(results_dir, m)) for m in metrics}
    for m, tr in traces.items():
        if checkpoint_sha is not None and tr.get("checkpoint_sha256") != checkpoint_sha:
            raise DetrqError(f"{traces_path(results_dir, m)} was computed for another checkpoint; recompute the "
                             "traces (notebook 01) for this one")
    return traces


def read_allocations(results_dir: str | Path, avg_bits: float, metrics: tuple[str, ...] = METRICS
                     ) -> dict[str, dict[str, Any]]:
    """The bit-map files ``run_all_allocations`` wrote for one budget, ``{metric: allocation result}``."""
    return {m: read_json(bitmap_path(results_dir, m, avg_bits)) for m in metrics}


def run_curvature_check(model: DETR, checkpoint_sha: str, root: str | Path, split: str, out: str | Path, *,
                        num_images: int, probes: int, image_seed: int = 0, seed: int = 0, batch_size: int = 10,
                        device: str = "cpu") -> dict[str, Any]:
    """Footnote 1's claim, measured: Hutchinson traces of Eq. (5)'s terms at float and at uniform 8-bit weights.

    At float weights the L1 term's Hessian is exactly 0 and the KL term carries all of Out Sen Float's
    curvature (see ``hessian.distillation_term_traces``). Uses a class-balanced sample of ``num_images`` drawn
    as the Hessian set is (seed ``image_seed``). Writes ``{"points": {"float"|"8bit": {term: total_trace(...)}}}``.
    """
    full = eval_dataset(model, root, split)
    image_ids = class_balanced_subset(full, num_images, image_seed)
    key = cache_key(kind="curvature", checkpoint=checkpoint_sha, split=split, image_ids=image_ids, probes=probes,
                    seed=seed, batch_size=batch_size, transform=full.transform.describe(),
                    layers=list(quantizable_layers(model)))
    cached = load_cached(out, key)
    if cached is not None:
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
        r = run_evaluation(model, checkpoint_sha, dataset, bit_map, results_dir / name, batch_size=batch_size,
                           device=device, progress=progress, label="float" if b is None else f"{b} uniform")
        rows.append({"label": "float" if b is None else f"W{b}", "bits": b, "AP": r["metrics"]["AP"],
                     "AP50": r["metrics"]["AP50"]})
    curve = {"rows": rows, "checkpoint_sha256": checkpoint_sha, "protocol": r["protocol"]}
    write_json_atomic(results_dir / "quant_curve.json", curve)
    return curve
