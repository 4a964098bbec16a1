"""The box Jacobian's row-norm sums behind the first-order output sensitivity (beyond the paper).

Eq. (5)'s L1 box term is first order in a weight error: with ``Delta b ~= J_l Delta W_l`` and the quantization
error of layer l modelled as isotropic with per-weight variance ``sigma_l^2``, ``E|Delta b_i| = sqrt(2/pi)
sigma_l ||J_{i,l}||``. So the L1 rise of layer l is predicted by ``S_l = sum_i ||J_{i,l}||``, the sum running over
every box coordinate of every decoder output (aux included) of every Hessian image. Two estimators of ``S_l``:

* ``"rows"`` (unbiased): a probe picks one row i uniformly in each batch and takes one backward of ``b_i``;
  ``N_batch * ||J_{i,l}||`` summed over batches is an unbiased sample of ``S_l`` for every layer at once.
* ``"cauchy-schwarz"`` (an upper bound): ``S_l <= sqrt(N * Tr(J_l' J_l))``, with ``Tr(J_l' J_l)`` from Gaussian
  probes in box space (one backward each, for all layers); tight only when the rows have similar norms. Its
  standard error follows from the trace's by the delta method.

Sharded over torchrun's ranks (``owned``), a rank runs its block of the batches and draws, without a forward
pass, what each skipped batch's probes draw, so the probes are one process's; the per-probe sums are added over
the ranks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from detrq.parallel.distributed import all_reduce_sum
from detrq.sensitivity.estimates import TraceEstimate
from detrq.sensitivity.estimators import probe_loop
from detrq.sensitivity.objectives import decoder_output_count, decoder_outputs
from detrq.sensitivity.settings import TraceSettings


def box_rows(outputs: dict[str, Any]) -> Tensor:
    """Every box coordinate of every decoder output, flattened: ``[decoder outputs * images * queries * 4]``."""
    return torch.stack([o["pred_boxes"] for o in decoder_outputs(outputs)]).flatten()


def _norms(grads: Sequence[Tensor | None], power: int) -> Tensor:
    values = [torch.zeros((), dtype=torch.float64) if g is None else g.double().pow(2).sum().cpu() for g in grads]
    stacked = torch.stack(values)
    return stacked.sqrt() if power == 1 else stacked


def jacobian_row_norm_sums(model: nn.Module, image_batches: Sequence[list[Tensor]], params: Mapping[str, Tensor],
                           settings: TraceSettings, *, owned: range | None = None, progress: bool = False
                           ) -> dict[str, dict[str, Any]]:
    """``S_l = sum_i ||J_{i,l}||`` for every layer in ``params`` (see the module docstring), with its stderr.

    Returns ``{layer: {"sum", "stderr", "n_probes", "n_rows", "estimator", "samples"}}``; the samples are
    ``S_l`` samples for ``"rows"`` and ``Tr(J_l' J_l)`` samples for ``"cauchy-schwarz"``. ``settings.jacobian``
    picks the estimator, ``settings.jacobian_probes`` the number of probes, ``settings.seed`` the seed.
    ``owned``: this torchrun rank's block of the batches (None: all, one process).
    """
    names = list(params)
    tensors = [params[n] for n in names]
    rows_estimator = settings.jacobian == "rows"
    n_rows = 0

    def draw(n: int, generator: torch.Generator) -> Tensor:
        nonlocal n_rows
        out = torch.zeros(n, len(tensors), dtype=torch.float64)
        n_rows = 0
        for b, images in enumerate(image_batches):
            if owned is not None and b not in owned:
                count = decoder_output_count(model) * len(images) * model.num_queries * 4  # box_rows' numel
                n_rows += count
                for _ in range(n):
                    if rows_estimator:
                        torch.randint(count, (1,), generator=generator)
                    else:
                        torch.randn((count,), generator=generator, dtype=torch.float64)
                continue
            rows = box_rows(model(images))
            n_rows += rows.numel()
            for k in range(n):
                if rows_estimator:
                    i = int(torch.randint(rows.numel(), (1,), generator=generator))
                    grads = torch.autograd.grad(rows[i], tensors, retain_graph=k < n - 1, allow_unused=True)
                    out[k] += rows.numel() * _norms(grads, 1)
                else:
                    u = torch.randn(rows.shape, generator=generator, dtype=torch.float64).to(rows)
                    grads = torch.autograd.grad(rows, tensors, grad_outputs=u, retain_graph=k < n - 1,
                                                allow_unused=True)
                    out[k] += _norms(grads, 2)
        return out if owned is None else all_reduce_sum(out)

    # A fixed probe count: the stopping rule is the trace settings' (rel_tol) only for the KL traces.
    fixed = replace(settings, max_probes=settings.jacobian_probes, min_probes=settings.jacobian_probes)
    estimates = probe_loop(draw, names, [t.numel() for t in tensors], fixed, desc=f"jacobian {settings.jacobian}",
                           progress=progress)
    return {n: row_norm_sum(e, n_rows, settings.jacobian) for n, e in estimates.items()}


def row_norm_sum(e: TraceEstimate, n_rows: int, estimator: str) -> dict[str, Any]:
    """``S_l`` and its stderr from the per-probe samples ``e`` of one layer: their mean for ``rows``, and for
    ``cauchy-schwarz`` ``sqrt(n_rows * sum_i ||J_{i,l}||^2)`` with the stderr carried through the square root."""
    if estimator == "rows":
        total, stderr = e.trace, e.stderr
    else:
        trace = max(e.trace, 0.0)
        total = math.sqrt(n_rows * trace)
        stderr = math.sqrt(n_rows) * e.stderr / (2 * math.sqrt(trace)) if trace > 0 else 0.0
    return {"sum": total, "stderr": stderr, "n_probes": e.n_probes, "n_rows": n_rows, "estimator": estimator,
            "samples": e.samples}
