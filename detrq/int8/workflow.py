"""The end-to-end INT8 run behind ``python -m detrq int8`` and ``notebooks/06_int8_faster_rcnn.ipynb``.

``run_int8`` builds the float detector (the trained narrow Faster R-CNN, or a stock torchvision architecture with
random weights, ``detrq.int8.stock``), quantizes the asked-for parts with one backend on a class-balanced
calibration set from the train split, and measures on the val split: serialized size, paired CPU latency per
image, the per-stage time and output breakdown (``detrq.int8.stages``), peak memory per batch size (fresh
subprocesses), COCO mAP float vs int8 (trained model only) and the per-image relative error of the detections;
the record goes to ``results/int8_<model>_<backend>.json``. ``activation_figures`` draws the float-vs-int8 layer
figures (FX backend).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detrq.data.coco import class_balanced_subset
from detrq.int8 import plots
from detrq.int8.data import detection_dataset
from detrq.int8.detect import Detections, detection_agreement, evaluate_detector, paired_scores, run_detector
from detrq.int8.detector import load_frcnn
from detrq.int8.measure import paired_latency, peak_memory, phase_printer, serialized_size
from detrq.int8.onnx_quantize import needs_reduce_range
from detrq.int8.plan import DETECTOR_PARTS, quantization_plan
from detrq.int8.quantize import BACKENDS, quantize_int8
from detrq.int8.stages import compare_breakdowns, stage_breakdown
from detrq.int8.stock import STOCK_IMAGE_SIZE, STOCK_MODELS, build_stock
from detrq.io.cache import cache_key, load_cached
from detrq.io.errors import DetrqError
from detrq.io.layout import results_file
from detrq.io.paths import PROJECT_ROOT, repo_relative, resolve_path
from detrq.io.results import cpu_int8_isa, cpu_record, environment, sha256_file, write_json_atomic

DEFAULT_CHECKPOINT = PROJECT_ROOT / "checkpoints" / "frcnn_narrow.pth"
DEFAULT_DATA = PROJECT_ROOT / "data" / "synthetic"
# The config fields that are paths: resolved for the run. Inputs are stored relative to the repository root;
# where the outputs went is not stored, so a results file reads the same from any run directory.
_PATH_FIELDS = ("checkpoint", "data", "figures", "out")
_OUTPUT_FIELDS = ("figures", "out")
_LARGE_BATCH = 32  # batches from this size on may run at Int8RunConfig.large_batch_image_size
TARGETS = {"size_reduction_min": 0.74, "latency_ratio_max": 0.5, "AP_loss_points_max": 1.0}


@dataclass
class Int8RunConfig:
    """Inputs of one INT8 run; stored in its results file."""

    backend: str = "fx"
    # "narrow": the trained checkpoint; or one of stock.STOCK_MODELS (torchvision's architecture, random weights
    # with BN statistics recalibrated on the calibration images; no AP)
    model: str = "narrow"
    checkpoint: str = str(DEFAULT_CHECKPOINT)
    data: str = str(DEFAULT_DATA)
    parts: tuple[str, ...] | None = None  # detector parts to quantize (quantize.DETECTOR_PARTS); None = all
    image_size: int | None = None  # None: the checkpoint's (narrow) or torchvision's evaluation size (stock)
    seed: int = 0  # stock models: the random weights
    calib_images: int = 32  # class-balanced from the train split
    calib_seed: int = 0
    compile: bool = False  # pt2e only: torch.compile the int8 parts (what makes pt2e fast)
    eval_images: int | None = None  # first N val images; None = all
    agreement_score_thr: float = 0.5  # detections compared float vs int8 (random weights score about 1/91)
    latency_images: int = 4  # one run = these images one at a time (batch 1); time / images = per image
    latency_repeats: int = 7
    breakdown_repeats: int = 3  # passes over the latency images of the per-stage breakdown
    batch_sizes: tuple[int, ...] = (1, 2, 4, 32, 64)
    # batches of at least 32 are measured at this image size (model and inputs) where set: memory and time
    large_batch_image_size: int | None = None
    threads: int = 1
    figures: str | None = None  # directory for the activation figures (fx backend); None = no figures
    figure_image: int = 0  # val index of the image the activation figures show
    out: str | None = None  # default results/int8_<model>_<backend>.json


@dataclass(frozen=True)
class FloatModel:
    """The float detector of a run and what identifies it."""

    model: nn.Module
    name: str  # "frcnn_narrow" or the torchvision builder's name
    image_size: int
    checkpoint_sha256: str | None  # None for random weights
    calib: list[Tensor]  # the calibration images (stock models: also their BN statistics)
    calib_ids: list[int]


def calibration_images(data: str | Path, n: int, seed: int, size: int) -> tuple[list[Tensor], list[int]]:
    """``n`` class-balanced train images (seeded) as [0, 1] tensors, and their ids."""
    if n < 1:
        raise DetrqError(f"the calibration set is empty (calib_images={n}); pass at least 1")
    train = detection_dataset(data, "train", size)
    ids = class_balanced_subset(train, n, seed)
    index = {image_id: i for i, image_id in enumerate(train.ids)}
    return [train[index[i]][0] for i in ids], ids


def float_model(cfg: Int8RunConfig) -> FloatModel:
    """The run's float detector (eval mode) with its calibration images."""
    if cfg.model == "narrow":
        model, mcfg, sha = load_frcnn(resolve_path(cfg.checkpoint))
        size = cfg.image_size or mcfg.image_size
        if size != mcfg.image_size:
            model.transform.min_size, model.transform.max_size = (size,), size
        calib, ids = calibration_images(resolve_path(cfg.data), cfg.calib_images, cfg.calib_seed, size)
        return FloatModel(model, f"frcnn_{mcfg.name}", size, sha, calib, ids)
    if cfg.model not in STOCK_MODELS:
        raise DetrqError(f"unknown model {cfg.model!r}; use 'narrow' or one of {', '.join(STOCK_MODELS)}")
    size = cfg.image_size or STOCK_IMAGE_SIZE
    calib, ids = calibration_images(resolve_path(cfg.data), cfg.calib_images, cfg.calib_seed, size)
    return FloatModel(build_stock(cfg.model, size, cfg.seed, calib), cfg.model, size, None, calib, ids)


