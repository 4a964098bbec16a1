"""Estimate, not a measurement: what the full run (DETR-R50, COCO 2017, params/full.yaml) costs, per profile.

Prices ``--profile paper`` (notebooks 01-04: the paper's three metrics, one probe seed), ``--profile complete``
(notebooks 01-05 and 07: every scheme on the probe seeds, Measured Sen, the sensitivity check, Table 2), or both
(the default: one table each, then the paper profile's 1-GPU hours against issue 24's 3 GPU-hour target).

The work is counted from the profile's values (``params/full.yaml`` with ``profiles[NAME]`` merged over it, as
``artifact.notebooks.load_parameters`` merges it; the notebooks from ``profile_notebooks``) and the r50 preset
(its number of quantizable layers):

* notebook 01, per scheme (``estimators`` + ``extra_variants``): ``blockwise`` a graph + probes x layers HVPs per
  image; ``ggn`` a forward + probes backwards per image; ``hutchinson`` a graph + probes HVPs; ``fisher`` one
  forward+backward per image; ``modelopt`` (fisher) one forward+backward per image plus, per scored bit width, the
  quantizable weights re-applied to their kept inputs (ASSUMPTION: at most one forward per bit width and image, an
  upper bound: the R50 backbone's convs are among the quantized weights; ``--modelopt-bit-cost``); Jacobian
  row-norm sums (forward + ``jacobian_probes`` backwards) only with ``out-first-order``. Stochastic schemes run on
  ``stability_seeds`` probe seeds, deterministic ones (``fisher``, ModelOpt's score) on one. Plus the stability
  check (forwards) and the footnote-1 curvature check (HVPs), in both profiles;
* notebook 02: the measured per-layer costs (an Eq. (5) scan: layers x bit widths x Hessian images) only with
  ``measured_sen``;
* notebook 03 (Table 1): float, W8, uniform 6/5/4, every scheme (and Measured Sen with ``measured_sen``) at each
  budget, and the other probe seeds' bit maps of the stochastic schemes (the paper profile: 14 evaluations);
* notebook 05 (complete only): the Eq. (5) scans at float (the file of notebook 02, counted once) and at the
  8-bit point, the val AP scan (float + layers x ``measure_ap_bits`` on ``measure_ap_images`` val images, all 5000
  when null; the file also holds a 4-bit Eq. (5) scan; the ``ap_subset_sizes`` scans are scored from its
  detections, no pass of their own), and the first-order traces again with the other Jacobian estimator;
* notebook 07 (complete only): a measured scan per quantizer (Eq. (6)'s is notebook 02's), ModelOpt's score again
  per other quantizer, GPTQ's calibration forwards, and the evaluations: float, uniform 3-8 and every source
  (schemes + Measured Sen) at each budget per quantizer (every ``pareto_targets`` for ``pareto_full_front``,
  Table 2's 6/5/4 for the others). Those with the same bit map and quantizer as a Table 1 row (float and the Eq. (6)
  uniform 8/6/5/4) are reused from notebook 03 (same cache key) and not counted twice.

Each pass is priced with per-image costs of DETR-R50 at 800x1066 measured on one thread of this project's CPU
(FIELD_NOTES: forward 3.7 s, forward+backward 8.5 s, one HVP from scratch 21.6 s, 4.05 GiB peak RSS during an HVP;
pass your own with the flags). GPU time divides the CPU time by ``--gpu-speedup``, an ASSUMPTION (no GPU was
measured here), and memory is the CPU peak RSS per image times the batch, also an estimate. ``--nproc`` GPUs
share the sharded steps with ideal scaling (an ASSUMPTION). Everything is an upper-bound count: a measured-cost
scan reruns the whole model for every layer, though detrq reruns only what follows the quantized layer
(``sensitivity/truth.py``); probes reuse one graph per image (``sensitivity/estimators.py``); a replica bit map
equal to another row's is reused, not re-evaluated. Not counted: the ILP solves (CBC on the CPU, at most
``ilp_time_limit`` s each), GPTQ's per-layer solves, the bootstrap, and data loading. The uniform quantization curve
(``reproduce.sh``'s extra step for the embedded default) is not part of the full run.

Run: .venv/bin/python benchmarks/full_run_estimate.py [--profile paper|complete|both] [--gpu-speedup 100] [--nproc 8]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params" / "full.yaml"
PROFILES: tuple[str, ...] = ("paper", "complete")
VAL_IMAGES = 5000  # COCO 2017 val
TARGET_GPU_HOURS = 3.0  # issue 24: the paper profile of the full run on one GPU


@dataclass(frozen=True)
class Costs:
    """Per-image seconds on one CPU thread (FIELD_NOTES), and the ModelOpt per-bit ASSUMPTION (in forwards)."""

    forward: float = 3.7
    fwd_bwd: float = 8.5
    hvp: float = 21.6
    modelopt_bit: float = 1.0

    @property
    def backward(self) -> float:
        return self.fwd_bwd - self.forward

    @property
    def hvp_again(self) -> float:
        """One more HVP on a graph already built."""
        return self.hvp - self.fwd_bwd


@dataclass(frozen=True)
class Row:
    """One heavy step: ``seconds`` on one CPU thread; ``sharded``: split over torchrun ranks
    (``parallel/launch.py``)."""

    step: str
    seconds: float
    sharded: bool
    how: str

    @property
    def notebook(self) -> str:
        return self.step[:2]


def profile_params(params_file: str | Path, name: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    """``(values, notebooks)`` of profile ``name`` of ``params_file``: the file's values with ``profiles[name]``
    (less its ``notebooks``) merged over them, as ``load_parameters`` merges them but without its check that
    ``checkpoint`` and ``coco_root`` exist (full.yaml leaves them null)."""
    from detrq.artifact.notebooks import NOTEBOOKS_KEY, PROFILE_KEY, PROFILES_KEY, profile_notebooks

    params = yaml.safe_load(Path(params_file).read_text())
    profiles = params.pop(PROFILES_KEY, None) or {}
    params.pop(PROFILE_KEY, None)
    if name not in profiles:
        raise SystemExit(f"{Path(params_file).name} has no profile {name!r}; its profiles: {', '.join(profiles)}")
    params.update({k: v for k, v in profiles[name].items() if k != NOTEBOOKS_KEY})
    return params, profile_notebooks(params_file, name)


def schemes(params: dict[str, Any]) -> list[Any]:
    """The traced schemes of a run (``pipeline.Scheme``), as notebook 01 builds them."""
    from detrq.artifact.pipeline import schemes_from_params

    return schemes_from_params(params["estimators"], params.get("extra_variants") or (), params.get("probes"))


def seeds_of(scheme: Any, params: dict[str, Any]) -> int:
    """Probe seeds a scheme is traced on: ``stability_seeds`` when its estimate depends on the seed, else one."""
    return params["stability_seeds"] if scheme.stochastic else 1


def _probes(scheme: Any, params: dict[str, Any]) -> int:
    return scheme.probes[1] if scheme.probes is not None else params["max_probes"]


def _allocated(params: dict[str, Any]) -> list[Any]:
    """The traced schemes notebook 02 allocates (its ``schemes`` filter; null: all)."""
    chosen = params.get("schemes")
    return [s for s in schemes(params) if chosen is None or s.name in chosen]


def table1_evaluations(params: dict[str, Any]) -> dict[str, Any]:
    """Table 1's evaluations as notebook 03 builds them: ``{"rows": [(precision, source)], "replicas": [...]}``."""
    from detrq.artifact.table1 import MEASURED, SCHEMES, table_rows

    allocated = _allocated(params)
    names = [s.name for s in allocated] + ([MEASURED] if params.get("measured_sen") else [])
    extra = [n for n in names if n not in SCHEMES]
    rows = table_rows(extra, params["targets"], [*names, "none", "uniform"])
    seeded = {s.name for s in allocated if s.stochastic}
    replicas = [(p, s, k) for k in range(1, params["stability_seeds"]) for p, s in rows if s in seeded]
    return {"rows": rows, "replicas": replicas}


