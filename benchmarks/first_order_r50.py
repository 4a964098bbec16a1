"""Benchmark: the first-order metric's probes on DETR-R50 at 800 px, on this CPU, and the full run they imply.

Prints figures measured in one run; never asserts. Builds the ``r50`` preset (official layout; random weights:
the cost does not depend on the values), one 800x1066 image (the official eval size of a 4:3 COCO image), and
times, with --threads CPU threads: one forward; one ``ggn`` probe of the KL trace (one backward of the logits'
cotangent, the graph reused as in ``layer_traces``); one ``rows`` probe of the Jacobian row-norm sums (one
backward of one box coordinate). From these it prints the probe time of the full run (100 Hessian images,
--kl-probes and --jacobian-probes probes) on this CPU, and, as an ESTIMATE only, on a GPU assumed
--gpu-speedup times faster than this CPU (not measured here: no GPU was available).

Run: .venv/bin/python benchmarks/first_order_r50.py [--threads 2] [--gpu-speedup 50]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from detrq.models.detr import build_detr
from detrq.quant.bitmaps import quantizable_layers
from detrq.sensitivity import TraceSettings, jacobian_row_norm_sums, sensitivity, tracing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kl-probes", type=int, default=20, help="ggn probes of the full run (default 20)")
    parser.add_argument("--jacobian-probes", type=int, default=48,
                        help="Jacobian probes of the full run (default 48, as params/)")
    parser.add_argument("--images", type=int, default=100, help="Hessian images of the full run (default 100)")
    parser.add_argument("--gpu-speedup", type=float, default=50.0,
                        help="assumed GPU / this-CPU speed ratio for the estimate (default 50; an assumption)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_detr("r50").eval()
    image = torch.randn(3, 800, 1066)
    batches = [([image], [{}])]
    start = time.perf_counter()
    with torch.no_grad():
        model([image])
    forward = time.perf_counter() - start
    settings = TraceSettings(estimator="ggn", max_probes=2, min_probes=2, probes_per_pass=2, jacobian_probes=2)
    start = time.perf_counter()
    sensitivity(model, batches, "out-float", replace(settings, max_probes=1, min_probes=1, probes_per_pass=1))
    one_kl = time.perf_counter() - start
    start = time.perf_counter()
    sensitivity(model, batches, "out-float", settings)
    two_kl = time.perf_counter() - start
    names = list(quantizable_layers(model))
    with tracing(model, names) as params:
        start = time.perf_counter()
        jacobian_row_norm_sums(model, [[image]], params, replace(settings, jacobian_probes=2))
        two_rows = time.perf_counter() - start
    # Two probes on one graph minus one probe: the cost of a probe once the graph exists (the teacher forward
    # and graph building are paid once per pass). The rows pass is one forward with graph and two backwards.
    kl_probe = two_kl - one_kl
    rows_probe = (two_rows - forward) / 2
    cpu_total = args.images * (one_kl + (args.kl_probes - 1) * kl_probe + args.jacobian_probes * rows_probe)
    print(f"DETR-R50 (random weights, official layout), one 800x1066 image, {args.threads} CPU threads:")
    print(f"  forward {forward:.1f} s; ggn KL pass with one probe {one_kl:.1f} s; each further ggn probe "
          f"{kl_probe:.1f} s; two rows probes {two_rows:.1f} s (about {rows_probe:.1f} s per probe)")
    print(f"  full run on this CPU ({args.images} images, {args.kl_probes} ggn + {args.jacobian_probes} Jacobian "
          f"probes, one image per graph): about {cpu_total / 3600:.1f} h")
    print(f"  ESTIMATE, not measured: on a GPU {args.gpu_speedup:g}x faster than this CPU, about "
          f"{cpu_total / args.gpu_speedup / 60:.0f} min")


if __name__ == "__main__":
    main()
