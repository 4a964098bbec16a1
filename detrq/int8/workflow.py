"""The end-to-end INT8 run behind ``python -m detrq int8`` and ``notebooks/06_int8_faster_rcnn.ipynb``.

``run_int8`` loads the trained Faster R-CNN, quantizes it with one backend on a class-balanced calibration set
from the train split, and measures on the val split: serialized size, paired CPU latency per image, peak memory
per batch size (fresh subprocesses), COCO mAP float vs int8 (the shared ``coco_metrics``) and the per-image
relative error of the detections; the record goes to ``results/int8_<model>_<backend>.json``.
``activation_figures`` draws the float-vs-int8 layer figures (FX backend).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from detrq.cache import cache_key, load_cached
from detrq.data.coco import class_balanced_subset
from detrq.errors import DetrqError
from detrq.int8 import plots
from detrq.int8.activations import compare_layers, fused_float_reference
from detrq.int8.data import detection_dataset
from detrq.int8.detect import Detections, detection_agreement, evaluate_detector, paired_scores
from detrq.int8.detector import load_frcnn
from detrq.int8.measure import paired_latency, peak_memory, serialized_size
from detrq.int8.quantize import BACKENDS, quantization_plan, quantize_int8
from detrq.results import environment, sha256_file, write_json_atomic

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CHECKPOINT = PROJECT_ROOT / "checkpoints" / "frcnn_narrow.pth"
DEFAULT_DATA = PROJECT_ROOT / "data" / "synthetic"
# The config fields that are paths: resolved for the run. Inputs are stored relative to the repository root;
# where the outputs went is not stored, so a results file reads the same from any run directory.
_PATH_FIELDS = ("checkpoint", "data", "figures", "out")
_OUTPUT_FIELDS = ("figures", "out")
TARGETS = {"size_reduction_min": 0.74, "latency_ratio_max": 0.5, "AP_loss_points_max": 1.0}


@dataclass
class Int8RunConfig:
    """Inputs of one INT8 run; stored in its results file."""

    backend: str = "fx"
    checkpoint: str = str(DEFAULT_CHECKPOINT)
    data: str = str(DEFAULT_DATA)
    calib_images: int = 32  # class-balanced from the train split
    calib_seed: int = 0
    compile: bool = False  # pt2e only: torch.compile the int8 parts (what makes pt2e fast)
    eval_images: int | None = None  # first N val images; None = all
    latency_images: int = 4  # one run = these images one at a time (batch 1); time / images = per image
    latency_repeats: int = 7
    batch_sizes: tuple[int, ...] = (1, 2, 4, 32, 64)
    threads: int = 1
    figures: str | None = None  # directory for the activation figures (fx backend); None = no figures
    figure_image: int = 0  # val index of the image the activation figures show
    out: str | None = None  # default results/int8_frcnn_<name>_<backend>.json


def resolve(path: str | Path) -> Path:
    """A relative path is taken from the repository root (notebooks run in notebooks/)."""
    path = Path(path)
    return path if path.is_absolute() else PROJECT_ROOT / path


def calibration_images(data: str | Path, n: int, seed: int, size: int) -> tuple[list[Tensor], list[int]]:
    """``n`` class-balanced train images (seeded) as [0, 1] tensors, and their ids."""
    if n < 1:
        raise DetrqError(f"the calibration set is empty (calib_images={n}); pass at least 1")
    train = detection_dataset(data, "train", size)
    ids = class_balanced_subset(train, n, seed)
    index = {image_id: i for i, image_id in enumerate(train.ids)}
    return [train[index[i]][0] for i in ids], ids


def build_model(checkpoint: str, backend: str | None = None, data: str = str(DEFAULT_DATA), calib_images: int = 32,
                calib_seed: int = 0, compile: bool = False) -> nn.Module:
    """The float model (``backend`` None) or its int8 twin, built deterministically from plain arguments:
    the factory that ``peak_memory``'s subprocesses call."""
    model, cfg, _ = load_frcnn(checkpoint)
    if backend is None:
        return model
    images, _ = calibration_images(data, calib_images, calib_seed, cfg.image_size)
    return quantize_int8(model, images, backend, compile=compile)


def _size_report(model: nn.Module, qmodel: nn.Module) -> dict[str, Any]:
    f, q = serialized_size(model), serialized_size(qmodel)
    return {"size_bytes": {"float": f, "int8": q}, "size_ratio": q / f, "size_reduction": 1 - q / f}


def _cache_key(cfg: Int8RunConfig, checkpoint_sha: str) -> str:
    """Everything that determines a run's numbers: the config (not where files go), checkpoint and val labels."""
    ann = Path(cfg.data) / "annotations" / "instances_val.json"
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "checkpoint", "data", "figures")}
    return cache_key(settings=settings, checkpoint=checkpoint_sha, val=sha256_file(ann) if ann.is_file() else None)