def pareto_evaluations(params: dict[str, Any], table1_ran: bool) -> dict[str, list[tuple[str, str, float]]]:
    """Notebook 07's evaluations ``(quantizer, source, target)``: ``{"eq6": new Eq. (6) ones, "other": the other
    quantizers', "shared": those notebook 03 already made (same bit map and quantizer: reused, not rerun)}``."""
    from detrq.artifact.pareto import SweepSettings
    from detrq.artifact.table1 import MEASURED

    settings = SweepSettings(targets=tuple(params["pareto_targets"]), bits=tuple(params["pareto_bits"]),
                             full_front=tuple(params["pareto_full_front"]))
    sources = [s.name for s in schemes(params)] + [MEASURED]
    table1_uniform: set[float] = set()
    shared_float = False
    if table1_ran and params.get("quantizer", "eq6") == "eq6":
        rows = table1_evaluations(params)["rows"]
        table1_uniform = {float(p) for p, s in rows if s == "uniform"}
        shared_float = ("float", "none") in rows
    out: dict[str, list[tuple[str, str, float]]] = {"eq6": [], "other": [], "shared": []}
    # The float evaluation runs once, in this process (run_sweep passes it no launch): counted with the others.
    (out["shared"] if shared_float else out["other"]).append(("float", "none", 32.0))
    for q in params["quantizers"]:
        jobs = [(q, "uniform", float(b)) for b in settings.uniform_bits]
        jobs += [(q, s, float(t)) for s in sources for t in settings.targets_for(q)]
        for job in jobs:
            if q == "eq6" and job[1] == "uniform" and job[2] in table1_uniform:
                out["shared"].append(job)
            else:
                out["eq6" if q == "eq6" else "other"].append(job)
    return out


