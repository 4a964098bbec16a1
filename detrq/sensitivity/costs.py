"""Per-layer, per-bit cost tables ``omega[layer][bits]`` that the bit-allocation ILP minimises.

Every sensitivity metric ends in such a table, so the ILP (``ilp.allocate_bits``) takes any of them as it is:

* the paper's metrics, Eq. (2) / (4): ``omega_l(b) = Tr(H_l) / |W_l| * ||Q_b(W_l) - W_ref,l||^2``, with
  ``W_ref`` = W (Loss Sen, Out Sen Float) or the 8-bit weights (Out Sen Quant), after the ``negative_traces``
  policy has been applied to the averaged trace;
* the first-order output sensitivity (beyond the paper): ``omega_l(b) = 1/2 Tr(H^KL_l) / |W_l| ||Delta W_l||^2 +
  c sqrt(2/pi) sigma_l S_l``, where ``sigma_l = ||Delta W_l|| / sqrt(|W_l|)`` is the per-weight quantization error,
  ``S_l`` the box Jacobian's row-norm sum and ``c`` Eq. (5)'s L1 normalisation (``hessian.first_order``). The
  two terms' weights come from Eq. (5) itself; no constant is fitted to measured costs;
* measured costs (``truth.py``, "Measured Sen"): a table already;
* ModelOpt's auto_quantize score (``modelopt.py``, beyond the paper): a table already, per layer and bit width.

Negative trace estimates (a Hutchinson estimate of a small or indefinite block can be < 0) reward quantization
error in the ILP, which then sends that layer to its lowest bits. ``negative_traces`` says what to do with them:
``"keep"`` (as estimated), ``"clip"`` (to 0: "no measurable curvature"), ``"abs"`` (the magnitude). The default
in params/ is chosen by agreement with measured costs (notebook 05), never by Table 1's AP.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor

from detrq.io.errors import DetrqError
from detrq.quant.quantizers import EQ6, WeightQuantizer
from detrq.sensitivity import FIRST_ORDER, METRICS
from detrq.sensitivity.modelopt import MODELOPT, modelopt_costs

NEGATIVE_POLICIES: tuple[str, ...] = ("keep", "clip", "abs")
# E|x| = sqrt(2/pi) sigma for x ~ N(0, sigma^2): the isotropic error model of the first-order term.
_HALF_NORMAL_MEAN = math.sqrt(2.0 / math.pi)


def apply_negative_policy(value: float, policy: str) -> float:
    """A trace estimate after the ``negative_traces`` policy (keep, clip to 0, or abs)."""
    if policy not in NEGATIVE_POLICIES:
        raise DetrqError(f"unknown negative_traces policy {policy!r}; choose one of {', '.join(NEGATIVE_POLICIES)}")
    if value >= 0 or policy == "keep":
        return value
    return 0.0 if policy == "clip" else -value


def squared_errors(weights: Mapping[str, Tensor], bits_range: Iterable[int],
                   reference: Mapping[str, Tensor] | None = None, quantizer: WeightQuantizer = EQ6
                   ) -> dict[str, dict[int, float]]:
    """``||Q_b(W) - W_ref||^2`` per layer and bit width, summed in float64 (``W_ref`` = W unless given), with
    ``Q_b`` the chosen quantizer's: the ILP's costs follow the quantizer that will be applied."""
    bits_list = sorted(set(bits_range))
    if not bits_list:
        raise DetrqError("the bits range is empty")
    missing = [n for n in weights if reference is not None and n not in reference]
    if missing:
        raise DetrqError(f"no reference weight for layer {missing[0]!r}")
    out = {}
    for name, w in weights.items():
        w = w.detach()
        ref = (w if reference is None else reference[name].detach()).double()
        out[name] = {b: (quantizer.quantize(name, w, b).double() - ref).pow(2).sum().item() for b in bits_list}
    return out


def paper_costs(avg_traces: Mapping[str, float], weights: Mapping[str, Tensor], bits_range: Iterable[int],
                reference: Mapping[str, Tensor] | None = None, negative_traces: str = "keep",
                quantizer: WeightQuantizer = EQ6) -> dict[str, dict[int, float]]:
    """Eq. (2) / (4): ``avg_trace * ||Q_b(W) - W_ref||^2`` after the ``negative_traces`` policy."""
    missing = [n for n in avg_traces if n not in weights]
    if missing:
        raise DetrqError(f"no weight for layer {missing[0]!r}")
    errors = squared_errors({n: weights[n] for n in avg_traces}, bits_range, reference, quantizer)
    return {n: {b: apply_negative_policy(float(t), negative_traces) * e for b, e in errors[n].items()}
            for n, t in avg_traces.items()}


def first_order_terms(kl_avg_traces: Mapping[str, float], row_norm_sums: Mapping[str, float], l1_scale: float,
                      weights: Mapping[str, Tensor], bits_range: Iterable[int], negative_traces: str = "keep",
                      quantizer: WeightQuantizer = EQ6) -> dict[str, dict[int, dict[str, float]]]:
    """Both predicted terms of the first-order cost per layer and bit: ``{"kl": 1/2 ..., "l1": c sqrt(2/pi) ...}``."""
    missing = [n for n in kl_avg_traces if n not in weights or n not in row_norm_sums]
    if missing:
        raise DetrqError(f"no weight or Jacobian row-norm sum for layer {missing[0]!r}")
    errors = squared_errors({n: weights[n] for n in kl_avg_traces}, bits_range, quantizer=quantizer)
    out = {}
    for n, trace in kl_avg_traces.items():
        trace = apply_negative_policy(float(trace), negative_traces)
        numel = weights[n].numel()
        out[n] = {b: {"kl": 0.5 * trace * e,
                      "l1": l1_scale * _HALF_NORMAL_MEAN * math.sqrt(e / numel) * row_norm_sums[n]}
                  for b, e in errors[n].items()}
    return out


def measured_costs(measured: Mapping[str, Any], bits_range: Iterable[int]) -> dict[str, dict[int, float]]:
    """Measured Sen's table: the measured rise of Eq. (5) with only that layer quantized (``truth.py``)."""
    from detrq.sensitivity.truth import measured_table

    bits_list = sorted(set(bits_range))
    table = measured_table(measured, "rise")
    for name, by_bits in table.items():
        absent = [b for b in bits_list if b not in by_bits]
        if absent:
            raise DetrqError(f"the measured costs have no {absent[0]}-bit entry for {name!r}: measure that bit width")
    return {name: {b: by_bits[b] for b in bits_list} for name, by_bits in table.items()}