def run_int8(cfg: Int8RunConfig, progress: bool = False, reuse: bool = True) -> dict[str, Any]:
    """Quantize, measure, write the results JSON (and the figures if asked); returns the record.

    With ``reuse``, an existing results file with the same inputs (``cache_key``) and its figures are returned
    as they are instead of being recomputed (nbval re-runs the notebook this way in seconds).
    The onnxruntime backend adds an "onnx" section: float and int8 ONNX parts run in onnxruntime, their
    latency and their agreement with PyTorch.
    """
    if cfg.backend not in BACKENDS:
        raise DetrqError(f"unknown backend {cfg.backend!r}; use one of {', '.join(BACKENDS)}")
    torch.set_num_threads(cfg.threads)
    cfg = dataclasses.replace(cfg, **{k: str(resolve(getattr(cfg, k))) for k in _PATH_FIELDS
                                      if getattr(cfg, k) is not None})
    model, mcfg, sha = load_frcnn(cfg.checkpoint)
    out = cfg.out or str(PROJECT_ROOT / "results" / f"int8_frcnn_{mcfg.name}_{cfg.backend}.json")
    key = _cache_key(cfg, sha)
    cached = load_cached(out, key) if reuse else None
    if cached is not None:
        figures = cached.get("activations", {}).get("figures", [])
        if cfg.figures is None or (figures and all((Path(cfg.figures) / f).is_file() for f in figures)):
            return cached
    val = detection_dataset(cfg.data, "val", mcfg.image_size, max_images=cfg.eval_images)
    calib, calib_ids = calibration_images(cfg.data, cfg.calib_images, cfg.calib_seed, mcfg.image_size)
    t0 = time.perf_counter()
    qmodel = quantize_int8(model, calib, cfg.backend, compile=cfg.compile)
    quantize_s = time.perf_counter() - t0

    ev_f = evaluate_detector(model, val, progress=progress)
    ev_q = evaluate_detector(qmodel, val, progress=progress)
    lat_images = [val[i][0] for i in range(cfg.latency_images)]
    latency = paired_latency(lambda: [model([im]) for im in lat_images], lambda: [qmodel([im]) for im in lat_images],
                             repeats=cfg.latency_repeats)
    latency = {"float_s_per_image": latency["float_s"] / cfg.latency_images,
               "int8_s_per_image": latency["int8_s"] / cfg.latency_images,
               "ratio": latency["ratio"], "repeats": latency["repeats"], "images_per_run": cfg.latency_images}
    kwargs = {"checkpoint": cfg.checkpoint, "data": cfg.data, "calib_images": cfg.calib_images,
              "calib_seed": cfg.calib_seed, "compile": cfg.compile}
    memory = {name: peak_memory("detrq.int8.workflow:build_model", {**kwargs, "backend": backend}, "detector",
                                cfg.batch_sizes, mcfg.image_size, threads=cfg.threads)
              for name, backend in (("float", None), ("int8", cfg.backend))}

    ap_f, ap_q = ev_f["metrics"]["AP"], ev_q["metrics"]["AP"]
    sizes = _size_report(model, qmodel)
    record = {
        "model": f"frcnn_{mcfg.name}",
        "backend": cfg.backend,
        "quantized_parts": list(quantization_plan(model).targets),
        "float_parts": "rpn, roi pooling, box predictor, transform and post-processing",
        **sizes,
        "latency_ratio": latency["ratio"],
        "latency": latency,
        "AP_float": ap_f,
        "AP_int8": ap_q,
        "AP_loss_points": 100 * (ap_f - ap_q),
        "metrics_float": ev_f["metrics"],
        "metrics_int8": ev_q["metrics"],
        "detection_error": detection_agreement(ev_f["detections"], ev_q["detections"]),
        "peak_memory_mb": {k: {b: v["peak_rss_mb"] for b, v in m.items()} for k, m in memory.items()},
        "peak_memory_detail": memory,
        "targets": {**TARGETS,
                    "size_met": sizes["size_reduction"] >= TARGETS["size_reduction_min"],
                    "latency_met": latency["ratio"] <= TARGETS["latency_ratio_max"],
                    "AP_met": 100 * (ap_f - ap_q) <= TARGETS["AP_loss_points_max"]},
        "quantize_s": quantize_s,
        "calibration": {"split": "train", "num_images": cfg.calib_images, "seed": cfg.calib_seed,
                        "image_ids": calib_ids, "policy": "class_balanced_subset"},
        "checkpoint": Path(cfg.checkpoint).name,
        "checkpoint_sha256": sha,
        "config": {k: _repo_relative(v) if k in _PATH_FIELDS else v for k, v in dataclasses.asdict(cfg).items()
                   if k not in _OUTPUT_FIELDS},
        "environment": environment(),
        "cache_key": key,
    }
    if cfg.figures is not None:
        record["activations"] = activation_figures(model, qmodel, val[cfg.figure_image][0], ev_f["detections"],
                                                   ev_q["detections"], cfg.figures)
    if cfg.backend == "onnxruntime":
        from detrq.int8.onnx_export import onnx_report

        record["onnx"] = onnx_report(model, qmodel, lat_images, cfg.latency_repeats)
    write_json_atomic(out, record)
    return record


