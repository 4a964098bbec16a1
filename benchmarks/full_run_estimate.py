"""Estimate, not a measurement: what the full run (DETR-R50, COCO 2017, params/full.yaml) costs, step by step.

The work is counted from ``params/full.yaml`` and the r50 preset (number of quantizable layers); each pass is
priced with per-image costs of DETR-R50 at 800x1066 measured on one thread of this project's CPU (FIELD_NOTES:
forward 3.7 s, forward+backward 8.5 s, one HVP from scratch 21.6 s, 4.05 GiB peak RSS during an HVP; pass your
own with the flags). GPU time divides the CPU time by ``--gpu-speedup``, an ASSUMPTION (no GPU was measured
here), and memory is the CPU peak RSS per image times the batch, also an estimate. Everything is an upper-bound
count: a measured-cost scan reruns the whole model for every layer, though detrq reruns only what follows the
quantized layer (``sensitivity/truth.py``), and probes reuse one graph per image (``sensitivity/estimators.py``).

Run: .venv/bin/python benchmarks/full_run_estimate.py [--gpu-speedup 100] [--nproc 8]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from detrq.models.detr import build_detr
from detrq.quant.bitmaps import quantizable_layers

ROOT = Path(__file__).resolve().parents[1]
VAL_IMAGES = 5000


def passes(params: dict, layers: int) -> list[tuple[str, float, bool, str]]:
    """``(step, CPU seconds on one thread, sharded over torchrun ranks, how it is counted)`` for every heavy step
    of the full run. Sharded: notebook 01's traces, and notebook 03's and notebook 07's Eq. (6) evaluations
    (``parallel/launch.py``)."""
    cost = params["_cost"]
    fwd, fwd_bwd, hvp = cost["forward"], cost["fwd_bwd"], cost["hvp"]
    bwd, hvp_again = fwd_bwd - fwd, hvp - fwd_bwd  # a backward, and one more HVP on a graph already built
    n, seeds = params["num_hessian_images"], params["stability_seeds"]
    probes = {name: max(p) for name, p in params["probes"].items()}
    ggn = [s for s in ("out-float", "out-first-order", "out-quant-ggn") if s in probes]
    blockwise = [m for m, e in params["estimators"].items() if e == "blockwise"]
    fisher = [v for v in params["extra_variants"] if v.endswith(":fisher")]
    bits = len(params["measure_bits"])
    rows = [
        ("01 traces, blockwise (" + ", ".join(blockwise) + ")",
         seeds * len(blockwise) * n * (fwd_bwd + probes.get("loss", 2) * layers * hvp_again), True,
         f"{seeds} seeds x {len(blockwise)} metrics x {n} images x (graph + {probes.get('loss', 2)} probes x "
         f"{layers} layer HVPs)"),
        ("01 traces, ggn (" + ", ".join(ggn) + ")",
         seeds * sum(n * (fwd + probes[s] * bwd) for s in ggn), True,
         f"{seeds} seeds x {n} images x (forward + up to 30 backward probes) per scheme"),
        ("01 traces, Jacobian row norms", seeds * n * (fwd + params["jacobian_probes"] * bwd), True,
         f"{seeds} seeds x {n} images x {params['jacobian_probes']} backward probes"),
        ("01 traces, empirical Fisher", seeds * len(fisher) * n * fwd_bwd, True,
         f"{seeds} seeds x {len(fisher)} variants x {n} images x one backward"),
        ("01 stability + curvature", params["stability_sets"] * params["stability_set_size"] * fwd
         + 4 * params["curvature_images"] * (fwd_bwd + params["curvature_probes"] * hvp_again), False,
         "forward of 10 x 100 images; 2 points x 2 terms x 10 images x 4 HVPs"),
        ("02/05/07 measured costs (Eq. (5) scans)", 4 * layers * bits * n * fwd, False,
         f"4 scans (eq6, 8-bit point, per-channel, gptq) x {layers} layers x {bits} bits x {n} images"),
        ("05 measured val AP drops", layers * len(params["measure_ap_bits"]) * VAL_IMAGES * fwd, False,
         f"{layers} layers x {len(params['measure_ap_bits'])} bits x {VAL_IMAGES} val images"),
    ]
    table1 = 5 + 8 * 3 + 7 * 3 * (seeds - 1)  # float, W8, uniform 6/5/4; 8 rows x 3 budgets; the other seeds
    # Notebook 07: float, uniform 3..8 and 8 sources x every budget with Eq. (6) (sharded); the other quantizers
    # (uniform, and 8 sources at 6/5/4 bits) run in one process.
    pareto_eq6 = 1 + 6 + 8 * len(params["pareto_targets"])
    pareto_other = (6 + 8 * 3) * (len(params["quantizers"]) - 1)
    rows.append(("03 evaluations (Table 1)", table1 * VAL_IMAGES * fwd, True,
                 f"{table1} evaluations x {VAL_IMAGES} images"))
    rows.append(("07 evaluations with Eq. (6) (Pareto front)", pareto_eq6 * VAL_IMAGES * fwd, True,
                 f"{pareto_eq6} evaluations x {VAL_IMAGES} images"))
    rows.append(("07 evaluations, other quantizers (Table 2), and the curve", (pareto_other + 2) * VAL_IMAGES * fwd,
                 False, f"{pareto_other} + 2 evaluations x {VAL_IMAGES} images"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=str(ROOT / "params" / "full.yaml"))
    parser.add_argument("--forward", type=float, default=3.7, help="s per image, one CPU thread (FIELD_NOTES)")
    parser.add_argument("--fwd-bwd", type=float, default=8.5, help="s per image, one CPU thread (FIELD_NOTES)")
    parser.add_argument("--hvp", type=float, default=21.6, help="s per image, one CPU thread (FIELD_NOTES)")
    parser.add_argument("--hvp-gib", type=float, default=4.05, help="peak GiB per image in an HVP (FIELD_NOTES)")
    parser.add_argument("--gpu-speedup", type=float, default=100.0,
                        help="ASSUMED speed of one GPU over one thread of this CPU (default 100)")
    parser.add_argument("--nproc", type=int, default=8, help="GPUs sharing the sharded steps (torchrun), ideal "
                        "scaling (default %(default)s)")
    args = parser.parse_args()
    params = yaml.safe_load(Path(args.params).read_text())
    params["_cost"] = {"forward": args.forward, "fwd_bwd": args.fwd_bwd, "hvp": args.hvp}
    layers = len(quantizable_layers(build_detr("r50")))
    rows = passes(params, layers)
    gpu = 3600 * args.gpu_speedup
    on_n = [seconds / gpu / (args.nproc if sharded else 1) for _, seconds, sharded, _ in rows]
    print(f"ESTIMATE of the full run ({Path(args.params).name}, DETR-R50, {layers} quantizable layers) from "
          f"per-image CPU costs, at an ASSUMED {args.gpu_speedup:g}x GPU speed-up")
    print(f"| step | CPU-hours (1 thread) | hours, 1 GPU | hours, {args.nproc} GPUs | counted as |")
    print("|---|---:|---:|---:|---|")
    for (name, seconds, sharded, how), hours in zip(rows, on_n):
        print(f"| {name} | {seconds / 3600:,.0f} | {seconds / gpu:,.1f} | {hours:,.1f}"
              f"{'' if sharded else ' (one process)'} | {how} |")
    total = sum(seconds for _, seconds, _, _ in rows)
    print(f"| total | {total / 3600:,.0f} | {total / gpu:,.1f} | {sum(on_n):,.1f} | |")
    hvp_batch = params["hessian_batch_size"]
    print(f"GPU memory (estimate: CPU peak per image x batch): HVP batch {hvp_batch} ~{args.hvp_gib * hvp_batch:.0f} "
          f"GiB plus the weights; evaluation batch {params['eval_batch_size']} (forward only) well below that.")


if __name__ == "__main__":
    main()
