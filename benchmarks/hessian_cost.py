"""Benchmark: the cost of one all-layer Hutchinson probe, against one forward+backward and a per-layer probe loop.

Prints measured ratios next to their targets; never asserts. On build_detr("mini") with a batch of synthetic
images and random targets, one CPU thread, for the "loss" and "out-float" objectives it times (median of
--repeats):

* fwd+bwd: forward and first-order gradients of all traced layers;
* HVP: one all-layer probe from scratch (forward, backward with create_graph, double backward);
* probe in layer_traces: the amortised cost per probe when layer_traces reuses each graph for a pass of probes;
* per-layer loop: one HVP per layer with the probe restricted to that layer (forward, that layer's gradient with
  create_graph, double backward), as a per-layer Hutchinson estimator does; and the same loop sharing one
  forward and first backward.

Run: .venv/bin/python benchmarks/hessian_cost.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from detrq.models.detr import build_detr
from detrq.quant.bitmaps import quantizable_layers
from detrq.sensitivity import TraceSettings, layer_traces, sensitivity_objective, tracing

TARGET_HVP_OVER_FWD_BWD = 2.5
TARGET_SPEEDUP_OVER_PER_LAYER = 20.0


def verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: allocator and autograd caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def synthetic_batch(images: int, size: int, num_classes: int, seed: int) -> tuple[list, list]:
    g = torch.Generator().manual_seed(seed)
    imgs = [torch.randn(3, size, size, generator=g) for _ in range(images)]
    targets = []
    for _ in range(images):
        n = int(torch.randint(1, 4, (), generator=g))
        centres = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        sizes = torch.rand(n, 2, generator=g) * 0.2 + 0.1
        targets.append({"labels": torch.randint(0, num_classes, (n,), generator=g),
                        "boxes": torch.cat([centres, sizes], dim=1)})
    return imgs, targets


def measure(model, batch, metric: str, repeats: int, probes: int) -> dict[str, float]:
    names = list(quantizable_layers(model))
    with tracing(model, names) as params:
        objective = sensitivity_objective(model, [batch], metric)
        loss_fn, (item,) = objective.loss, objective.items
        tensors = list(params.values())
        probe = [torch.randint(0, 2, t.shape).float() * 2 - 1 for t in tensors]

        def fwd_bwd() -> None:
            torch.autograd.grad(loss_fn(item), tensors)

        def hvp() -> None:
            grads = torch.autograd.grad(loss_fn(item), tensors, create_graph=True)
            torch.autograd.grad(grads, tensors, grad_outputs=probe)

        def amortised() -> None:
            layer_traces(objective, params, TraceSettings(max_probes=probes, min_probes=probes,
                                                          probes_per_pass=probes))

        def per_layer_loop() -> None:
            for t, v in zip(tensors, probe):
                (g,) = torch.autograd.grad(loss_fn(item), [t], create_graph=True)
                torch.autograd.grad(g, [t], grad_outputs=v)

        def per_layer_loop_shared_graph() -> None:
            grads = torch.autograd.grad(loss_fn(item), tensors, create_graph=True)
            for g, t, v in zip(grads, tensors, probe):
                torch.autograd.grad(g, [t], grad_outputs=v, retain_graph=True)

        return {
            "layers": len(tensors),
            "fwd_bwd": median_seconds(fwd_bwd, repeats),
            "hvp": median_seconds(hvp, repeats),
            "probe_in_layer_traces": median_seconds(amortised, max(1, repeats // 2)) / probes,
            "per_layer_loop": median_seconds(per_layer_loop, max(1, repeats // 2)),
            "per_layer_loop_shared": median_seconds(per_layer_loop_shared_graph, max(1, repeats // 2)),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--probes", type=int, default=10, help="probes per pass for the amortised timing")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_detr(args.preset)
    batch = synthetic_batch(args.images, args.size, model.cfg.num_classes, seed=0)
    print(f"preset {args.preset}, {args.images} images of {args.size}x{args.size}, 1 thread, "
          f"median of {args.repeats} repeats (per-layer loops and amortised probe: {max(1, args.repeats // 2)})")
    for metric in ("loss", "out-float"):
        r = measure(model, batch, metric, args.repeats, args.probes)
        probe = r["probe_in_layer_traces"]
        print(f"\n[{metric}] {r['layers']} traced layers")
        print(f"  fwd+bwd                          {r['fwd_bwd'] * 1e3:8.1f} ms")
        amortised = f"probe in layer_traces ({args.probes}/pass)"
        for label, t in (("all-layer HVP from scratch", r["hvp"]), (amortised, probe)):
            ratio = t / r["fwd_bwd"]
            print(f"  {label:32s} {t * 1e3:8.1f} ms  {ratio:5.2f}x fwd+bwd      "
                  f"(target <= {TARGET_HVP_OVER_FWD_BWD}x: {verdict(ratio <= TARGET_HVP_OVER_FWD_BWD)})")
        for label, t in (("per-layer HVP loop", r["per_layer_loop"]),
                         ("per-layer loop, shared graph", r["per_layer_loop_shared"])):
            print(f"  {label:32s} {t * 1e3:8.1f} ms  all-layer is {t / r['hvp']:5.1f}x faster from scratch, "
                  f"{t / probe:5.1f}x as used (target >= {TARGET_SPEEDUP_OVER_PER_LAYER}x: "
                  f"{verdict(t / r['hvp'] >= TARGET_SPEEDUP_OVER_PER_LAYER)} / "
                  f"{verdict(t / probe >= TARGET_SPEEDUP_OVER_PER_LAYER)})")

if __name__ == "__main__":
    main()
