"""Benchmark: CPU latency, size and (optionally) peak memory of the embedded Faster R-CNN, float vs int8.

Prints measured ratios next to the targets (>= 74% smaller, <= 0.5x float latency); never asserts. For each
backend it quantizes the committed checkpoint on the default calibration set, then times float and int8
alternately in this one process on single val images (median of --repeats paired runs). ``--compile`` runs
the pt2e model's int8 parts through ``torch.compile`` with frozen weights (inductor lowers PT2E's
quantize/dequantize patterns to int8 kernels; eager pt2e executes them as float reference ops). ``--memory`` adds the peak RSS per batch size,
each in a fresh subprocess. ``--breakdown`` prints each stage's share of the float and the int8 time per image
(the float stages bound how far the int8 ratio can go).

Run: nice -n 19 .venv/bin/python benchmarks/int8_latency.py [--backends fx pt2e onnxruntime] [--memory]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch import nn

from detrq.int8.data import detection_dataset
from detrq.int8.measure import paired_latency, peak_memory, serialized_size
from detrq.int8.workflow import DEFAULT_CHECKPOINT, DEFAULT_DATA, TARGETS, build_model


STAGES = ("transform", "backbone", "rpn", "roi_heads.box_roi_pool", "roi_heads.box_head", "roi_heads.box_predictor",
          "roi_heads")


def stage_times(model: nn.Module, images: list, repeats: int) -> dict[str, float]:
    """Seconds per image spent in each stage (``roi_heads`` includes its sub-stages and the post-processing)."""
    totals: dict[str, float] = defaultdict(float)
    originals = {}
    for name in STAGES:
        mod = model.get_submodule(name)
        originals[name] = mod.forward

        def timed(*args, _f=mod.forward, _n=name, **kwargs):
            t0 = time.perf_counter()
            out = _f(*args, **kwargs)
            totals[_n] += time.perf_counter() - t0
            return out

        mod.forward = timed
    try:
        with torch.no_grad():
            [model([im]) for im in images]  # warm-up
            totals.clear()
            t0 = time.perf_counter()
            for _ in range(repeats):
                [model([im]) for im in images]
            totals["total"] = time.perf_counter() - t0
    finally:
        for name, f in originals.items():
            model.get_submodule(name).forward = f
    return {k: v / (repeats * len(images)) for k, v in totals.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", nargs="+", default=["fx", "pt2e", "onnxruntime"])
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--images", type=int, default=4, help="val images per timed run, one at a time")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="torch.compile the pt2e int8 parts")
    p.add_argument("--memory", action="store_true", help="peak RSS at batch sizes 1, 2, 4, 32, 64")
    p.add_argument("--breakdown", action="store_true", help="per-stage time per image, float vs int8")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = build_model(a.checkpoint)
    images = [detection_dataset(DEFAULT_DATA, "val", 128)[i][0] for i in range(a.images)]
    print(f"targets: size reduction >= {TARGETS['size_reduction_min']:.0%}, "
          f"latency ratio <= {TARGETS['latency_ratio_max']}; {a.threads} thread(s)")
    for backend in a.backends:
        qmodel = build_model(a.checkpoint, backend, compile=a.compile and backend == "pt2e")
        lat = paired_latency(lambda: [model([im]) for im in images], lambda: [qmodel([im]) for im in images],
                             repeats=a.repeats, warmup=2)
        size = 1 - serialized_size(qmodel) / serialized_size(model)
        print(f"{backend:12s} size {size:.1%} smaller | latency per image float {lat['float_s'] / a.images * 1e3:.1f} "
              f"ms, int8 {lat['int8_s'] / a.images * 1e3:.1f} ms, paired ratio {lat['ratio']:.3f}")
        if a.breakdown:
            f, q = stage_times(model, images, a.repeats), stage_times(qmodel, images, a.repeats)
            print("  ms per image  " + "  ".join(f"{k}: {f[k] * 1e3:.1f} -> {q[k] * 1e3:.1f}" for k in ("total",) + STAGES))
        if a.memory:
            kwargs = {"checkpoint": a.checkpoint, "compile": a.compile and backend == "pt2e"}
            for name, b in (("float", None), ("int8", backend)):
                mem = peak_memory("detrq.int8.workflow:build_model", {**kwargs, "backend": b}, "detector",
                                  (1, 2, 4, 32, 64), 128, threads=a.threads)
                print(f"  peak RSS MB {name:5s} " + " ".join(f"b{k}:{v['peak_rss_mb']:.0f}" for k, v in mem.items()))


if __name__ == "__main__":
    main()