def build_model(config: dict[str, Any], quantized: bool) -> nn.Module:
    """The float model of the run ``config`` (an ``Int8RunConfig`` as a dict), or its int8 twin: built
    deterministically, the factory that ``peak_memory``'s subprocesses call."""
    cfg = Int8RunConfig(**config)
    fm = float_model(cfg)
    if not quantized:
        return fm.model
    return quantize_int8(fm.model, fm.calib, cfg.backend, parts=cfg.parts, compile=cfg.compile)


def _size_report(model: nn.Module, qmodel: nn.Module) -> dict[str, Any]:
    f, q = serialized_size(model), serialized_size(qmodel)
    return {"size_bytes": {"float": f, "int8": q}, "size_ratio": q / f, "size_reduction": 1 - q / f}


def _cache_key(cfg: Int8RunConfig, checkpoint_sha: str | None) -> str:
    """Everything that determines a run's numbers: the config (not where files go), checkpoint and val labels."""
    ann = Path(cfg.data) / "annotations" / "instances_val.json"
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "checkpoint", "data", "figures")}
    return cache_key(settings=settings, checkpoint=checkpoint_sha, val=sha256_file(ann) if ann.is_file() else None)


def _peak_memory(cfg: Int8RunConfig, image_size: int, say: Callable[[str], None]) -> dict[str, Any]:
    """Peak RSS of float and int8 per batch size, each in a fresh subprocess; large batches at
    ``cfg.large_batch_image_size`` where set. Also records the image size each batch ran at."""
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _OUTPUT_FIELDS}
    groups: dict[int, list[int]] = {}
    for b in cfg.batch_sizes:
        size = cfg.large_batch_image_size if cfg.large_batch_image_size and b >= _LARGE_BATCH else image_size
        groups.setdefault(size, []).append(b)
    detail: dict[str, dict[str, Any]] = {"float": {}, "int8": {}}
    for size, batches in groups.items():
        for name, quantized in (("float", False), ("int8", True)):
            for b in batches:  # one line per child process: each builds (and calibrates) the model afresh
                say(f"peak memory of {name} at batch {b}, {size} px, in a fresh process")
                detail[name].update(peak_memory("detrq.int8.workflow:build_model",
                                                {"config": {**config, "image_size": size}, "quantized": quantized},
                                                "detector", [b], size, threads=cfg.threads))
    return {"peak_memory_mb": {k: {b: v["peak_rss_mb"] for b, v in m.items()} for k, m in detail.items()},
            "peak_memory_image_size": {str(b): s for s, bs in groups.items() for b in bs},
            "peak_memory_detail": detail}