def _bits02(params: dict[str, Any]) -> list[int]:
    """The widths of notebook 02's measured costs: ``measure_bits`` and every ILP range of its targets."""
    from detrq.artifact.walkthrough import bits_range_rule

    rule = bits_range_rule(params.get("bits_range"))
    return sorted({*params["measure_bits"], *(b for t in params["targets"] for b in rule(t))})


def passes(params: dict[str, Any], notebooks: tuple[str, ...], layers: int, cost: Costs = Costs()) -> list[Row]:
    """Every heavy step of a profile's run, priced on one CPU thread. Sharded over torchrun ranks: notebook 01's
    traces (ModelOpt's score excepted) and the Eq. (6) evaluations of notebooks 03 and 07."""
    from detrq.sensitivity import FIRST_ORDER
    from detrq.sensitivity.modelopt import MODELOPT, MODELOPT_BITS

    fwd, fwd_bwd, bwd, again = cost.forward, cost.fwd_bwd, cost.backward, cost.hvp_again
    n = params["num_hessian_images"]
    ran = {name[:2] for name in notebooks}
    traced = schemes(params)
    modelopt_bits = len(MODELOPT_BITS)
    modelopt_image = fwd_bwd + modelopt_bits * cost.modelopt_bit * fwd
    first_order = next((s for s in traced if s.metric == FIRST_ORDER), None)
    jacobian_image = fwd + params["jacobian_probes"] * bwd
    rows: list[Row] = []

    def scheme_list(group: list[Any]) -> str:
        return ", ".join(f"{s.name} x{seeds_of(s, params)}" for s in group)

    if "01" in ran:
        by = {e: [s for s in traced if s.estimator == e and s.metric != MODELOPT]
              for e in ("blockwise", "hutchinson", "ggn", "fisher")}
        per_image = {"blockwise": lambda s: fwd_bwd + _probes(s, params) * layers * again,
                     "hutchinson": lambda s: fwd_bwd + _probes(s, params) * again,
                     "ggn": lambda s: fwd + _probes(s, params) * bwd,
                     "fisher": lambda s: fwd_bwd}
        how = {"blockwise": f"seeds x {n} images x (graph + probes x {layers} layer HVPs)",
               "hutchinson": f"seeds x {n} images x (graph + probes HVPs)",
               "ggn": f"seeds x {n} images x (forward + probes backwards)",
               "fisher": f"{n} images x one forward+backward, one seed (deterministic)"}
        titles = {"blockwise": "blockwise", "hutchinson": "Hutchinson", "ggn": "ggn", "fisher": "empirical Fisher"}
        for e, group in by.items():
            if group:
                rows.append(Row(f"01 traces, {titles[e]} ({scheme_list(group)})",
                                sum(seeds_of(s, params) * n * per_image[e](s) for s in group), True,
                                how[e] if e == "fisher" else
                                how[e] + "; max probes: " + ", ".join(f"{s.name} {_probes(s, params)}" for s in group)))
        if first_order is not None:
            seeds = seeds_of(first_order, params)
            rows.append(Row(f"01 traces, Jacobian row norms ({first_order.name} x{seeds})",
                            seeds * n * jacobian_image, True,
                            f"{seeds} seeds x {n} images x (forward + {params['jacobian_probes']} backwards)"))
        modelopt = [s for s in traced if s.metric == MODELOPT]
        if modelopt:
            rows.append(Row(f"01 traces, ModelOpt score ({scheme_list(modelopt)})", len(modelopt) * n * modelopt_image,
                            False, f"{n} images x (forward+backward + {modelopt_bits} bit widths x "
                            f"{cost.modelopt_bit:g} forward, ASSUMED upper bound), one seed, one process"))
        rows.append(Row("01 stability + curvature",
                        params["stability_sets"] * params["stability_set_size"] * fwd
                        + 4 * params["curvature_images"] * (fwd_bwd + params["curvature_probes"] * again), False,
                        f"forward of {params['stability_sets']} x {params['stability_set_size']} images; 2 points "
                        f"x 2 terms x {params['curvature_images']} images x {params['curvature_probes']} HVPs"))

    scanned: set[tuple[str, tuple[int, ...]]] = set()  # measured-cost files already counted (quantizer, widths)

    def scan(quantizer: str, bits: list[int]) -> float:
        key = (quantizer, tuple(sorted(bits)))
        if key in scanned:
            return 0.0
        scanned.add(key)
        return layers * len(bits) * n * fwd

    quantizer02 = params.get("quantizer", "eq6")
    if "02" in ran and params.get("measured_sen"):
        bits = _bits02(params)
        rows.append(Row(f"02 measured costs for Measured Sen ({quantizer02} scan)", scan(quantizer02, bits), False,
                        f"{layers} layers x {len(bits)} bits x {n} images (forward)"))
    gptq_calibrated = False
    if "02" in ran and quantizer02 == "gptq":
        gptq_calibrated = True
        rows.append(Row("02 GPTQ calibration", params["gptq_calib_images"] * fwd, False,
                        f"{params['gptq_calib_images']} calibration forwards"))

    if "03" in ran:
        t1 = table1_evaluations(params)
        count = len(t1["rows"]) + len(t1["replicas"])
        what = (f"({len(t1['rows'])} rows + {len(t1['replicas'])} bit maps of the other "
                f"{params['stability_seeds'] - 1} probe seeds, stochastic schemes only)" if t1["replicas"]
                else f"{len(t1['rows'])} rows")
        rows.append(Row("03 evaluations (Table 1)", count * VAL_IMAGES * fwd, quantizer02 == "eq6",
                        f"{what} x {VAL_IMAGES} images"))

    if "05" in ran:
        bits = list(params["measure_bits"])
        shared = ("eq6", tuple(sorted(bits))) in scanned
        seconds = scan("eq6", bits) + layers * len(bits) * n * fwd  # at float (notebook 02's file) + at the 8-bit point
        rows.append(Row("05 measured costs (Eq. (5) scans at float and at the 8-bit point)", seconds, False,
                        f"{1 if shared else 2} scan(s) x {layers} layers x {len(bits)} bits x {n} images"
                        + (" (the float one is notebook 02's, counted there)" if shared else "")))
        ap_images = params.get("measure_ap_images") or VAL_IMAGES
        ap_bits = len(params["measure_ap_bits"])
        rows.append(Row("05 measured val AP drops (subsets scored from the same detections)",
                        (1 + layers * ap_bits) * ap_images * fwd + layers * n * fwd, False,
                        f"(float + {layers} layers x {ap_bits} bits) x {ap_images} val images, with a 4-bit "
                        f"Eq. (5) scan of {n} images"))
        if first_order is not None:
            rows.append(Row("05 first-order traces, other Jacobian estimator",
                            n * (fwd + _probes(first_order, params) * bwd) + n * jacobian_image, False,
                            f"{n} images x (forward + {_probes(first_order, params)} backwards + forward + "
                            f"{params['jacobian_probes']} backwards), one seed"))

    if "07" in ran:
        quantizers = list(params["quantizers"])
        bits = list(params["measure_bits"])
        counted = [q for q in quantizers if (q, tuple(sorted(bits))) not in scanned]
        seconds = sum(scan(q, bits) for q in quantizers)
        rows.append(Row("07 measured costs per quantizer", seconds, False,
                        f"{len(counted)} scan(s) ({', '.join(counted) or 'none'}) x {layers} layers x {len(bits)} "
                        f"bits x {n} images" + ("; eq6's is notebook 02's" if "eq6" not in counted else "")))
        others = [q for q in quantizers if q != "eq6"]
        modelopt = [s for s in traced if s.metric == MODELOPT]
        if modelopt and others:
            rows.append(Row("07 ModelOpt score per other quantizer", len(others) * len(modelopt) * n * modelopt_image,
                            False, f"{len(others)} quantizers x {n} images x (forward+backward + {modelopt_bits} "
                            "bit widths, ASSUMED <= 1 forward each)"))
        if "gptq" in quantizers and not gptq_calibrated:
            rows.append(Row("07 GPTQ calibration", params["gptq_calib_images"] * fwd, False,
                            f"{params['gptq_calib_images']} calibration forwards (the per-layer solves not counted)"))
        pareto = pareto_evaluations(params, "03" in ran)
        widths = sorted((t for _, s, t in pareto["shared"] if s == "uniform"), reverse=True)
        shared = (f"; {len(pareto['shared'])} more (float, Eq. (6) uniform {'/'.join(f'{t:g}' for t in widths)}) "
                  "reused from Table 1" if pareto["shared"] else "")
        rows.append(Row("07 evaluations with Eq. (6) (Pareto front)", len(pareto["eq6"]) * VAL_IMAGES * fwd, True,
                        f"{len(pareto['eq6'])} evaluations x {VAL_IMAGES} images{shared}"))
        rows.append(Row("07 evaluations, other quantizers (Table 2)", len(pareto["other"]) * VAL_IMAGES * fwd, False,
                        f"{len(pareto['other'])} evaluations x {VAL_IMAGES} images"))
    return rows


