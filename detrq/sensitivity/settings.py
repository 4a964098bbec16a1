"""The one settings object of a per-layer sensitivity estimate: it flows from params/ to the estimator.

``TraceSettings`` holds everything that determines a traces file (image sample, batching, estimator, probe
budget, seed), so the cache key is derived from it and no setting can change a result without changing its key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from detrq.io.errors import DetrqError

# hutchinson: one Rademacher probe over all layers, one HVP per probe (the paper's estimator, via HAWQ).
# blockwise: Rademacher probes non-zero on one block of layers at a time: no cross-block variance.
# ggn: generalized Gauss-Newton trace from output-space probes, one backward per probe, samples >= 0.
# fisher: the empirical Fisher's trace, the mean squared per-image gradient: one backward per image, no probes.
ESTIMATORS: tuple[str, ...] = ("hutchinson", "blockwise", "ggn", "fisher")
# Blocks of the blockwise estimator: every layer alone, or the layers of one model region together.
BLOCKS: tuple[str, ...] = ("layer", "region")
# Estimators of the first-order term's Jacobian row-norm sum (see hessian.first_order).
JACOBIAN_ESTIMATORS: tuple[str, ...] = ("rows", "cauchy-schwarz")


@dataclass(frozen=True)
class TraceSettings:
    """How one metric's per-layer estimates are made; every field goes into the traces file and its cache key.

    Probing stops after a pass once ``n >= min_probes`` and every layer's relative standard error is at most
    ``rel_tol``, or at ``max_probes``. For the first-order metric, ``jacobian`` and ``jacobian_probes`` set how
    the Jacobian row-norm sums are estimated; its KL traces use the ``ggn`` estimator with the probe budget
    above.
    """

    num_images: int = 100  # the paper's Hessian image set size
    image_seed: int = 0  # seed of the class-balanced sample
    batch_size: int = 10  # images per forward/backward graph
    estimator: str = "hutchinson"
    blocks: str = "layer"  # blockwise only
    max_probes: int = 100
    min_probes: int = 20
    rel_tol: float = 0.05
    probes_per_pass: int = 10  # probes per graph (more: less graph rebuilding, same numbers)
    seed: int = 0  # probe seed
    jacobian: str = "rows"
    jacobian_probes: int = 64

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise DetrqError(f"unknown estimator {self.estimator!r}; choose one of {', '.join(ESTIMATORS)}")
        if self.blocks not in BLOCKS:
            raise DetrqError(f"unknown blocks {self.blocks!r}; choose one of {', '.join(BLOCKS)}")
        if self.jacobian not in JACOBIAN_ESTIMATORS:
            raise DetrqError(f"unknown jacobian estimator {self.jacobian!r}; choose one of "
                             f"{', '.join(JACOBIAN_ESTIMATORS)}")
        if not 1 <= self.min_probes <= self.max_probes or self.probes_per_pass < 1 or self.jacobian_probes < 2:
            raise DetrqError(f"need 1 <= min_probes ({self.min_probes}) <= max_probes ({self.max_probes}), "
                             f"probes_per_pass >= 1 and jacobian_probes >= 2")
        if self.num_images < 1 or self.batch_size < 1:
            raise DetrqError("num_images and batch_size must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
