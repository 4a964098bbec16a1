"""Benchmark: where the per-layer trace variance comes from, and each estimator's variance x cost.

Prints figures measured in one run; never asserts. On the embedded default (the committed mini DETR, the class-
balanced Hessian images from the synthetic training split), for each metric and a few layers (one per model
region):

* total per-probe variance of a layer's sample under ``hutchinson`` (one Rademacher probe over all layers);
* within-block variance: ``blockwise`` with the probe on that layer alone; cross-block = total - within;
* ``ggn`` (output-space probes; exact for Out Sen Float, an approximation for Out Sen Quant);
* for each estimator, seconds per probe and the work to reach 5 % relative stderr on that layer,
  ``rel. variance x seconds per all-layer probe / 0.05^2`` (blockwise needs one HVP per layer per probe, so its
  all-layer cost is the per-layer cost times the number of layers);
* the first-order metric's Jacobian row-norm sums: the unbiased ``rows`` estimator against the
  ``cauchy-schwarz`` bound (its bias as a ratio, and both relative stderrs and costs).

Variances come from --probes probes, so they carry sampling error of about sqrt(2 / probes) (more for
heavy-tailed samples).

Run: .venv/bin/python benchmarks/trace_variance.py [--probes 10] [--num-images 100] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from detrq.data.coco import class_balanced_subset
from detrq.data.loading import eval_dataset, hessian_batches
from detrq.io.paths import PROJECT_ROOT
from detrq.models.loading import load_model
from detrq.quant.bitmaps import layer_region, quantizable_layers
from detrq.sensitivity import METRICS, TraceSettings, jacobian_row_norm_sums, sensitivity, tracing


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def per_probe_var(e) -> float:
    return statistics.variance(e.samples)


def pick_layers(names: list[str]) -> list[str]:
    """One layer per region, from the middle of each region's run (the heads region: the box MLP's first layer)."""
    by_region: dict[str, list[str]] = {}
    for n in names:
        by_region.setdefault(layer_region(n), []).append(n)
    return [v[len(v) // 2] for v in by_region.values()]


def work_to_5pct(var: float, mean: float, seconds: float) -> float:
    return var / mean ** 2 * seconds / 0.05 ** 2 if mean else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--probes", type=int, default=10)
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model("mini", PROJECT_ROOT / "checkpoints" / "detr_mini.pth")
    root = PROJECT_ROOT / "data" / "synthetic"
    ids = class_balanced_subset(eval_dataset(model, root, "train"), args.num_images, 0)
    batches = hessian_batches(eval_dataset(model, root, "train", image_ids=ids), args.batch_size)
    names = list(quantizable_layers(model))
    chosen = pick_layers(names)
    base = TraceSettings(max_probes=args.probes, min_probes=args.probes, probes_per_pass=args.probes)
    print(f"mini DETR, {len(ids)} Hessian images, {len(names)} layers, {args.probes} probes per estimate, "
          f"{args.threads} threads; layers: {', '.join(chosen)}")
    for metric in METRICS:
        hut, t_hut = timed(lambda: sensitivity(model, batches, metric, base))
        t_hut /= args.probes
        ggn = t_ggn = None
        if metric != "loss":
            ggn, t_ggn = timed(lambda: sensitivity(model, batches, metric, replace(base, estimator="ggn")))
            t_ggn /= args.probes
        print(f"\n[{metric}] s/probe (all {len(names)} layers): hutchinson {t_hut:.2f}"
              + (f", ggn {t_ggn:.2f}" if ggn else "") + "; blockwise per layer below")
        print(f"  {'layer':58s} {'trace':>10s} {'var total':>10s} {'within':>10s} {'cross':>10s} "
              f"{'cross %':>7s} | s to 5%: {'hutch':>8s} {'block':>8s} {'ggn':>8s} {'ggn/hutch trace':>15s}")
        for layer in chosen:
            blk, t_blk = timed(lambda: sensitivity(model, batches, metric, replace(base, estimator="blockwise"),
                                                   layers=[layer]))
            t_blk_all = t_blk / args.probes * len(names)
            total, within = per_probe_var(hut[layer]), per_probe_var(blk[layer])
            mean = blk[layer].trace
            cross = total - within
            cells = [work_to_5pct(total, mean, t_hut), work_to_5pct(within, mean, t_blk_all)]
            ratio = "-"
            if ggn:
                g = ggn[layer]
                cells.append(work_to_5pct(per_probe_var(g), g.trace, t_ggn))
                ratio = f"{g.trace / mean:.3g}" if mean else "-"
            else:
                cells.append(float("nan"))
            print(f"  {layer:58s} {mean:10.3g} {total:10.3g} {within:10.3g} {cross:10.3g} "
                  f"{100 * cross / total if total else 0:6.1f}% | {'':9s}" + " ".join(f"{c:8.3g}" for c in cells)
                  + f" {ratio:>15s}")

    print(f"\n[out-first-order] Jacobian row-norm sums S_l over {len(ids)} images, {args.probes} probes each")
    with tracing(model, names) as params:
        images = [im for im, _ in batches]
        rows, t_rows = timed(lambda: jacobian_row_norm_sums(model, images, params,
                                                            replace(base, jacobian_probes=args.probes)))
        cs, t_cs = timed(lambda: jacobian_row_norm_sums(model, images, params,
                                                        replace(base, jacobian="cauchy-schwarz",
                                                                jacobian_probes=args.probes)))
    print(f"  s/probe: rows {t_rows / args.probes:.2f}, cauchy-schwarz {t_cs / args.probes:.2f}")
    ratios = [cs[n]["sum"] / rows[n]["sum"] for n in names if rows[n]["sum"] > 0]
    rel_rows = [rows[n]["stderr"] / rows[n]["sum"] for n in names if rows[n]["sum"] > 0]
    rel_cs = [cs[n]["stderr"] / cs[n]["sum"] for n in names if cs[n]["sum"] > 0]
    print(f"  bias of the bound, cauchy-schwarz / rows over layers: median {statistics.median(ratios):.2f}, "
          f"min {min(ratios):.2f}, max {max(ratios):.2f}")
    print(f"  relative stderr, median over layers: rows {statistics.median(rel_rows):.3f}, "
          f"cauchy-schwarz {statistics.median(rel_cs):.3f}")
    from scipy.stats import spearmanr

    common = [n for n in names if rows[n]["sum"] > 0]
    rho = spearmanr([rows[n]["sum"] for n in common], [cs[n]["sum"] for n in common]).statistic
    print(f"  Spearman rho between the two estimates over layers: {rho:.3f}")


if __name__ == "__main__":
    main()
