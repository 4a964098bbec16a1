"""Benchmark: CPU latency, size and (optionally) peak memory of a Faster R-CNN, float vs int8, against the bars.

Prints measured ratios next to the targets (>= 74% smaller, <= 0.5x float latency); never asserts. ``--model``
is the trained narrow detector or a torchvision architecture with random weights (BN recalibrated, see
``detrq.int8.stock``). For each backend it quantizes the ``--parts`` on the default calibration set, then times
float and int8 alternately in this one process on single val images: the ratio is the median of the paired
int8/float ratios, with their interquartile range. ``--compile`` runs the pt2e int8 parts through
``torch.compile`` with frozen weights. ``--breakdown`` prints each stage's time per image, float and int8, the RoIs
per image and the floor that the stages left in float set on the ratio. ``--memory`` adds the peak RSS per batch
size, each in a fresh subprocess.

Run from the repository root (so that ``detrq`` is this checkout's):
  PYTHONPATH=. .venv/bin/python benchmarks/int8_latency.py --model fasterrcnn_resnet50_fpn --calib-images 8 \
      --images 2 --backends fx --breakdown
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from detrq.int8.data import detection_dataset
from detrq.int8.measure import paired_latency, peak_memory, serialized_size
from detrq.int8.plan import quantization_plan
from detrq.int8.quantize import quantize_int8
from detrq.int8.stages import compare_breakdowns, stage_breakdown
from detrq.int8.workflow import DEFAULT_DATA, TARGETS, Int8RunConfig, breakdown_markdown, float_model


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
    a = p.parse_args()
    torch.set_num_threads(a.threads)
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