def _repo_relative(path: str | None) -> str | None:
    """A results file names paths relative to the repository root when they lie inside it (portable results)."""
    if path is None:
        return None
    p = Path(path)
    return str(p.relative_to(PROJECT_ROOT)) if p.is_absolute() and p.is_relative_to(PROJECT_ROOT) else path


def activation_figures(model: nn.Module, qmodel: nn.Module, image: Tensor, float_dets: Detections,
                       int8_dets: Detections, fig_dir: str | Path, prefix: str = "int8") -> dict[str, Any]:
    """The four layer figures for one image of an FX-quantized detector; returns per-layer SQNR and the file
    names (inside ``fig_dir``).

    Layers compared: every conv of the backbone and FPN, each int8 layer fed the float layer's input.
    """
    if not isinstance(qmodel.backbone, torch.fx.GraphModule) or not any(
            "quantized" in type(m).__module__ for m in qmodel.backbone.modules()):
        raise DetrqError("activation figures need an FX-quantized model (backend 'fx')")
    x = model.transform([image])[0].tensors
    diffs = compare_layers(fused_float_reference(model.backbone), qmodel.backbone, x)
    fig_dir = Path(fig_dir)
    paths = [
        plots.plot_first_layer(image, diffs[0], fig_dir / f"{prefix}_first_layer.png"),
        plots.plot_layer_maps(diffs, fig_dir / f"{prefix}_layer_maps.png"),
        plots.plot_hexbins(diffs, paired_scores(float_dets, int8_dets), fig_dir / f"{prefix}_hexbin.png"),
        plots.plot_sqnr(diffs, fig_dir / f"{prefix}_sqnr.png"),
    ]
    return {"sqnr_db": {d.name: d.sqnr_db for d in diffs},
            "mean_rel_diff_pct": {d.name: float(d.rel_diff_map.mean()) for d in diffs},
            "min_sqnr_layer": min(diffs, key=lambda d: d.sqnr_db).name,
            "median_sqnr_db": float(np.median([d.sqnr_db for d in diffs])),
            "figures": [p.name for p in paths]}


def int8_markdown(records: dict[str, dict[str, Any]]) -> str:
    """A markdown table of the runs (one row per backend): size, latency, peak memory, mAP, detection error."""
    batches = list(next(iter(records.values()))["peak_memory_mb"]["float"])
    head = ("| backend | size float / int8 (MB) | smaller | latency float / int8 (ms/img) | ratio | AP float | AP int8 "
            "| box rel. error | " + " | ".join(f"peak RSS b{b} f/i (MB)" for b in batches) + " |")
    rows = [head, "|" + "---|" * (8 + len(batches))]
    for backend, r in records.items():
        lat, mem, err = r["latency"], r["peak_memory_mb"], r["detection_error"]["box_rel_error"]
        rows.append(
            f"| {backend} | {r['size_bytes']['float'] / 1e6:.2f} / {r['size_bytes']['int8'] / 1e6:.2f} "
            f"| {r['size_reduction']:.1%} | {lat['float_s_per_image'] * 1e3:.1f} / {lat['int8_s_per_image'] * 1e3:.1f} "
            f"| {r['latency_ratio']:.2f} | {r['AP_float']:.4f} | {r['AP_int8']:.4f} "
            f"| {err['mean']:.2%} ± {err['std']:.2%} | "
            + " | ".join(f"{mem['float'][b]:.0f} / {mem['int8'][b]:.0f}" for b in batches) + " |")
    return "\n".join(rows)


def int8_summary(records: dict[str, dict[str, Any]]) -> str:
    """Short, rounded lines of the machine-independent numbers (sizes, mAP): what nbval compares."""
    lines = []
    for backend, r in records.items():
        lines.append(f"{backend}: {r['size_reduction']:.1%} smaller, AP {r['AP_float']:.3f} -> {r['AP_int8']:.3f} "
                     f"(loss {r['AP_loss_points']:.1f} points), quantized {', '.join(r['quantized_parts'])}")
    return "\n".join(lines)
