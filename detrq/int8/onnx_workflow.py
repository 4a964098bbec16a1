"""The INT8 run of a user's ONNX detector behind ``python -m detrq int8 --onnx model.onnx``.

``run_onnx_int8`` checks the file and its image input, calibrates ``onnx_quantize.quantize_onnx`` on images of a
COCO-format split or a folder (``calibration``), and measures float against int8 in onnxruntime: file sizes,
paired latency with its IQR, onnxruntime's per-operator profile (which operators stay float and their share of the
time), peak RSS per batch size in fresh processes (batch 1 only where the batch dimension is fixed), per-conv-layer
float-vs-int8 maps from onnxruntime's intermediate outputs (``onnx_layers``; the same plots as the PyTorch path), and the agreement
of the outputs: detections and COCO AP where the outputs decode (``yolo_decode``), else the raw outputs only. The
results file and the int8 ONNX file are written only once everything has run, each atomically: a failed run leaves
earlier results as they were.

Notebook 06's ONNX section runs ``onnx_stock``'s models, kept in ``stock_onnx_dir``, through ``run_stock_onnx_int8``
(a cache hit on the results file and figures alone, as on a fresh clone without the gitignored .onnx files; else
export and ``run_onnx_int8``) and renders ``onnx_markdown`` and ``onnx_summary``.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from detrq.evaluation.evaluate import coco_metrics
from detrq.int8 import calibration as cal
from detrq.int8.detect import coco_detections, detection_agreement, paired_scores
from detrq.int8.measure import paired_latency, peak_memory, phase_printer
from detrq.int8.onnx_layers import layer_diffs, sqnr_db
from detrq.int8.onnx_model import ImageInput, image_input, load_onnx, profile_ops, run, session
from detrq.int8.onnx_quantize import needs_reduce_range, quantize_onnx, quantized_fraction
from detrq.int8.plots import draw_layer_figures
from detrq.int8.yolo_decode import decode_yolo, yolo_classes
from detrq.io.cache import cache_key, load_cached
from detrq.io.errors import DetrqError
from detrq.io.layout import results_file
from detrq.io.paths import PROJECT_ROOT, repo_relative, resolve_path
from detrq.io.results import (atomic_output, cpu_int8_isa, cpu_record, environment, read_json, sha256_file,
                               write_json_atomic)

_PATH_FIELDS = ("onnx", "coco", "images", "figures", "out", "int8_out")
DEFAULT_SIZE = 640  # input size where the model leaves it dynamic: the common YOLO export's
# onnxruntime kernels that compute in int8 (after its QDQ fusion), and the conversions between int8 and float
INT8_KERNELS = ("QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm", "QLinearAdd", "QLinearMul",
                "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearGlobalAveragePool", "QLinearAveragePool",
                "QLinearSoftmax", "MatMulIntegerToFloat", "DynamicQuantizeMatMul")
CONVERSIONS = ("QuantizeLinear", "DequantizeLinear")


@dataclass
class OnnxRunConfig:
    """Inputs of one ONNX INT8 run; stored in its results file."""

    onnx: str
    coco: str | None = None  # COCO-format root: calibration on `split`, agreement and AP on `eval_split`
    split: str = "train"
    eval_split: str = "val"
    images: str | None = None  # or a folder of images: calibration and agreement (no AP) on its images
    calib_images: int = 32  # class-balanced (COCO, seeded) or the first by file name (folder)
    calib_seed: int = 0
    eval_images: int = 50  # first by image id (COCO) or by file name (folder)
    input_size: tuple[int, int] | None = None  # (height, width); None: the declared size, else DEFAULT_SIZE
    resize: str = "letterbox"
    channels: str = "RGB"
    layout: str | None = None  # None: from the input's shape
    scale: float = 1 / 255
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    pad_value: int = 114
    batch: int = 8  # images per calibration / evaluation batch where the batch dimension is dynamic
    agreement_score_thr: float = 0.25  # decoded detections compared float vs int8 score at least this
    latency_images: int = 4  # one timed run = these images at batch 1 (the fixed batch where there is one)
    latency_repeats: int = 7
    profile_runs: int = 3
    batch_sizes: tuple[int, ...] = (1, 2, 4, 32, 64)
    threads: int = 1
    figures: str | None = None  # directory for the layer figures; None = numbers only
    figure_image: int = 0  # index in the evaluation images of the one the layer maps show
    out: str | None = None  # default results/int8/int8_<stem>_onnx.json
    int8_out: str | None = None  # the int8 ONNX file; default <model>_int8.onnx beside the model


def input_size(inp: ImageInput, asked: tuple[int, int] | None) -> tuple[int, int]:
    """(height, width) of the model input: ``asked`` where the declared dimensions allow it, else the declared
    ones, with ``DEFAULT_SIZE`` for a dynamic one."""
    declared = (inp.height, inp.width)
    if asked is not None:
        clash = [f"{a} for a declared {d}" for a, d in zip(asked, declared) if d is not None and a != d]
        if clash:
            raise DetrqError(f"input size {asked[0]}x{asked[1]} does not fit input {inp.name!r}, declared "
                             f"{inp.height}x{inp.width} ({', '.join(clash)}); leave --input-size out")
        return asked
    return inp.height or DEFAULT_SIZE, inp.width or DEFAULT_SIZE


def image_sets(cfg: OnnxRunConfig) -> tuple[cal.ImageSet, cal.ImageSet]:
    """The calibration and the evaluation images of a run."""
    if (cfg.coco is None) == (cfg.images is None):
        raise DetrqError("pass the calibration images with --coco DIR (a COCO-format root) or --images DIR, "
                         "one of them")
    if cfg.calib_images < 1:
        raise DetrqError(f"the calibration set is empty (calib_images={cfg.calib_images}); pass at least 1")
    if cfg.coco is not None:
        return (cal.coco_images(cfg.coco, cfg.split, cfg.calib_images, balanced_seed=cfg.calib_seed),
                cal.coco_images(cfg.coco, cfg.eval_split, cfg.eval_images))
    return cal.folder_images(cfg.images, cfg.calib_images), cal.folder_images(cfg.images, cfg.eval_images)


def _chunks(n: int, batch: int, fixed: bool) -> list[range]:
    stop = n - n % batch if fixed else n
    return [range(i, min(i + batch, stop)) for i in range(0, stop, batch)]


def _outputs(sess, name: str, images: cal.ImageSet, pp: cal.Preprocess, batch: int, fixed: bool
             ) -> tuple[list[np.ndarray], list[cal.Placement]]:
    """Every output of the model over ``images``, concatenated along the batch, and each image's placement."""
    parts, placements = [], []
    for idx in _chunks(len(images), batch, fixed):
        x, pl = cal.load_batch([images.paths[i] for i in idx], pp)
        parts.append(run(sess, {name: x}))
        placements += pl
    if not parts:
        raise DetrqError(f"the model's batch is fixed at {batch}; pass at least {batch} evaluation images")
    return [np.concatenate(o) for o in zip(*parts)], placements