def run_int8(cfg: Int8RunConfig, progress: bool = False, reuse: bool = True) -> dict[str, Any]:
    """Quantize, measure, write the results JSON (and the figures if asked); returns the record.

    With ``reuse``, an existing results file with the same inputs (``cache_key``) and its figures are returned
    as they are instead of being recomputed (nbval re-runs the notebook this way in seconds).
    The onnxruntime backend adds an "onnx" section: float and int8 ONNX parts run in onnxruntime, their
    latency and their agreement with PyTorch. AP is measured for the trained model only: a stock model has
    random weights, so its float-vs-int8 comparison is the detection agreement and the activation maps.
    """
    if cfg.backend not in BACKENDS:
        raise DetrqError(f"unknown backend {cfg.backend!r}; use one of {', '.join(BACKENDS)}")
    torch.set_num_threads(cfg.threads)
    cfg = dataclasses.replace(cfg, **{k: str(resolve_path(getattr(cfg, k))) for k in _PATH_FIELDS
                                      if getattr(cfg, k) is not None})
    say = phase_printer(f"int8 {cfg.model} {cfg.backend}", progress)  # from the first phase past the input checks
    fm = float_model(cfg)
    model, trained = fm.model, fm.checkpoint_sha256 is not None
    out = cfg.out or str(results_file(PROJECT_ROOT / "results", f"int8_{fm.name}_{cfg.backend}.json"))
    key = _cache_key(cfg, fm.checkpoint_sha256)
    cached = load_cached(out, key) if reuse else None
    if cached is not None:
        figures = cached.get("activations", {}).get("figures", [])
        if cfg.figures is None or (figures and all((Path(cfg.figures) / f).is_file() for f in figures)):
            return cached
    plan = quantization_plan(model, cfg.parts)
    val = detection_dataset(cfg.data, "val", fm.image_size, max_images=cfg.eval_images)
    say(f"calibrating on {len(fm.calib)} images and converting to int8")
    t0 = time.perf_counter()
    qmodel = quantize_int8(model, fm.calib, cfg.backend, parts=plan.parts, compile=cfg.compile)
    quantize_s = time.perf_counter() - t0

    say(f"{'AP' if trained else 'detections'}, float then int8, on {len(val)} val images")
    if trained:
        ev_f = evaluate_detector(model, val, progress=progress)
        ev_q = evaluate_detector(qmodel, val, progress=progress)
        dets_f, dets_q = ev_f["detections"], ev_q["detections"]
        ap = {"AP_float": ev_f["metrics"]["AP"], "AP_int8": ev_q["metrics"]["AP"],
              "AP_loss_points": 100 * (ev_f["metrics"]["AP"] - ev_q["metrics"]["AP"]),
              "metrics_float": ev_f["metrics"], "metrics_int8": ev_q["metrics"]}
    else:
        dets_f, dets_q = run_detector(model, val, progress=progress), run_detector(qmodel, val, progress=progress)
        ap = {"AP_float": None, "AP_int8": None, "AP_loss_points": None,
              "AP_note": "random weights (torchvision's pretrained weights cannot be downloaded here): AP is "
                         "meaningless and not measured"}
    lat_images = [val[i][0] for i in range(cfg.latency_images)]
    say(f"paired latency: {cfg.latency_repeats} runs of float and int8 on {cfg.latency_images} images, then per stage")
    latency = paired_latency(lambda: [model([im]) for im in lat_images], lambda: [qmodel([im]) for im in lat_images],
                             repeats=cfg.latency_repeats)
    latency = {"float_s_per_image": latency["float_s"] / cfg.latency_images,
               "int8_s_per_image": latency["int8_s"] / cfg.latency_images,
               "ratio": latency["ratio"], "ratio_iqr": latency["ratio_iqr"], "repeats": latency["repeats"],
               "images_per_run": cfg.latency_images, "image_size": fm.image_size}
    bd_f, bd_q = (stage_breakdown(m, lat_images, cfg.breakdown_repeats) for m in (model, qmodel))
    memory = _peak_memory(cfg, fm.image_size, say)

    sizes = _size_report(model, qmodel)
    record = {
        "model": fm.name,
        "backend": cfg.backend,
        # onnxruntime's weights are 7-bit on a CPU without VNNI (onnx_quantize.needs_reduce_range)
        **({"reduce_range": needs_reduce_range(cpu_int8_isa())} if cfg.backend == "onnxruntime" else {}),
        "weights": "trained checkpoint" if trained else
                   f"random (seed {cfg.seed}), BN statistics recalibrated on the {cfg.calib_images} calibration images",
        "image_size": fm.image_size,
        "quantized_parts": list(plan.parts),
        "float_parts": "transform, anchors/box decoding/NMS of the RPN, RoIAlign, post-processing"
                       + "".join(f", {p}" for p in DETECTOR_PARTS if p not in plan.parts),
        **sizes,
        "latency_ratio": latency["ratio"],
        "latency": latency,
        **ap,
        "detection_error": detection_agreement(dets_f, dets_q, score_thr=cfg.agreement_score_thr),
        "breakdown": {"float": bd_f, "int8": bd_q, **compare_breakdowns(bd_f, bd_q, plan.parts)},
        "rois": {"float_per_image": bd_f["rois_per_image"], "int8_per_image": bd_q["rois_per_image"],
                 "policy": "not forced: the RPN's own output after NMS (torchvision's 1000 post-NMS proposals "
                           "at test time), measured on the latency images and recorded here"},
        **memory,
        "targets": {**TARGETS,
                    "size_met": sizes["size_reduction"] >= TARGETS["size_reduction_min"],
                    "latency_met": latency["ratio"] <= TARGETS["latency_ratio_max"],
                    "AP_met": ap["AP_loss_points"] <= TARGETS["AP_loss_points_max"] if trained else None},
        "quantize_s": quantize_s,
        "calibration": {"split": "train", "num_images": cfg.calib_images, "seed": cfg.calib_seed,
                        "image_ids": fm.calib_ids, "policy": "class_balanced_subset"},
        "checkpoint": Path(cfg.checkpoint).name if trained else None,
        "checkpoint_sha256": fm.checkpoint_sha256,
        "config": {k: repo_relative(v) if k in _PATH_FIELDS and v is not None else v for k, v in dataclasses.asdict(cfg).items()
                   if k not in _OUTPUT_FIELDS},
        "environment": {**environment(), **cpu_record()},  # latency depends on the CPU's int8 kernels
        "cache_key": key,
    }
    if cfg.figures is not None:
        say("float vs int8 activation figures")
        record["activations"] = activation_figures(model, qmodel, val[cfg.figure_image][0], dets_f, dets_q,
                                                   cfg.figures, "int8" if cfg.model == "narrow" else f"int8_{fm.name}")
    if cfg.backend == "onnxruntime":
        from detrq.int8.onnx_export import onnx_report

        say("onnxruntime: the parts as ONNX graphs, their latency and agreement")
        record["onnx"] = onnx_report(model, qmodel, lat_images, cfg.latency_repeats)
    write_json_atomic(out, record)
    say(f"done: {repo_relative(out)}")
    return record