def estimate(params_file: str | Path, profile: str, layers: int, cost: Costs = Costs(), gpu_speedup: float = 100.0,
             nproc: int = 8) -> dict[str, Any]:
    """A profile's priced steps and totals: ``{"rows", "cpu_hours", "gpu_hours" (1 GPU), "gpu_hours_n" (nproc GPUs),
    "evaluations", "params", "notebooks"}``."""
    params, notebooks = profile_params(params_file, profile)
    rows = passes(params, notebooks, layers, cost)
    gpu = 3600 * gpu_speedup
    evaluations = {"table1": 0, "table1_replicas": 0, "pareto": 0, "pareto_shared": 0}
    if any(n.startswith("03") for n in notebooks):
        t1 = table1_evaluations(params)
        evaluations.update(table1=len(t1["rows"]), table1_replicas=len(t1["replicas"]))
    if any(n.startswith("07") for n in notebooks):
        p = pareto_evaluations(params, any(n.startswith("03") for n in notebooks))
        evaluations.update(pareto=len(p["eq6"]) + len(p["other"]), pareto_shared=len(p["shared"]))
    return {"profile": profile, "params": params, "notebooks": notebooks, "rows": rows, "evaluations": evaluations,
            "cpu_hours": sum(r.seconds for r in rows) / 3600,
            "gpu_hours": sum(r.seconds for r in rows) / gpu,
            "gpu_hours_n": sum(r.seconds / gpu / (nproc if r.sharded else 1) for r in rows)}