def raw_agreement(names: list[str], f: list[np.ndarray], q: list[np.ndarray]) -> dict[str, dict[str, float]]:
    """Per output: SQNR (dB), max |float - int8| and the relative L2 error ||int8 - float|| / ||float||."""
    out = {}
    for name, a, b in zip(names, f, q):
        norm = float(np.linalg.norm(a.astype(np.float64)))
        out[name] = {"shape": list(a.shape), "sqnr_db": sqnr_db(a, b), "max_abs_diff": float(np.abs(a - b).max()),
                     "rel_l2_error": float(np.linalg.norm((b - a).astype(np.float64)) / norm) if norm else None}
    return out


def op_split(profile: dict[str, Any]) -> dict[str, Any]:
    """The int8 model's operator time split into int8 kernels, int8<->float conversions and float operators."""
    share = profile["share"]
    groups = {"int8_kernels": [o for o in share if o in INT8_KERNELS],
              "conversions": [o for o in share if o in CONVERSIONS]}
    groups["float_ops"] = [o for o in share if o not in INT8_KERNELS and o not in CONVERSIONS]
    return {f"{k}_share": sum(share[o] for o in ops) for k, ops in groups.items()} | {
        "float_ops": {o: share[o] for o in groups["float_ops"]}}


def _cache_key(cfg: OnnxRunConfig, model_sha: str, annotations: Path | None) -> str:
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _PATH_FIELDS}
    return cache_key(settings=settings, onnx=model_sha,
                     val=sha256_file(annotations) if annotations is not None and annotations.is_file() else None)


