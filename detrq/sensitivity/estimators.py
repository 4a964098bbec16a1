"""Per-layer trace estimators behind one setting (``TraceSettings.estimator``): hutchinson, blockwise, ggn, and
the empirical Fisher.

All three share one probing loop (``_probe``): each pass draws ``probes_per_pass`` probes from a
``torch.Generator`` seeded with ``settings.seed``, rebuilds each item's graph once and reuses it for all probes
of the pass, and convergence is checked after the pass. Each returns ``{layer: TraceEstimate}`` with the
per-probe samples, so that every trace has a standard error.

* ``hutchinson``: one Rademacher vector ``v`` over all layers and one Hessian-vector product per probe; the
  sample of layer l is ``v_l . (H v)_l = v_l' H_ll v_l + sum_{k != l} v_l' H_lk v_k``. The second, cross-block
  sum has mean 0 but is often the larger part of the variance on a deep network.
* ``blockwise``: the same Rademacher draws, but each probe is applied to one block at a time (one layer, or the
  layers of one model region), one HVP per block: the cross-block sum is gone and only the within-block
  variance ``2 (||H_ll||_F^2 - sum_i H_ii^2)`` remains, at ``blocks`` times the cost.
* ``ggn``: the generalized Gauss-Newton trace ``Tr(J_l' H_out J_l)``, for objectives that supply an
  output-space factor ``S`` with ``S S' = H_out``: with ``u ~ N(0, I)`` and ``s = S u``, the squared norm of
  layer l's part of ``J' s`` is a non-negative, unbiased sample of it. One backward per probe, no double backward.
* ``fisher`` (beyond the paper; the authors' follow-up uses it): the trace of the empirical Fisher
  ``1/N sum_i g_i g_i'`` with ``g_i`` the gradient of image i's loss, i.e. the mean of ``||g_{i,l}||^2`` over the
  images. Each item must be one image (``metrics.sensitivity`` splits the batches); its samples are per image,
  so its standard error is over images, and no probe or seed enters it.

Sharded over torchrun's ranks (``Objective.owned``), each rank evaluates its block of the items with their
global shares and draws every probe as one process would (the items it skips still consume their draws), the
per-probe sums are added over the ranks after each pass (so every rank takes the same convergence decision), and
the Fisher's per-image samples are gathered in item order: the numbers are one process's, up to the order of
float64 additions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from detrq.io.errors import DetrqError
from detrq.parallel.distributed import all_gather, all_reduce_sum
from detrq.quant.bitmaps import layer_region
from detrq.sensitivity.estimates import TraceEstimate
from detrq.sensitivity.settings import TraceSettings

# ggn_factor(outputs, share, generator) -> [(output tensor, cotangent)]: cotangents s with E[s s'] = share * H_out.
GGNFactor = Callable[[Any, float, torch.Generator], list[tuple[Tensor, Tensor]]]
# ggn_skip(item, generator): draw and drop what ggn_factor draws for ``item``, without its outputs.
GGNSkip = Callable[[Any, torch.Generator], None]


@dataclass
class Objective:
    """A scalar objective ``sum_k share_k * loss(item_k)`` over items (image batches), as the estimators see it.

    ``loss(item)`` is one item's loss with its graph. For ``ggn``, ``outputs(item)`` gives the model outputs
    and ``ggn_factor`` the output-space probe (None: the objective has no GGN form here). ``ggn_exact`` says
    whether the GGN equals this objective's Hessian at the current weights (Out Sen Float) or approximates it.

    ``owned`` shards the objective over torchrun's ranks: this rank evaluates only those items (the others may
    lack what only their loss needs, e.g. teacher outputs) and the estimators sum the ranks' parts; ``ggn_skip``
    keeps the probe stream of the items it skips. None: one process evaluates every item.
    """

    loss: Callable[[Any], Tensor]
    items: list[Any] = field(default_factory=lambda: [None])
    shares: list[float] = field(default_factory=lambda: [1.0])
    outputs: Callable[[Any], Any] | None = None
    ggn_factor: GGNFactor | None = None
    ggn_exact: bool = False
    owned: range | None = None
    ggn_skip: GGNSkip | None = None

    @property
    def mine(self) -> range:
        """The indices of the items this process evaluates."""
        return range(len(self.items)) if self.owned is None else self.owned

    def ranks_sum(self, t: Tensor) -> Tensor:
        """A per-probe block summed over the ranks that share this objective (itself in one process)."""
        return t if self.owned is None else all_reduce_sum(t)

    @classmethod
    def weighted(cls, loss: Callable[[Any], Tensor], items: Sequence[Any] | None = None,
                 weights: Sequence[float] | None = None, **kwargs: Any) -> Objective:
        """The weighted mean of ``loss`` over ``items`` (default: one call ``loss(None)``); ``weights``
        default to equal (pass the batch sizes to weight by images)."""
        items = [None] if items is None else list(items)
        if not items:
            raise DetrqError("the objective has no items (empty batches)")
        weights = [1.0] * len(items) if weights is None else [float(w) for w in weights]
        if len(weights) != len(items) or sum(weights) <= 0 or min(weights) < 0:
            raise DetrqError(f"need one non-negative weight per item ({len(items)}), got {len(weights)}")
        return cls(loss, items, [w / sum(weights) for w in weights], **kwargs)


def _rademacher(shape: torch.Size, generator: torch.Generator, device: torch.device) -> Tensor:
    # Drawn on the CPU generator, then moved: the same seed gives the same probes on any device. Kept as int8
    # (a pass holds probes_per_pass of them: 0.4 GB for DETR-R50's 41M weights, not 1.6 GB in float32).
    v = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8)
    return (2 * v - 1).to(device)


def _check_params(params: Mapping[str, Tensor]) -> tuple[list[str], list[Tensor]]:
    if not params:
        raise DetrqError("no parameters to trace")
    names = list(params)
    tensors = [params[n] for n in names]
    frozen = [n for n, t in zip(names, tensors) if not t.requires_grad]
    if frozen:
        raise DetrqError(f"every traced tensor must require grad; {frozen[0]!r} does not")
    return names, tensors


def _groups(names: list[str], settings: TraceSettings) -> list[list[int]]:
    if settings.estimator != "blockwise" or settings.blocks == "layer":
        return [[i] for i in range(len(names))]
    regions: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        regions.setdefault(layer_region(n), []).append(i)
    return list(regions.values())


def _hvp_pass(objective: Objective, tensors: list[Tensor], groups: list[list[int]] | None, n_new: int,
              generator: torch.Generator) -> Tensor:
    """``v_l . (H v)_l`` for ``n_new`` Rademacher probes; with ``groups``, each probe hits one group at a time."""
    probes = [[_rademacher(t.shape, generator, t.device) for t in tensors] for _ in range(n_new)]
    out = torch.zeros(n_new, len(tensors), dtype=torch.float64)
    zero = torch.zeros((), dtype=torch.float64, device=tensors[0].device)
    for item_index in objective.mine:
        item, share = objective.items[item_index], objective.shares[item_index]
        grads = torch.autograd.grad(objective.loss(item), tensors, create_graph=True, allow_unused=True)
        # A gradient without a graph does not depend on any traced tensor: its rows of H are zero.
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        blocks = [live] if groups is None else [[i for i in g if i in live] for g in groups]
        blocks = [b for b in blocks if b]
        for k, v in enumerate(probes):
            for j, block in enumerate(blocks):
                last = k == n_new - 1 and j == len(blocks) - 1
                # Hutchinson differentiates w.r.t. every layer (cross-block terms included); blockwise only
                # w.r.t. the block it probes.
                wrt = tensors if groups is None else [tensors[i] for i in block]
                hv = torch.autograd.grad([grads[i] for i in block], wrt,
                                         grad_outputs=[v[i].to(tensors[i].dtype) for i in block],
                                         retain_graph=not last, allow_unused=True)
                index = range(len(tensors)) if groups is None else block
                dots = [zero if h is None else (h * v[i]).sum(dtype=torch.float64) for i, h in zip(index, hv)]
                out[k, list(index)] += share * torch.stack(dots).cpu()  # one sync per HVP, not per layer
        del grads
    return objective.ranks_sum(out)


def _ggn_pass(objective: Objective, tensors: list[Tensor], n_new: int, generator: torch.Generator) -> Tensor:
    """``||(J' S u)_l||^2`` summed over items, for ``n_new`` Gaussian output-space probes ``u``."""
    out = torch.zeros(n_new, len(tensors), dtype=torch.float64)
    for index, (item, share) in enumerate(zip(objective.items, objective.shares)):
        if index not in objective.mine:
            for _ in range(n_new):
                objective.ggn_skip(item, generator)
            continue
        outputs = objective.outputs(item)
        for k in range(n_new):
            pairs = objective.ggn_factor(outputs, share, generator)
            grads = torch.autograd.grad([o for o, _ in pairs], tensors, grad_outputs=[s for _, s in pairs],
                                        retain_graph=k < n_new - 1, allow_unused=True)
            zero = torch.zeros((), dtype=torch.float64, device=tensors[0].device)
            out[k] += torch.stack([zero if g is None else g.double().pow(2).sum() for g in grads]).cpu()
        del outputs
    return objective.ranks_sum(out)


def probe_loop(draw: Callable[[int, torch.Generator], Tensor], names: list[str], numel: list[int],
               settings: TraceSettings, *, desc: str, progress: bool = False) -> dict[str, TraceEstimate]:
    """The shared probing loop: ``draw(n, generator)`` gives ``[n, layers]`` samples; passes of
    ``probes_per_pass`` until ``min_probes`` are in and every relative stderr is ``<= rel_tol``, or
    ``max_probes``."""
    generator = torch.Generator().manual_seed(settings.seed)
    samples: list[list[float]] = [[] for _ in names]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=settings.max_probes, desc=desc, unit="probe")
    estimates: dict[str, TraceEstimate] = {}
    while len(samples[0]) < settings.max_probes:
        n_new = min(settings.probes_per_pass, settings.max_probes - len(samples[0]))
        block = draw(n_new, generator)
        for row in block.tolist():
            for i, value in enumerate(row):
                samples[i].append(value)
        estimates = {n: TraceEstimate.from_samples(s, k) for n, s, k in zip(names, samples, numel)}
        worst = max(e.rel_stderr for e in estimates.values())
        if bar is not None:
            bar.update(n_new)
            bar.set_postfix(max_rel_stderr=f"{worst:.3f}")
        if len(samples[0]) >= settings.min_probes and worst <= settings.rel_tol:
            break
    if bar is not None:
        bar.close()
    return estimates


