"""Per-layer estimates kept with their samples, so that every number has a mean and a standard error."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class TraceEstimate:
    """Monte Carlo estimate of one layer's quantity (a Hessian trace, a Jacobian row-norm sum).

    ``trace`` is the mean of the per-probe samples, ``stderr`` its standard error (sample standard deviation
    / sqrt(n_probes)), and ``avg_trace = trace / numel`` is the paper's averaged trace Tr(H_W)/|W| used in
    Eq. (2) and (4).
    """

    trace: float
    avg_trace: float
    stderr: float
    n_probes: int
    numel: int
    samples: list[float]

    @classmethod
    def from_samples(cls, samples: list[float], numel: int) -> TraceEstimate:
        n = len(samples)
        mean = math.fsum(samples) / n
        var = math.fsum((s - mean) ** 2 for s in samples) / (n - 1) if n > 1 else math.inf
        stderr = math.sqrt(var / n)
        return cls(mean, mean / numel, stderr, n, numel, list(samples))

    @property
    def rel_stderr(self) -> float:
        if self.stderr == 0:
            return 0.0
        return self.stderr / abs(self.trace) if self.trace != 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rel_stderr(entry: Mapping[str, Any]) -> float:
    """``stderr / |trace|`` of a stored estimate (a ``TraceEstimate.to_dict()``), 0 when both are 0."""
    if entry["stderr"] == 0:
        return 0.0
    return entry["stderr"] / abs(entry["trace"]) if entry["trace"] else math.inf


def total_trace(estimates: Mapping[str, TraceEstimate]) -> dict[str, Any]:
    """The trace summed over layers, with its standard error from the per-probe sums (same probes per layer),
    and the layers whose every sample is exactly 0 (no curvature at all, e.g. box-only layers under the L1 term
    at float weights)."""
    per_probe = [math.fsum(s) for s in zip(*(e.samples for e in estimates.values()))]
    total = TraceEstimate.from_samples(per_probe, sum(e.numel for e in estimates.values()))
    return {"trace": total.trace, "stderr": total.stderr, "n_probes": total.n_probes,
            "max_abs_layer_trace": max(abs(e.trace) for e in estimates.values()),
            "zero_layers": [n for n, e in estimates.items() if not any(e.samples)]}