def _located(cfg: OnnxRunConfig) -> tuple[OnnxRunConfig, Path, Path, Path, Path | None]:
    """``cfg`` with its paths resolved from the repository root (``resolve_path``), the float model, the results
    file, the int8 model and the evaluation annotations (None without COCO)."""
    cfg = dataclasses.replace(cfg, **{k: str(resolve_path(getattr(cfg, k))) for k in _PATH_FIELDS
                                      if getattr(cfg, k) is not None})
    src = Path(cfg.onnx)
    out = Path(cfg.out) if cfg.out else results_file(PROJECT_ROOT / "results", f"int8_{src.stem}_onnx.json")
    int8_path = Path(cfg.int8_out) if cfg.int8_out else src.with_name(f"{src.stem}_int8.onnx")
    annotations = Path(cfg.coco) / "annotations" / f"instances_{cfg.eval_split}.json" if cfg.coco else None
    return cfg, src, out, int8_path, annotations


def cached_onnx_record(cfg: OnnxRunConfig, require_model: bool = True) -> dict[str, Any] | None:
    """The results file of ``cfg`` if it was made with the same settings, calibration/evaluation annotations and
    float model, and holds the figures where ``cfg.figures`` asks for them; else None.

    ``require_model`` (the CLI): the float and the int8 ONNX files must be there, and the float file's SHA-256 is
    the model's. Without it (the notebook): neither file is needed, since a fresh clone has the committed results
    and figures but not the gitignored .onnx files; where the float file is absent, the model is the one the results
    file records (``onnx_sha256``): the stock models are named, and the bytes of a re-export do not decide, since they
    depend on the thread count (BN statistics summed in another order) and may on the CPU."""
    cfg, src, out, int8_path, annotations = _located(cfg)
    if src.is_file():
        model_sha = sha256_file(src)
    elif require_model or not out.is_file():
        return None
    else:
        try:
            model_sha = read_json(out).get("onnx_sha256")
        except (DetrqError, AttributeError):
            return None
    cached = load_cached(out, _cache_key(cfg, model_sha, annotations))
    if cached is None or (require_model and not int8_path.is_file()):
        return None
    if cfg.figures is not None and not all((Path(cfg.figures) / f).is_file() for f in cached["activations"]["figures"]):
        return None
    return cached