def _fisher(objective: Objective, names: list[str], tensors: list[Tensor], numel: list[int], *,
            progress: bool = False) -> dict[str, TraceEstimate]:
    """Per-image squared gradient norms of every layer: the empirical Fisher's samples (equal item shares)."""
    if len(set(objective.shares)) > 1:
        raise DetrqError("the empirical Fisher needs one image per item with equal weights")
    items = [objective.items[i] for i in objective.mine]
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="fisher (per image)", unit="image")
    samples: list[list[float]] = [[] for _ in names]
    for item in items:
        grads = torch.autograd.grad(objective.loss(item), tensors, allow_unused=True)
        for i, g in enumerate(grads):
            samples[i].append(0.0 if g is None else g.double().pow(2).sum().item())
    if objective.owned is not None:  # the ranks' blocks, in rank order: every image's sample in item order
        parts = all_gather(samples)
        samples = [[v for part in parts for v in part[i]] for i in range(len(names))]
    return {n: TraceEstimate.from_samples(s, k) for n, s, k in zip(names, samples, numel)}


def layer_traces(objective: Objective, params: Mapping[str, Tensor], settings: TraceSettings = TraceSettings(),
                 *, progress: bool = False) -> dict[str, TraceEstimate]:
    """Per-layer traces of ``objective``'s Hessian diagonal blocks (or of its GGN), one block per tensor in
    ``params``, with ``settings.estimator``; see the module docstring for what each estimator samples.

    The same seed and inputs give the same numbers, whatever ``probes_per_pass`` is.
    """
    names, tensors = _check_params(params)
    numel = [t.numel() for t in tensors]
    if settings.estimator == "fisher":
        return _fisher(objective, names, tensors, numel, progress=progress)
    if settings.estimator == "ggn":
        if objective.ggn_factor is None or objective.outputs is None:
            raise DetrqError("this objective has no generalized Gauss-Newton form; use estimator hutchinson or "
                             "blockwise")
        if objective.owned is not None and objective.ggn_skip is None:
            raise DetrqError("this objective cannot skip other ranks' ggn probes; run it in one process")

        def draw(n: int, g: torch.Generator) -> Tensor:
            return _ggn_pass(objective, tensors, n, g)
    else:
        groups = _groups(names, settings) if settings.estimator == "blockwise" else None

        def draw(n: int, g: torch.Generator) -> Tensor:
            return _hvp_pass(objective, tensors, groups, n, g)
    return probe_loop(draw, names, numel, settings, desc=f"{settings.estimator} probes", progress=progress)