def print_estimate(result: dict[str, Any], layers: int, params_name: str, gpu_speedup: float, nproc: int,
                   hvp_gib: float) -> None:
    params, rows, ev = result["params"], result["rows"], result["evaluations"]
    gpu = 3600 * gpu_speedup
    traced = schemes(params)
    print(f"ESTIMATE of the full run, profile {result['profile']} ({params_name}, DETR-R50, {layers} quantizable "
          f"layers) from per-image CPU costs, at an ASSUMED {gpu_speedup:g}x GPU speed-up")
    print(f"notebooks: {', '.join(result['notebooks'])}; schemes: "
          + ", ".join(f"{s.name} ({s.estimator}, {seeds_of(s, params)} seed{'s' if seeds_of(s, params) > 1 else ''})"
                      for s in traced)
          + f"; Measured Sen: {'yes' if params.get('measured_sen') else 'no'}")
    print(f"evaluations: Table 1 {ev['table1']} rows + {ev['table1_replicas']} replicas"
          + (f"; notebook 07 {ev['pareto']} more ({ev['pareto_shared']} shared with Table 1, not counted twice)"
             if ev["pareto"] or ev["pareto_shared"] else ""))
    print()
    print(f"| step | CPU-hours (1 thread) | hours, 1 GPU | hours, {nproc} GPUs | counted as |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r.step} | {r.seconds / 3600:,.0f} | {r.seconds / gpu:,.2f} | "
              f"{r.seconds / gpu / (nproc if r.sharded else 1):,.2f}{'' if r.sharded else ' (one process)'} | "
              f"{r.how} |")
    print(f"| total | {result['cpu_hours']:,.0f} | {result['gpu_hours']:,.2f} | {result['gpu_hours_n']:,.2f} | |")
    hvp_batch = params["hessian_batch_size"]
    print(f"GPU memory (estimate: CPU peak per image x batch): HVP batch {hvp_batch} ~{hvp_gib * hvp_batch:.0f} "
          f"GiB plus the weights; evaluation batch {params['eval_batch_size']} (forward only) well below that.")


