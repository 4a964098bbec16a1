"""Bit allocation: the integer linear program that picks one bit width per layer from a cost table (costs.py)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import mip

from detrq.io.errors import DetrqError
from detrq.quant.codes import MAX_BITS, MIN_BITS

# Slack on the budget check after solving: the constraint is built from floats.
_BUDGET_RTOL = 1e-9
# Largest scaled cost handed to CBC (see allocate_bits' note on scaling).
_MAX_SCALED_COST = 1e20


def allocate_bits(
    omega: Mapping[str, Mapping[int, float]],
    numel: Mapping[str, int],
    avg_bits: float,
    *,
    time_limit: float = 60.0,
) -> dict[str, int]:
    """Choose one bit width per layer minimising ``sum_i omega[i][b_i]`` (Eq. (2)/(4)) under a size budget.

    Constraint: ``sum_i b_i numel_i <= avg_bits * sum_i numel_i``, the average bit width over all quantized
    weight elements (as in the paper and HAWQ-V3). Solved exactly as a multiple-choice knapsack with
    python-mip and CBC (one thread, ``time_limit`` seconds); anything but an OPTIMAL status raises.

    Scaling: costs span many orders of magnitude (traces times squared errors), and CBC treats objective
    differences below an absolute tolerance as ties. Dividing by the largest cost, the obvious choice, left
    the objective up to 9x above the optimum on 150-layer instances whose costs span 1e7; dividing so that the
    smallest nonzero cost is 1 gave the exact (dynamic-programming) optimum on instances spanning up to 1e24.
    So costs are divided by the smallest nonzero absolute cost, bounded so that the largest stays <= 1e20
    (CBC's infinity is 1e30). The budget row is divided by the total element count, so its coefficients are
    at most 16. The MIP gap tolerances are zero, so that "OPTIMAL" means optimal rather than within CBC's
    default 0.01 %.

    Raises ``DetrqError`` when the budget is below the smallest feasible average (every layer at its
    minimum bits), naming that average.
    """
    names = list(omega)
    if not names:
        raise DetrqError("allocate_bits: no layers to allocate")
    missing = [n for n in names if n not in numel]
    if missing:
        raise DetrqError(f"allocate_bits: no element count for layer {missing[0]!r}")
    for name in names:
        if not omega[name]:
            raise DetrqError(f"allocate_bits: layer {name!r} has no bit-width options")
        bad = [b for b in omega[name] if not MIN_BITS <= b <= MAX_BITS or not math.isfinite(omega[name][b])]
        if bad:
            raise DetrqError(f"allocate_bits: layer {name!r} has an invalid option {bad[0]!r} (bits in "
                             f"{MIN_BITS}..{MAX_BITS}, finite cost)")
    total = sum(numel[n] for n in names)
    smallest = sum(min(omega[n]) * numel[n] for n in names) / total
    if smallest > avg_bits * (1 + _BUDGET_RTOL):
        raise DetrqError(f"budget of {avg_bits} average bits is infeasible: the smallest feasible average is "
                         f"{smallest:.4f} bits (every layer at its minimum bits); raise the budget or lower "
                         "the bit range")

    magnitudes = [abs(c) for n in names for c in omega[n].values() if c != 0]
    scale = max(min(magnitudes), max(magnitudes) / _MAX_SCALED_COST) if magnitudes else 1.0
    m = mip.Model(sense=mip.MINIMIZE, solver_name=mip.CBC)
    m.verbose = 0
    m.threads = 1
    m.max_mip_gap = 0.0
    m.max_mip_gap_abs = 0.0
    choice = {(n, b): m.add_var(var_type=mip.BINARY) for n in names for b in omega[n]}
    for n in names:
        m += mip.xsum(choice[n, b] for b in omega[n]) == 1
    m += mip.xsum(b * (numel[n] / total) * choice[n, b] for n in names for b in omega[n]) <= avg_bits
    m.objective = mip.xsum((omega[n][b] / scale) * choice[n, b] for n in names for b in omega[n])
    status = m.optimize(max_seconds=time_limit)
    if status != mip.OptimizationStatus.OPTIMAL:
        raise DetrqError(f"the bit allocation ILP ended with status {status.name}, not OPTIMAL (time limit "
                         f"{time_limit} s); raise time_limit")

    bits = {n: max(omega[n], key=lambda b, n=n: choice[n, b].x) for n in names}
    used = sum(bits[n] * numel[n] for n in names)
    if used > avg_bits * total * (1 + _BUDGET_RTOL):
        raise DetrqError(f"the ILP solution uses {used / total:.6f} average bits, over the {avg_bits} budget")
    return bits


def parse_bits_range(text: str) -> range:
    """``"3-6"`` -> ``range(3, 7)`` (inclusive on both ends); ``"4"`` -> ``range(4, 5)``."""
    lo, sep, hi = text.strip().partition("-")
    try:
        lo_bits = int(lo)
        hi_bits = int(hi) if sep else lo_bits
    except ValueError:
        raise DetrqError(f"bits range {text!r} is not of the form LO-HI, e.g. 3-6") from None
    if not MIN_BITS <= lo_bits <= hi_bits <= MAX_BITS:
        raise DetrqError(f"bits range {text!r} must satisfy {MIN_BITS} <= LO <= HI <= {MAX_BITS}")
    return range(lo_bits, hi_bits + 1)


def paper_bits_range(avg_bits: float) -> range:
    """The paper's per-layer choices: 3-6 bits for the 4- and 5-bit targets, 4-7 bits for the 6-bit target.

    Targets up to 5 bits get 3-6 and larger targets 4-7, which extends the paper's rule to other budgets.
    """
    return range(3, 7) if avg_bits <= 5 else range(4, 8)
