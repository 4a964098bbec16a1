"""Convergence of the sensitivity estimates judged by the ILP's answer, not by a probe count.

An estimate is trusted when the bit maps no longer move with the probe seed: for every scheme and budget the
bit maps of ``n`` probe seeds must agree on at least ``MIN_AGREEMENT`` of the quantized weights (pairwise,
the worst pair counts), and their ILP objectives (each seed's optimum under its own estimated costs) must lie
within ``MAX_OBJECTIVE_SPREAD`` of each other ((max - min) / mean of their magnitudes).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from detrq.io.errors import DetrqError
from detrq.io.results import write_json_atomic

MIN_AGREEMENT = 0.95
MAX_OBJECTIVE_SPREAD = 0.02


def bitmap_agreement(a: Mapping[str, int], b: Mapping[str, int], numel: Mapping[str, int]) -> float:
    """The fraction of quantized weight elements that get the same bits in ``a`` and ``b``."""
    if set(a) != set(b):
        raise DetrqError("the bit maps cover different layers")
    total = sum(numel[n] for n in a)
    return sum(numel[n] for n in a if a[n] == b[n]) / total


def objective_spread(objectives: Sequence[float]) -> float:
    """``(max - min) / mean(|objective|)``; 0 for identical objectives."""
    scale = sum(abs(o) for o in objectives) / len(objectives)
    spread = max(objectives) - min(objectives)
    return spread / scale if scale else (0.0 if spread == 0 else float("inf"))


def seed_stability(allocations: Sequence[Mapping[str, Mapping[float, Mapping[str, Any]]]],
                   numel: Mapping[str, int]) -> dict[str, Any]:
    """The check over replicas: ``allocations[k]`` is ``{scheme: {target: allocation}}`` for probe seed k.

    ``allocations[0]`` holds every scheme that got bit maps (``sources``, in order); a scheme that appears in every
    replica is checked, one that appears only in the first is not: it is deterministic (``Scheme.stochastic``: no
    probes, so another seed gives the same maps), or the run drew one probe seed only.

    Returns ``{"schemes": {checked scheme: {target: {"min_agreement", "objective_spread", "objectives",
    "stable"}}}, "stable": {checked scheme: bool over all targets}, "sources", "targets", "unchecked",
    thresholds}``.
    """
    if not allocations or not allocations[0]:
        raise DetrqError("the seed-stability check needs the bit maps of at least one scheme")
    first = allocations[0]
    checked = [s for s in first if len(allocations) > 1 and all(s in a for a in allocations[1:])]
    out: dict[str, Any] = {}
    for scheme in checked:
        out[scheme] = {}
        for target in first[scheme]:
            runs = [a[scheme][target] for a in allocations]
            agreement = min(bitmap_agreement(x["bit_map"], y["bit_map"], numel)
                            for x, y in itertools.combinations(runs, 2))
            objectives = [r["objective"] for r in runs]
            spread = objective_spread(objectives)
            out[scheme][f"{target:g}"] = {
                "min_agreement": agreement, "objective_spread": spread, "objectives": objectives,
                "avg_bits": [r["avg_bits"] for r in runs],
                "stable": agreement >= MIN_AGREEMENT and spread <= MAX_OBJECTIVE_SPREAD}
    return {"seeds": len(allocations), "min_agreement_required": MIN_AGREEMENT,
            "max_objective_spread": MAX_OBJECTIVE_SPREAD, "schemes": out,
            "stable": {s: all(v["stable"] for v in t.values()) for s, t in out.items()},
            "sources": list(first), "targets": [f"{t:g}" for t in next(iter(first.values()))],
            "unchecked": [s for s in first if s not in out]}


def write_seed_stability(result: dict[str, Any], path: str | Path) -> Path:
    """The check's result as JSON, atomically."""
    return write_json_atomic(path, result)