def target_line(paper_gpu_hours: float, gpu_speedup: float) -> str:
    verdict = "within" if paper_gpu_hours <= TARGET_GPU_HOURS else "over"
    return (f"paper profile: {paper_gpu_hours:.2f} GPU-hours on 1 GPU vs the {TARGET_GPU_HOURS:g} GPU-hour target "
            f"(issue 24): {verdict} it ({paper_gpu_hours / TARGET_GPU_HOURS:.0%} of it), at the ASSUMED "
            f"{gpu_speedup:g}x GPU speed-up")


def r50_layers() -> int:
    from detrq.models.detr import build_detr
    from detrq.quant.bitmaps import quantizable_layers

    return len(quantizable_layers(build_detr("r50")))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=str(PARAMS))
    parser.add_argument("--profile", choices=[*PROFILES, "both"], default="both",
                        help="the profile to price (default: both, one table each)")
    parser.add_argument("--forward", type=float, default=3.7, help="s per image, one CPU thread (FIELD_NOTES)")
    parser.add_argument("--fwd-bwd", type=float, default=8.5, help="s per image, one CPU thread (FIELD_NOTES)")
    parser.add_argument("--hvp", type=float, default=21.6, help="s per image, one CPU thread (FIELD_NOTES)")
    parser.add_argument("--hvp-gib", type=float, default=4.05, help="peak GiB per image in an HVP (FIELD_NOTES)")
    parser.add_argument("--modelopt-bit-cost", type=float, default=1.0,
                        help="ASSUMED cost of ModelOpt's per-bit-width output change, in forwards per image "
                        "(default 1: an upper bound)")
    parser.add_argument("--gpu-speedup", type=float, default=100.0,
                        help="ASSUMED speed of one GPU over one thread of this CPU (default 100)")
    parser.add_argument("--nproc", type=int, default=8, help="GPUs sharing the sharded steps (torchrun), ideal "
                        "scaling (default %(default)s)")
    args = parser.parse_args(argv)
    cost = Costs(forward=args.forward, fwd_bwd=args.fwd_bwd, hvp=args.hvp, modelopt_bit=args.modelopt_bit_cost)
    layers = r50_layers()
    chosen = PROFILES if args.profile == "both" else (args.profile,)
    results = {}
    for i, profile in enumerate(chosen):
        if i:
            print()
        results[profile] = estimate(args.params, profile, layers, cost, args.gpu_speedup, args.nproc)
        print_estimate(results[profile], layers, Path(args.params).name, args.gpu_speedup, args.nproc, args.hvp_gib)
    print()
    if "paper" in results:
        print(target_line(results["paper"]["gpu_hours"], args.gpu_speedup))
    if len(results) == 2:
        print(f"complete profile: {results['complete']['gpu_hours']:.2f} GPU-hours on 1 GPU "
              f"({results['complete']['gpu_hours'] / results['paper']['gpu_hours']:.1f}x the paper profile), "
              f"{results['complete']['gpu_hours_n']:.2f} on {args.nproc} GPUs")


if __name__ == "__main__":
    main()