def activation_figures(model: nn.Module, qmodel: nn.Module, image: Tensor, float_dets: Detections,
                       int8_dets: Detections, fig_dir: str | Path, prefix: str = "int8") -> dict[str, Any]:
    """The four layer figures for one image of an FX-quantized detector (``plots.layer_figures`` on the backbone
    and FPN, the last hexbin panel the detection scores); returns per-layer SQNR and the file names."""
    if not isinstance(qmodel.backbone, torch.fx.GraphModule) or not any(
            "quantized" in type(m).__module__ for m in qmodel.backbone.modules()):
        raise DetrqError("activation figures need an FX-quantized model (backend 'fx')")
    x = model.transform([image])[0].tensors
    return plots.layer_figures(model.backbone, qmodel.backbone, x, image, paired_scores(float_dets, int8_dets),
                               fig_dir, prefix)


def _ap_cell(r: dict[str, Any]) -> str:
    return "-" if r["AP_float"] is None else f"{r['AP_float']:.4f} / {r['AP_int8']:.4f}"


def int8_markdown(records: dict[str, dict[str, Any]]) -> str:
    """A markdown table of the runs (one row per run): size, paired latency, RoIs, peak memory, mAP, detection
    error. Peak-memory columns are those of the first run's batch sizes."""
    batches = list(next(iter(records.values()))["peak_memory_mb"]["float"])
    head = ("| run | px | size float / int8 (MB) | smaller | latency float / int8 (ms/img) | ratio [IQR] | RoIs/img "
            "| AP float / int8 | box rel. error | " + " | ".join(f"peak RSS b{b} f/i (MB)" for b in batches) + " |")
    rows = [head, "|" + "---|" * (9 + len(batches))]
    for label, r in records.items():
        lat, mem, err = r["latency"], r["peak_memory_mb"], r["detection_error"]["box_rel_error"]
        sizes = r["peak_memory_image_size"]
        iqr = lat["ratio_iqr"]
        err_cell = "-" if err["mean"] is None else f"{err['mean']:.2%} ± {err['std']:.2%}"
        rows.append(
            f"| {label} | {r['image_size']} | {r['size_bytes']['float'] / 1e6:.2f} / {r['size_bytes']['int8'] / 1e6:.2f} "
            f"| {r['size_reduction']:.1%} | {lat['float_s_per_image'] * 1e3:.1f} / {lat['int8_s_per_image'] * 1e3:.1f} "
            f"| {r['latency_ratio']:.2f} [{iqr[0]:.2f}-{iqr[1]:.2f}] | {r['rois']['float_per_image']:.0f} "
            f"| {_ap_cell(r)} | {err_cell} | "
            + " | ".join(f"{mem['float'][b]:.0f} / {mem['int8'][b]:.0f}"
                         + ("" if sizes[b] == r["image_size"] else f" ({sizes[b]} px)") for b in batches) + " |")
    return "\n".join(rows)


