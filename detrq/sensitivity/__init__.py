"""Per-layer sensitivities and their check against measured costs.

The package's face hands on the estimators (hutchinson, blockwise, ggn, fisher), the objectives of the paper's three
metrics, the first-order output sensitivity beyond the paper, and the one settings object that drives them. Beside
them: ``distill`` (Eq. (5)), ``costs`` (per-layer, per-bit cost tables for the ILP), ``truth`` (measured costs, one
layer quantized at a time), ``check`` (every metric against them), ``convergence`` and ``stability`` (across probe
seeds and image sets) and ``trace_checks`` (the traces files' own checks).
"""

from detrq.sensitivity.estimates import TraceEstimate, rel_stderr, total_trace
from detrq.sensitivity.estimators import Objective, layer_traces
from detrq.sensitivity.first_order import jacobian_row_norm_sums
from detrq.sensitivity.metrics import distillation_term_traces, first_order_sensitivity, sensitivity
from detrq.sensitivity.objectives import (ALL_METRICS, FIRST_ORDER, METRIC_NAMES, METRICS, approximates, check_metric,
                                          sensitivity_objective, tracing)
from detrq.sensitivity.settings import BLOCKS, ESTIMATORS, JACOBIAN_ESTIMATORS, TraceSettings

__all__ = ["ALL_METRICS", "BLOCKS", "ESTIMATORS", "FIRST_ORDER", "JACOBIAN_ESTIMATORS", "METRICS", "METRIC_NAMES",
           "Objective", "TraceEstimate", "TraceSettings", "check_metric", "distillation_term_traces",
           "first_order_sensitivity", "approximates", "jacobian_row_norm_sums", "layer_traces", "rel_stderr",
           "sensitivity",
           "sensitivity_objective", "total_trace", "tracing"]
