"""Benchmark: one evaluation of the embedded default, split into the model and pycocotools, and the per-image
matching (``COCOeval.evaluate``) stock against its exact vectorised form ``detrq.evaluation.fast_match``.

Evaluates the committed mini checkpoint on the synthetic val split (generated beforehand) on one thread, then
times ``evaluate()`` of both matchers on those detections, with every area range (``coco_metrics``) and with
``restrict_to_ap`` (an AP alone: the AP scan, the bootstrap), best of ``--repeat``. Prints the seconds, the
speed-up, the CPU (with its vector units) and the load average; tests/test_fast_match.py checks that both give the
same numbers. Never asserts.

Run: .venv/bin/python benchmarks/coco_matching.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import time

import torch
from pycocotools.cocoeval import COCOeval

from detrq.data.loading import eval_dataset
from detrq.evaluation.evaluate import coco_metrics, evaluate, load_results, restrict_to_ap
from detrq.evaluation.fast_match import FastCOCOeval
from detrq.io.paths import PROJECT_ROOT
from detrq.io.results import cpu_int8_isa, cpu_label, cpu_model
from detrq.models.loading import load_model


def matching_seconds(cls: type[COCOeval], coco_dt, dataset, ap_only: bool, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        with contextlib.redirect_stdout(io.StringIO()):
            ev = cls(dataset.coco, coco_dt, iouType="bbox")
            ev.params.imgIds = list(dataset.ids)
            if ap_only:
                restrict_to_ap(ev)
            start = time.perf_counter()
            ev.evaluate()
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="timings per matcher; the best is printed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, _ = load_model("mini", PROJECT_ROOT / "checkpoints/detr_mini.pth", "cpu", min_size=128, max_size=128)
    dataset = eval_dataset(model, PROJECT_ROOT / "data/synthetic", "val")
    start = time.perf_counter()
    result = evaluate(model, dataset, batch_size=8, progress=False)
    total = time.perf_counter() - start
    start = time.perf_counter()
    coco_metrics(dataset.coco, result["detections"], dataset.ids)
    metrics = time.perf_counter() - start
    print(f"one evaluation of {len(dataset)} val images, 1 thread: {total:.2f} s, of which COCO metrics "
          f"{metrics:.2f} s (with the fast matching)")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = load_results(dataset.coco, result["detections"])
    for ap_only, what in ((False, "every area range (coco_metrics)"), (True, "restrict_to_ap (an AP alone)")):
        stock = matching_seconds(COCOeval, coco_dt, dataset, ap_only, args.repeat)
        fast = matching_seconds(FastCOCOeval, coco_dt, dataset, ap_only, args.repeat)
        print(f"COCOeval.evaluate, {what}: stock {stock:.3f} s, fast {fast:.3f} s ({stock / fast:.1f}x)")
    print(f"CPU: {cpu_label(cpu_model(), cpu_int8_isa())}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