def breakdown_markdown(record: dict[str, Any]) -> str:
    """Per-stage ms per image, float and int8, with the ratio and the floor the float stages set."""
    bd = record["breakdown"]
    f, q = bd["float"]["s_per_image"], bd["int8"]["s_per_image"]
    rows = ["| stage | float (ms) | int8 (ms) | int8/float | output float / int8 (MB) |", "|---|---:|---:|---:|---:|"]
    for stage in f:
        ratio = bd["stage_ratio"][stage]
        out_f, out_q = bd["float"]["output_mb"].get(stage), bd["int8"]["output_mb"].get(stage)
        rows.append(f"| {stage}{'' if stage in bd['float_stages'] else ' (int8)'} | {f[stage] * 1e3:.1f} "
                    f"| {q[stage] * 1e3:.1f} | {'-' if ratio is None else f'{ratio:.2f}'} "
                    f"| {'-' if out_f is None else f'{out_f:.1f} / {out_q:.1f}'} |")
    rows.append(f"| total | {bd['float']['total_s_per_image'] * 1e3:.1f} | {bd['int8']['total_s_per_image'] * 1e3:.1f} "
                f"| {bd['ratio']:.2f} | |")
    return "\n".join(rows) + (f"\n\nThe stages left in float take {bd['ratio_floor']:.2f} of the float total in the "
                               "int8 model: the ratio cannot go below that however fast the int8 stages run.")


def int8_summary(records: dict[str, dict[str, Any]]) -> str:
    """Short, rounded lines of the machine-independent numbers (sizes, mAP): what nbval compares."""
    lines = []
    for label, r in records.items():
        ap = "" if r["AP_float"] is None else (f", AP {r['AP_float']:.3f} -> {r['AP_int8']:.3f} "
                                              f"(loss {r['AP_loss_points']:.1f} points)")
        lines.append(f"{label}: {r['size_reduction']:.1%} smaller{ap}, quantized {', '.join(r['quantized_parts'])}")
    return "\n".join(lines)