def run_onnx_int8(cfg: OnnxRunConfig, reuse: bool = True, require_model: bool = True, progress: bool = False
                  ) -> dict[str, Any]:
    """Quantize the ONNX file ``cfg.onnx``, measure, write the results JSON, the int8 ONNX file and (if asked) the
    figures; returns the record. With ``reuse``, a results file with the same inputs (and the figures, if asked) is
    returned as it is (``cached_onnx_record``): where the int8 ONNX file is there too, or, if ``require_model`` is
    False, with no .onnx file needed at all. Relative paths are from the repository root (``resolve_path``), as in
    the notebook. ``progress`` prints a line to stderr as each phase starts."""
    cached = cached_onnx_record(cfg, require_model) if reuse else None
    if cached is not None:
        return cached
    cfg, src, out, int8_path, annotations = _located(cfg)
    say = phase_printer(f"int8 {src.stem} onnx", progress)  # from the first phase past the input checks
    model = load_onnx(src)
    inp = image_input(model, cfg.layout)
    stem = src.stem
    model_sha = sha256_file(src)
    key = _cache_key(cfg, model_sha, annotations)
    if cfg.latency_images < 1:
        raise DetrqError(f"latency_images must be at least 1, got {cfg.latency_images}")
    torch.set_num_threads(cfg.threads)
    h, w = input_size(inp, cfg.input_size)
    pp = cal.Preprocess(h, w, cfg.resize, cfg.channels, inp.layout, cfg.scale, tuple(cfg.mean), tuple(cfg.std),
                        cfg.pad_value, inp.dtype)
    calib_set, eval_set = image_sets(cfg)
    fixed = not inp.dynamic_batch
    batch = inp.batch if fixed else cfg.batch
    calib = cal.batches(calib_set.paths, pp, batch, fixed)
    sess_f = session(model, cfg.threads)
    run(sess_f, {inp.name: calib[0]})  # a model onnxruntime cannot run fails here, before calibrating
    say(f"onnxruntime's static quantization, calibrated on {len(calib_set.paths)} images")
    reduce_range = needs_reduce_range(cpu_int8_isa())
    int8_bytes, float_part = quantize_onnx(model, calib, inp.name, reduce_range=reduce_range)
    int8_model = onnx.load_from_string(int8_bytes)
    sess_q = session(int8_bytes, cfg.threads)
    out_names = [o.name for o in sess_f.get_outputs()]

    say(f"float and int8 outputs on {len(eval_set)} images")
    f_outs, placements = _outputs(sess_f, inp.name, eval_set, pp, batch, fixed)
    q_outs, _ = _outputs(sess_q, inp.name, eval_set, pp, batch, fixed)
    agreement, dets = _agreement(cfg, out_names, f_outs, q_outs, placements, eval_set)

    say(f"paired latency ({cfg.latency_repeats} runs), operator profiles, per-layer maps")
    lat_batch = batch if fixed else 1
    lat_x = [cal.load_batch(eval_set.paths[i:i + lat_batch], pp)[0]
             for i in range(0, min(cfg.latency_images, len(eval_set) // lat_batch * lat_batch), lat_batch)]
    lat = paired_latency(lambda: [sess_f.run(None, {inp.name: x}) for x in lat_x],
                         lambda: [sess_q.run(None, {inp.name: x}) for x in lat_x], repeats=cfg.latency_repeats,
                         warmup=2)
    n_lat = len(lat_x) * lat_batch
    prof_f = profile_ops(model, {inp.name: lat_x[0]}, cfg.threads, cfg.profile_runs)
    prof_q = profile_ops(int8_model, {inp.name: lat_x[0]}, cfg.threads, cfg.profile_runs)

    fig_index = min(cfg.figure_image, len(eval_set) - 1)
    x_fig, _ = cal.load_batch([eval_set.paths[fig_index]], pp)
    diffs, end_to_end = layer_diffs(model, int8_model, x_fig, cfg.threads)
    shown = dataclasses.replace(pp, channels="RGB", layout="NCHW", scale=1 / 255, mean=(0.0,) * 3, std=(1.0,) * 3,
                                dtype="float32")
    picture = torch.from_numpy(cal.load_batch([eval_set.paths[fig_index]], shown)[0][0])
    with tempfile.TemporaryDirectory() as tmp:
        tmp_int8 = Path(tmp) / "int8.onnx"
        tmp_int8.write_bytes(int8_bytes)
        say("peak memory, a fresh process per batch size")
        memory = _peak_memory(cfg, src, tmp_int8, inp, (h, w))
        record = {
            "model": stem,
            "backend": "onnx",
            "source": "ONNX file, quantized by onnxruntime quantize_static (QDQ, per-channel int8 weights, "
                      "uint8 activations, MinMax calibration)",
            "reduce_range": reduce_range,  # 7-bit weights: this CPU has AVX2 without VNNI (onnx_quantize)
            "onnx_file": repo_relative(src.resolve()),
            "onnx_sha256": model_sha,
            "weights": "as in the ONNX file (onnx_sha256)",
            "checkpoint_sha256": None,
            "input": {**dataclasses.asdict(inp), "preprocess": dataclasses.asdict(pp)},
            "image_size": h if h == w else f"{h}x{w}",
            "quantized_parts": [_quantized_parts(int8_model)],
            "float_parts": float_part["float_ops"],
            "float_nodes": float_part["float_nodes"],
            "size_bytes": {"float": src.stat().st_size, "int8": len(int8_bytes)},
            "size_ratio": len(int8_bytes) / src.stat().st_size,
            "size_reduction": 1 - len(int8_bytes) / src.stat().st_size,
            "latency_ratio": lat["ratio"],
            "latency": {"float_s_per_image": lat["float_s"] / n_lat, "int8_s_per_image": lat["int8_s"] / n_lat,
                        "ratio": lat["ratio"], "ratio_iqr": lat["ratio_iqr"], "repeats": lat["repeats"],
                        "images_per_run": n_lat, "batch": lat_batch},
            "profile": {"float": prof_f, "int8": prof_q, "int8_split": op_split(prof_q)},
            **agreement,
            **memory,
            "activations": draw_layer_figures(diffs, picture, _hexbin_scores(dets, fig_index, f_outs, q_outs),
                                              cfg.figures, f"int8_{stem}_onnx",
                                              scores_label="detection scores" if dets else out_names[0]),
            "calibration": {**calib_set.source, "ids": calib_set.ids, "batch": batch},
            "evaluation": eval_set.source,
            "config": {k: repo_relative(Path(v).resolve()) if k in ("onnx", "coco", "images") and v else v
                       for k, v in dataclasses.asdict(cfg).items() if k not in ("figures", "out", "int8_out")},
            "environment": {**environment(), **cpu_record()},
            "cache_key": key,
        }
        record["activations"]["sqnr_db_end_to_end"] = end_to_end
    with atomic_output(int8_path) as tmp:
        tmp.write_bytes(int8_bytes)
    write_json_atomic(out, record)
    say(f"done: {repo_relative(out)}")
    return record


def stock_onnx_dir(results_dir: str | Path) -> Path:
    """Where notebook 06 keeps the stock ONNX models and their int8 files: ``onnx_models/`` beside ``results_dir``
    (``runs/<run>/onnx_models`` for ``runs/<run>/results``; ``runs/onnx_models`` where ``results_dir`` sits at the
    repository's top level), so that the .onnx files never enter the committed ``results/``."""
    results = resolve_path(results_dir).resolve()
    return (PROJECT_ROOT / "runs" if results.parent == PROJECT_ROOT.resolve() else results.parent) / "onnx_models"


def run_stock_onnx_int8(name: str, cfg: OnnxRunConfig, reuse: bool = True, progress: bool = False
                        ) -> dict[str, Any]:
    """Notebook 06's run of ``onnx_stock``'s model ``name`` held at ``cfg.onnx``: the results file with the same
    settings and its figures are reused with no .onnx file needed (``cached_onnx_record(require_model=False)``);
    otherwise the model is exported to ``cfg.onnx`` where it is absent (``export_stock``, with ``cfg.threads`` torch
    threads, BN recalibrated on ``cfg.coco``'s train images), then quantized and measured (``run_onnx_int8``)."""
    cached = cached_onnx_record(cfg, require_model=False) if reuse else None
    if cached is not None:
        return cached
    path = resolve_path(cfg.onnx)
    if not path.is_file():
        from detrq.int8.onnx_stock import export_stock  # torchvision's detection models: imported only here

        if cfg.coco is None:
            raise DetrqError(f"exporting the stock model {name!r} needs a COCO-format root (coco=) for its BN "
                             "recalibration")
        phase_printer(f"int8 {name} onnx", progress)("exporting it from torchvision, BN statistics recalibrated")
        torch.set_num_threads(cfg.threads)  # the exported bytes depend on it (the BN statistics' float sums)
        export_stock(name, path, cfg.coco)
    return run_onnx_int8(cfg, reuse, require_model=False, progress=progress)


def _quantized_parts(int8_model: onnx.ModelProto) -> str:
    q = quantized_fraction(int8_model)
    return f"{q['int8_weights']} of {q['learned_layers']} Conv/Gemm/MatMul layers"


def _agreement(cfg: OnnxRunConfig, names: list[str], f_outs: list[np.ndarray], q_outs: list[np.ndarray],
               placements: list[cal.Placement], images: cal.ImageSet) -> tuple[dict[str, Any], dict | None]:
    """The agreement record and the float and int8 detections (None where the outputs do not decode).

    Raw-output agreement always; decoded detections' agreement where the model has one YOLO-style output, and
    COCO AP where, besides, the images have COCO ground truth with as many categories as the model has classes."""
    result: dict[str, Any] = {"raw_agreement": raw_agreement(names, f_outs, q_outs), "num_eval_images": len(f_outs[0])}
    classes = yolo_classes(f_outs[0].shape) if len(names) == 1 else None
    if classes is None:
        shapes = ", ".join(f"{n} {list(o.shape)}" for n, o in zip(names, f_outs))
        return {**result, "decoded": False, "AP_float": None, "AP_int8": None, "AP_loss_points": None,
                "detection_error": None,
                "AP_note": f"outputs {shapes} are not one [batch, 4 + classes, anchors] tensor: raw-output "
                           "agreement only, no detections and no AP"}, None
    cat_ids = sorted(images.coco.getCatIds()) if images.coco is not None else []
    class_ids = cat_ids if len(cat_ids) == classes else list(range(classes))
    dets_f = decode_yolo(f_outs[0], placements, class_ids)
    dets_q = decode_yolo(q_outs[0], placements, class_ids)
    dets = {"float": dets_f, "int8": dets_q}
    result.update(decoded=True, detection_error=detection_agreement(dets_f, dets_q, score_thr=cfg.agreement_score_thr),
                  decoder="[batch, 4 + classes, anchors], conf > 0.001, class-wise NMS IoU 0.7, 300 per image")
    if len(cat_ids) != classes:
        why = "no COCO ground truth (a folder of images)" if images.coco is None else \
            f"the model has {classes} classes and the dataset {len(cat_ids)} categories"
        return {**result, "AP_float": None, "AP_int8": None, "AP_loss_points": None, "AP_note": f"no AP: {why}"}, dets
    ids = images.ids[:len(dets_f)]
    m_f = coco_metrics(images.coco, coco_detections(images, dets_f), ids)
    m_q = coco_metrics(images.coco, coco_detections(images, dets_q), ids)
    return {**result, "AP_float": m_f["AP"], "AP_int8": m_q["AP"], "AP_loss_points": 100 * (m_f["AP"] - m_q["AP"]),
            "metrics_float": m_f, "metrics_int8": m_q}, dets


def _hexbin_scores(dets: dict | None, index: int, f_outs: list[np.ndarray], q_outs: list[np.ndarray]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The last hexbin panel: matched detection scores of the figure's image, or its first raw output."""
    if dets is not None:
        return paired_scores(dets["float"][index:index + 1], dets["int8"][index:index + 1])
    return f_outs[0][index].ravel(), q_outs[0][index].ravel()


def _peak_memory(cfg: OnnxRunConfig, float_path: Path, int8_path: Path, inp: ImageInput, size: tuple[int, int]
                 ) -> dict[str, Any]:
    """Peak RSS of float and int8 sessions per batch size, each in a fresh process (batch 1 only, or the fixed
    batch, where the model's batch dimension is fixed)."""
    sizes = cfg.batch_sizes if inp.dynamic_batch else (inp.batch,)
    common = {"layout": inp.layout, "scale": cfg.scale, "mean": list(cfg.mean), "std": list(cfg.std),
              "dtype": inp.dtype, "threads": cfg.threads}
    detail = {name: peak_memory("detrq.int8.onnx_model:memory_model", {"path": str(path), **common}, "classifier",
                                sizes, size, threads=cfg.threads)
              for name, path in (("float", float_path), ("int8", int8_path))}
    note = None if inp.dynamic_batch else (f"the model's batch dimension is fixed at {inp.batch}: peak memory "
                                           f"measured at that batch only")
    return {"peak_memory_mb": {k: {b: v["peak_rss_mb"] for b, v in m.items()} for k, m in detail.items()},
            "peak_memory_detail": detail, "peak_memory_note": note, "dynamic_batch": inp.dynamic_batch}


def _agreement_cell(r: dict[str, Any]) -> str:
    if r["decoded"]:
        e = r["detection_error"]
        return f"detections: {e['mismatch']['mean']:.0%} unmatched, box error {e['box_rel_error']['mean'] or 0:.1%}"
    return "raw: " + ", ".join(f"{n} {a['sqnr_db']:.0f} dB" for n, a in r["raw_agreement"].items())


def onnx_markdown(records: dict[str, dict[str, Any]]) -> str:
    """A markdown table of ONNX runs: sizes, paired latency, the float operators' share of the int8 time, AP (or
    why not), output agreement, median per-layer SQNR and peak RSS per batch size."""
    rows = ["| run | px | batch | size float / int8 (MB) | smaller | latency float / int8 (ms/img) | ratio [IQR] "
            "| float ops in int8 time | AP float / int8 | agreement | layer SQNR median (dB) | peak RSS f/i (MB) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in records.items():
        lat, mem = r["latency"], r["peak_memory_mb"]
        ap = "-" if r["AP_float"] is None else f"{100 * r['AP_float']:.1f} / {100 * r['AP_int8']:.1f}"
        rows.append(
            f"| {label} | {r['image_size']} | {'dynamic' if r['dynamic_batch'] else r['input']['batch']} "
            f"| {r['size_bytes']['float'] / 1e6:.2f} / {r['size_bytes']['int8'] / 1e6:.2f} | {r['size_reduction']:.1%} "
            f"| {lat['float_s_per_image'] * 1e3:.1f} / {lat['int8_s_per_image'] * 1e3:.1f} "
            f"| {r['latency_ratio']:.2f} [{lat['ratio_iqr'][0]:.2f}-{lat['ratio_iqr'][1]:.2f}] "
            f"| {r['profile']['int8_split']['float_ops_share']:.0%} | {ap} | {_agreement_cell(r)} "
            f"| {r['activations']['median_sqnr_db']:.1f} | "
            + ", ".join(f"b{b} {mem['float'][b]:.0f} / {mem['int8'][b]:.0f}" for b in mem["float"]) + " |")
    return "\n".join(rows)


def onnx_summary(records: dict[str, dict[str, Any]]) -> str:
    """Short, rounded lines of the machine-independent numbers (sizes, what stays float): what nbval compares."""
    return "\n".join(f"{label}: {r['size_reduction']:.1%} smaller, {r['quantized_parts'][0]}, "
                     f"{'decoded' if r['decoded'] else 'raw outputs'}" for label, r in records.items())
