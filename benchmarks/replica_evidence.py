"""Benchmark: could the probe-seed replicas of the ggn schemes come from the samples already drawn? (issue 24)

Notebook 01 estimates every stochastic scheme again for probe seeds 1 and 2, and notebook 02 judges from the three
estimates whether the bit maps move with the probe seed (``convergence.seed_stability``). For the ggn schemes
(Out Sen Float, Out Sen First-Order, the GGN variant of Out Sen Quant) those replicas cost about a third of
notebook 01's work, and their bit maps agree almost everywhere. This prints, from the committed traces alone (no
probe is drawn), the same check made two ways:

* ``seeds``: the three committed estimates (probe seeds 0, 1, 2), as notebook 02 makes it;
* ``split k``: probe seed ``k``'s own samples cut into ``--groups`` disjoint runs of consecutive probes, each
  run a replica with a ``1 / groups`` share of the probes (the Hutchinson samples of one seed are independent,
  so the runs are independent replicas of a smaller estimate). The first-order scheme's Jacobian samples are cut
  the same way.

A replica from a share of the probes has ``sqrt(groups)`` times the standard error, so where the split check
agrees as well as the seeds' it is evidence that costs nothing more to draw; where it agrees less, it measures
the smaller estimate, not the one Table 1 uses. Either way nothing here replaces the committed check.

Run: .venv/bin/python benchmarks/replica_evidence.py [--results results] [--groups 3]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from detrq.artifact.pipeline import read_all_traces, run_allocation
from detrq.io.errors import DetrqError
from detrq.io.paths import PROJECT_ROOT
from detrq.io.results import read_json
from detrq.models.loading import load_model
from detrq.quant.allocate import paper_bits_range
from detrq.quant.bitmaps import quantizable_layers
from detrq.sensitivity.convergence import seed_stability
from detrq.sensitivity.estimates import TraceEstimate
from detrq.sensitivity.first_order import row_norm_sum

GGN_SCHEMES = ("out-float", "out-first-order", "out-quant-ggn")


def _cut(entry: Mapping[str, Any], part: int, groups: int) -> dict[str, Any]:
    """One estimate (a trace, or a Jacobian row-norm sum) from the ``part``-th of ``groups`` runs of its samples."""
    samples = entry["samples"]
    size = len(samples) // groups
    share = samples[part * size:(part + 1) * size]
    if "n_rows" in entry:
        return row_norm_sum(TraceEstimate.from_samples(share, 1), entry["n_rows"], entry["estimator"])
    return TraceEstimate.from_samples(share, entry["numel"]).to_dict()


def split_replica(traces: Mapping[str, Any], part: int, groups: int) -> dict[str, Any]:
    """A traces result whose every per-layer estimate is remade from one run of its samples."""
    out = copy.deepcopy(dict(traces))
    for name, entry in traces["layers"].items():
        if "samples" in entry:
            out["layers"][name] = _cut(entry, part, groups)
        else:
            out["layers"][name] = {term: _cut(e, part, groups) for term, e in entry.items()}
    return out


def allocations(model: Any, traces: Mapping[str, Any], targets: Sequence[float], negative: str, time_limit: float,
                folder: Path) -> dict[float, dict[str, Any]]:
    """Notebook 02's ILP (``pipeline.run_allocation``) for one traces result at each target, into ``folder``, which
    must be empty: a cut replica keeps its seed's cache key, so an earlier file would be a false cache hit."""
    return {t: run_allocation(model, traces, t, paper_bits_range(t), folder / f"{t:g}bit.json",
                              negative_traces=negative, time_limit=time_limit) for t in targets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="results", help="results folder holding traces/ (default: results)")
    parser.add_argument("--checkpoint", default="checkpoints/detr_mini.pth")
    parser.add_argument("--groups", type=int, default=3, help="replicas cut from one seed's samples (default 3)")
    parser.add_argument("--negative-traces", default="abs", help="as params/default.yaml (default abs)")
    parser.add_argument("--time-limit", type=float, default=60.0, help="ILP seconds (default 60)")
    args = parser.parse_args()
    results = PROJECT_ROOT / Path(args.results)
    model, sha = load_model("mini", PROJECT_ROOT / args.checkpoint, "cpu")
    numel = {n: p.numel() for n, p in quantizable_layers(model).items()}
    committed = read_json(results / "bitmaps" / "seed_stability.json")
    targets = [float(t) for t in committed["targets"]]
    seeds = [read_all_traces(results, sha, GGN_SCHEMES, replica=k) for k in range(committed["seeds"])]
    with tempfile.TemporaryDirectory(prefix="replica_evidence_") as scratch:

        def check(replicas: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
            folder = Path(tempfile.mkdtemp(dir=scratch))
            return seed_stability([{s: allocations(model, r[s], targets, args.negative_traces, args.time_limit,
                                                   folder / f"{k}_{s}")
                                    for s in GGN_SCHEMES} for k, r in enumerate(replicas)], numel)

        rows = {"seeds": check(seeds)}
        for k, replica in enumerate(seeds):
            rows[f"split {k}"] = check([{s: split_replica(replica[s], g, args.groups) for s in GGN_SCHEMES}
                                        for g in range(args.groups)])
    first = {s: next(iter(seeds[0][s]["layers"].values())) for s in GGN_SCHEMES}
    probes = {s: e.get("kl", e)["n_probes"] for s, e in first.items()}
    print(f"bit-map agreement (worst pair) and ILP objective spread over {len(seeds)} replicas, targets "
          f"{', '.join(f'{t:g}' for t in targets)} bits; split: each of seed k's {args.groups} runs of "
          f"consecutive probes ({', '.join(f'{s} {p // args.groups} of {p}' for s, p in probes.items())})")
    print("| scheme | replicas | " + " | ".join(f"{t:g} bits: agreement, spread" for t in targets)
          + " | stable |")
    print("|---|---|" + "---:|" * len(targets) + "---|")
    for scheme in GGN_SCHEMES:
        for label, result in rows.items():
            cells = [result["schemes"][scheme][f"{t:g}"] for t in targets]
            print(f"| {scheme} | {label} | "
                  + " | ".join(f"{c['min_agreement']:.3f}, {c['objective_spread']:.3f}" for c in cells)
                  + f" | {result['stable'][scheme]} |")
    seconds = {s: sum(read_json(results / "traces" / f"traces_{s}_seed{k}.json")["seconds"]
                      for k in range(1, len(seeds))) for s in GGN_SCHEMES}
    print("seconds the committed replicas (seeds after 0) took to estimate: "
          + ", ".join(f"{s} {v:.0f}" for s, v in seconds.items()) + f"; in all {sum(seconds.values()):.0f}")


if __name__ == "__main__":
    try:
        main()
    except DetrqError as err:
        raise SystemExit(f"error: {err}") from None
