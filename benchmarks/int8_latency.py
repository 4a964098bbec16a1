"""Benchmark: CPU latency, size and (optionally) peak memory of a Faster R-CNN, float vs int8, against the bars.

Prints measured ratios next to the targets (>= 74% smaller, <= 0.5x float latency); never asserts. ``--model``
is the trained narrow detector or a torchvision architecture with random weights (BN recalibrated, see
``detrq.int8.stock``). For each backend it quantizes the ``--parts`` on the default calibration set, then times
float and int8 alternately in this one process on single val images: the ratio is the median of the paired
int8/float ratios, with their interquartile range. ``--compile`` runs the pt2e int8 parts through
``torch.compile`` with frozen weights. ``--breakdown`` prints each stage's time per image, float and int8, the RoIs
per image and the floor that the stages left in float set on the ratio. ``--memory`` adds the peak RSS per batch
size, each in a fresh subprocess.

``--onnx FILE...`` measures ONNX detectors instead (``detrq.int8.onnx_workflow``'s quantization, YOLO-style
preprocessing): file sizes against the >= 70% target of the YOLO-family model, the paired int8/float latency at batch
1 against <= 0.6, and, from onnxruntime's profile of the int8 model, the share of its time in int8 kernels, in
int8<->float conversions and in operators that stay float (the largest named): the reason where the ratio misses.
``--onnx-stock DIR`` first exports detrq's stock ONNX models (``detrq.int8.onnx_stock``: YOLOv8n, RetinaNet,
SSDlite; random weights, BN recalibrated) into DIR, where missing, and measures them.

Run from the repository root (so that ``detrq`` is this checkout's):
  PYTHONPATH=. .venv/bin/python benchmarks/int8_latency.py --model fasterrcnn_resnet50_fpn --calib-images 8 \
      --images 2 --backends fx --breakdown
  PYTHONPATH=. .venv/bin/python benchmarks/int8_latency.py --onnx-stock runs/onnx/models --images 4
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from pathlib import Path

from detrq.int8.data import detection_dataset
from detrq.int8.measure import paired_latency, peak_memory, serialized_size
from detrq.int8.plan import quantization_plan
from detrq.int8.quantize import quantize_int8
from detrq.int8.stages import compare_breakdowns, stage_breakdown
from detrq.int8.workflow import DEFAULT_DATA, TARGETS, Int8RunConfig, breakdown_markdown, float_model


ONNX_SIZE_TARGET, ONNX_LATENCY_TARGET = 0.70, 0.6


def onnx_benchmark(path: Path, images: int, repeats: int, calib_images: int, threads: int) -> None:
    """One ONNX file: sizes, paired latency at batch 1 and the int8 profile's split, printed against the targets."""
    import onnx

    from detrq.int8 import calibration as cal
    from detrq.int8.onnx_model import image_input, load_onnx, profile_ops, session
    from detrq.int8.onnx_quantize import needs_reduce_range, quantize_onnx
    from detrq.io.results import cpu_int8_isa
    from detrq.int8.onnx_workflow import OnnxRunConfig, image_sets, input_size, op_split

    cfg = OnnxRunConfig(onnx=str(path), coco=str(DEFAULT_DATA), calib_images=calib_images, eval_images=images)
    model = load_onnx(path)
    inp = image_input(model)
    h, w = input_size(inp, None)
    pp = cal.Preprocess(h, w, layout=inp.layout, dtype=inp.dtype)
    calib_set, eval_set = image_sets(cfg)
    batch = inp.batch or 8
    int8, kept = quantize_onnx(model, cal.batches(calib_set.paths, pp, batch, inp.batch is not None), inp.name,
                               reduce_range=needs_reduce_range(cpu_int8_isa()))
    lat_batch = inp.batch or 1
    xs = [cal.load_batch(eval_set.paths[i:i + lat_batch], pp)[0] for i in range(0, images, lat_batch)]
    sess_f, sess_q = session(model, threads), session(int8, threads)
    lat = paired_latency(lambda: [sess_f.run(None, {inp.name: x}) for x in xs],
                         lambda: [sess_q.run(None, {inp.name: x}) for x in xs], repeats=repeats, warmup=2)
    size = 1 - len(int8) / path.stat().st_size
    split = op_split(profile_ops(onnx.load_from_string(int8), {inp.name: xs[0]}, threads))
    n = len(xs) * lat_batch
    size_met = "met" if size >= ONNX_SIZE_TARGET else "missed"
    print(f"{path.stem} ({h}x{w} px, batch {lat_batch}): size {path.stat().st_size / 1e6:.2f} -> {len(int8) / 1e6:.2f} "
          f"MB, {size:.1%} smaller (target >= {ONNX_SIZE_TARGET:.0%}: {size_met})"
          f" | latency per image float {lat['float_s'] / n * 1e3:.1f} ms, int8 {lat['int8_s'] / n * 1e3:.1f} ms, "
          f"paired ratio {lat['ratio']:.3f} [IQR {lat['ratio_iqr'][0]:.3f}-{lat['ratio_iqr'][1]:.3f}] (target <= "
          f"{ONNX_LATENCY_TARGET}: {'met' if lat['ratio'] <= ONNX_LATENCY_TARGET else 'missed'})")
    top = ", ".join(f"{op} {share:.1%}" for op, share in list(split["float_ops"].items())[:6])
    print(f"  int8 time (onnxruntime profile): int8 kernels {split['int8_kernels_share']:.1%}, int8<->float "
          f"conversions {split['conversions_share']:.1%}, float operators {split['float_ops_share']:.1%} ({top}); "
          f"left float by the quantizer: {', '.join(f'{k} x{v}' for k, v in kept['float_ops'].items())}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="narrow", help="narrow or fasterrcnn_resnet50_fpn / _mobilenet_v3_large_fpn")
    p.add_argument("--backends", nargs="+", default=["fx", "pt2e", "onnxruntime"])
    p.add_argument("--parts", nargs="+", help="detector parts to quantize (default: all)")
    p.add_argument("--image-size", type=int, help="default: the model's evaluation size")
    p.add_argument("--calib-images", type=int, default=32)
    p.add_argument("--images", type=int, default=4, help="val images per timed run, one at a time")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="torch.compile the pt2e int8 parts")
    p.add_argument("--memory", action="store_true", help="peak RSS at batch sizes 1, 2, 4")
    p.add_argument("--breakdown", action="store_true", help="per-stage time per image, float vs int8")
    p.add_argument("--onnx", nargs="+", type=Path, help="ONNX detectors to measure instead of a Faster R-CNN")
    p.add_argument("--onnx-stock", type=Path, metavar="DIR",
                   help="export detrq's stock ONNX detectors into DIR (where missing) and measure them")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.onnx or a.onnx_stock:
        from detrq.int8.onnx_stock import ONNX_STOCK, export_stock

        files = list(a.onnx or [])
        for name in ONNX_STOCK if a.onnx_stock else ():
            path = a.onnx_stock / f"{name}.onnx"
            files.append(path if path.is_file() else export_stock(name, path, DEFAULT_DATA))
        print(f"ONNX, {a.threads} thread(s), {a.images} val images per timed run; targets: YOLO-family >= "
              f"{ONNX_SIZE_TARGET:.0%} smaller, latency ratio <= {ONNX_LATENCY_TARGET}")
        for path in files:
            onnx_benchmark(path, a.images, a.repeats, a.calib_images, a.threads)
        return
    cfg = Int8RunConfig(model=a.model, parts=tuple(a.parts) if a.parts else None, image_size=a.image_size,
                        calib_images=a.calib_images, threads=a.threads)
    fm = float_model(cfg)
    images = [detection_dataset(DEFAULT_DATA, "val", fm.image_size)[i][0] for i in range(a.images)]
    print(f"{fm.name} at {fm.image_size} px; targets: size reduction >= {TARGETS['size_reduction_min']:.0%}, "
          f"latency ratio <= {TARGETS['latency_ratio_max']}; {a.threads} thread(s)")
    for backend in a.backends:
        compile = a.compile and backend == "pt2e"
        qmodel = quantize_int8(fm.model, fm.calib, backend, parts=cfg.parts, compile=compile)
        lat = paired_latency(lambda: [fm.model([im]) for im in images], lambda: [qmodel([im]) for im in images],
                             repeats=a.repeats, warmup=2)
        size = 1 - serialized_size(qmodel) / serialized_size(fm.model)
        print(f"{backend:12s} size {size:.1%} smaller | latency per image float {lat['float_s'] / a.images * 1e3:.1f} "
              f"ms, int8 {lat['int8_s'] / a.images * 1e3:.1f} ms, paired ratio {lat['ratio']:.3f} "
              f"[IQR {lat['ratio_iqr'][0]:.3f}-{lat['ratio_iqr'][1]:.3f}, {lat['repeats']} pairs]")
        if a.breakdown:
            bd_f, bd_q = stage_breakdown(fm.model, images), stage_breakdown(qmodel, images)
            parts = quantization_plan(fm.model, cfg.parts).parts
            record = {"breakdown": {"float": bd_f, "int8": bd_q, **compare_breakdowns(bd_f, bd_q, parts)}}
            print(f"  RoIs per image: float {bd_f['rois_per_image']:.0f}, int8 {bd_q['rois_per_image']:.0f}")
            print("  " + breakdown_markdown(record).replace("\n", "\n  "))
        if a.memory:
            config = dataclasses.asdict(dataclasses.replace(cfg, backend=backend, compile=compile))
            for name, quantized in (("float", False), ("int8", True)):
                mem = peak_memory("detrq.int8.workflow:build_model", {"config": config, "quantized": quantized},
                                  "detector", (1, 2, 4), fm.image_size, threads=a.threads)
                print(f"  peak RSS MB {name:5s} " + " ".join(f"b{k}:{v['peak_rss_mb']:.0f}" for k, v in mem.items()))


if __name__ == "__main__":
    main()