def cost_table(traces: Mapping[str, Any], weights: Mapping[str, Tensor], bits_range: Iterable[int],
               negative_traces: str = "keep", quantizer: WeightQuantizer = EQ6) -> dict[str, dict[int, float]]:
    """The ILP's cost table for one traces result (a file written by ``pipeline.run_traces``), for the
    quantizer that will be applied (a measured table must have been measured with that quantizer)."""
    metric = traces.get("metric", "measured" if "reference_bits" in traces else None)
    layers = traces.get("layers")
    if metric not in (*METRICS, FIRST_ORDER, MODELOPT, "measured") or not isinstance(layers, Mapping):
        raise DetrqError(f"not a traces result (metric {metric!r}): pass a file written by `detrq traces`")
    if metric == "measured":
        measured_with = traces.get("settings", {}).get("quantizer", "eq6")
        if measured_with != quantizer.name:
            raise DetrqError(f"these measured costs were measured with the {measured_with} quantizer, not "
                             f"{quantizer.name}: measure them with the quantizer that will be applied")
        return measured_costs(traces, bits_range)
    if metric == MODELOPT:
        return modelopt_costs(traces, bits_range, quantizer)
    if metric == FIRST_ORDER:
        terms = first_order_terms({n: v["kl"]["avg_trace"] for n, v in layers.items()},
                                  {n: v["jacobian"]["sum"] for n, v in layers.items()}, traces["l1_scale"],
                                  weights, bits_range, negative_traces, quantizer)
        return {n: {b: t["kl"] + t["l1"] for b, t in by_bits.items()} for n, by_bits in terms.items()}
    reference = ({n: quantizer.quantize(n, weights[n].detach(), 8) for n in layers if n in weights}
                 if metric == "out-quant" else None)
    return paper_costs({n: v["avg_trace"] for n, v in layers.items()}, weights, bits_range, reference,
                       negative_traces, quantizer)
