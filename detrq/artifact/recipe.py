"""What ``detrq quantize`` offers and does by default, kept light so that the command line can list it cheaply.

``SCHEME_SPECS`` are the sensitivity schemes a user can pick, estimated as params/default.yaml estimates them for
Table 1 and Table 2 (the configurations whose AP and agreement with measured costs were measured);
``DEFAULT_RECIPE`` is the one that measured best on the embedded default, and ``RECIPE_WHY`` the evidence
(results/tables/table2.md, results/tables/sensitivity_check.json; docs/quantize.md gives the numbers).
"""

from __future__ import annotations

from detrq.sensitivity import FIRST_ORDER
from detrq.sensitivity.modelopt import MODELOPT

# name -> (metric, estimator, variant, (min, max) probes or None): pipeline.Scheme's fields.
SCHEME_SPECS: dict[str, tuple[str, str, bool, tuple[int, int] | None]] = {
    "loss-fisher": ("loss", "fisher", True, None),
    "out-first-order": (FIRST_ORDER, "ggn", False, (20, 30)),
    MODELOPT: (MODELOPT, "fisher", False, None),
    "loss": ("loss", "blockwise", False, (2, 2)),
    "out-float": ("out-float", "ggn", False, (20, 30)),
    "out-quant": ("out-quant", "blockwise", False, (2, 2)),
}
DEFAULT_RECIPE: dict[str, object] = {"metric": "loss-fisher", "quantizer": "gptq", "bits": (3, 8),
                                     "negative_traces": "abs"}
RECIPE_WHY = (
    "GPTQ per-channel with Loss Sen [empirical Fisher] costs, every layer choosing 3-8 bits (Table 2's range): the "
    "highest 4-bit mAP of Table 2 (48.2 against 48.6 in float and 46.7 for uniform 4-bit GPTQ; the first-order "
    "metric's 48.1 and Measured Sen's 48.0 are within the noise of it), GPTQ the best quantizer at every budget, and "
    "in the sensitivity check the metric that ranks layers by their measured 4-bit AP drop best (rho 0.76; 0.97 "
    "against the measured Eq. (5) rise). It is also the cheapest: one backward per image, no probes.")
