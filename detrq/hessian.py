"""Hutchinson estimates of per-layer Hessian traces, and the paper's three sensitivity objectives.

``layer_traces`` is generic: any scalar loss, any named tensors. ``sensitivity`` wires it to DETR for the
three metrics compared in the paper: the training loss (Loss Sen, Eq. (2)), the Eq. (5) distillation loss at
float weights (Out Sen Float) and at uniform 8-bit weights (Out Sen Quant, Eq. (4)).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from detrq.distill import distillation_loss
from detrq.errors import DetrqError
from detrq.models.criterion import build_criterion, weighted_loss
from detrq.quant import quantizable_layers, quantized, uniform_bit_map

METRICS = ("loss", "out-float", "out-quant")


@dataclass
class TraceEstimate:
    """Hutchinson estimate of one layer's Hessian trace.

    ``trace`` is the mean of the per-probe samples ``v_l . (H v)_l``, ``stderr`` its standard error
    (sample standard deviation / sqrt(n_probes)), and ``avg_trace = trace / numel`` is the paper's averaged
    trace Tr(H_W)/|W| used in Eq. (2) and (4).
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


def _rademacher(shape: torch.Size, generator: torch.Generator, device: torch.device) -> Tensor:
    # Drawn on the CPU generator, then moved: the same seed gives the same probes on any device. Kept as int8
    # (a pass holds probes_per_pass of them: 0.4 GB for DETR-R50's 41M weights, not 1.6 GB in float32).
    v = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8)
    return (2 * v - 1).to(device)


def layer_traces(
    loss_fn: Callable[..., Tensor],
    params: Mapping[str, Tensor],
    *,
    batches: Sequence[Any] | None = None,
    batch_weights: Sequence[float] | None = None,
    max_probes: int = 200,
    min_probes: int = 10,
    rel_tol: float = 0.05,
    probes_per_pass: int = 10,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, TraceEstimate]:
    """Hutchinson traces of the Hessian's diagonal blocks, one block per tensor in ``params``.

    Each probe is one Rademacher vector ``v`` over all tensors at once and one Hessian-vector product (double
    backward); ``v_l . (H v)_l`` is an unbiased sample of ``Tr(H_ll)`` for every layer l at the same time,
    because the cross-block terms ``v_l . H_lm v_m`` vanish in expectation. ``loss_fn()`` returns the scalar
    loss; with ``batches``, ``loss_fn(batch)`` does and the Hessian is that of the weighted mean over batches
    (``batch_weights``, default equal; pass the batch sizes to weight by samples): every batch sees the same
    probe and its ``v.Hv`` is accumulated with its share of the weight.

    Cost: each pass builds one graph per batch (forward + backward with ``create_graph``) and reuses it for
    ``probes_per_pass`` probes, each then costing one double backward. Convergence is checked after each
    pass: it stops once ``n >= min_probes`` and every layer's relative standard error ``stderr/|trace|`` is
    ``<= rel_tol``, or at ``max_probes``. Probes come from a ``torch.Generator`` seeded with ``seed``: the same
    seed and inputs give the same numbers.
    """
    if not params:
        raise DetrqError("layer_traces: no parameters to trace")
    if not 1 <= min_probes <= max_probes or probes_per_pass < 1:
        raise DetrqError(f"need 1 <= min_probes ({min_probes}) <= max_probes ({max_probes}) and probes_per_pass >= 1")
    names = list(params)
    tensors = [params[n] for n in names]
    frozen = [n for n, t in zip(names, tensors) if not t.requires_grad]
    if frozen:
        raise DetrqError(f"layer_traces: every traced tensor must require grad; {frozen[0]!r} does not")
    items = [None] if batches is None else list(batches)
    if not items:
        raise DetrqError("layer_traces: batches is empty")
    weights = [1.0] * len(items) if batch_weights is None else [float(w) for w in batch_weights]
    if len(weights) != len(items) or sum(weights) <= 0:
        raise DetrqError(f"layer_traces: need one positive weight per batch ({len(items)}), got {len(weights)}")
    shares = [w / sum(weights) for w in weights]

    generator = torch.Generator().manual_seed(seed)
    samples: list[list[float]] = [[] for _ in names]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_probes, desc="Hutchinson probes", unit="probe")
    while len(samples[0]) < max_probes:
        n_new = min(probes_per_pass, max_probes - len(samples[0]))
        probes = [[_rademacher(t.shape, generator, t.device) for t in tensors] for _ in range(n_new)]
        vhv = torch.zeros(n_new, len(names), dtype=torch.float64)
        for item, share in zip(items, shares):
            loss = loss_fn() if batches is None else loss_fn(item)
            grads = torch.autograd.grad(loss, tensors, create_graph=True, allow_unused=True)
            # A gradient without a graph does not depend on any traced tensor: its rows of H are zero.
            live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            for k, v in enumerate(probes if live else []):
                hv = torch.autograd.grad([grads[i] for i in live], tensors,
                                         grad_outputs=[v[i].to(tensors[i].dtype) for i in live],
                                         retain_graph=k < n_new - 1, allow_unused=True)
                zero = torch.zeros((), dtype=torch.float64, device=tensors[0].device)
                dots = [zero if h is None else (h * v_l).sum(dtype=torch.float64) for h, v_l in zip(hv, v)]
                vhv[k] += share * torch.stack(dots).cpu()  # one device sync per probe, not one per layer
            del loss, grads
        for k in range(n_new):
            for i, value in enumerate(vhv[k].tolist()):
                samples[i].append(value)
        estimates = {n: TraceEstimate.from_samples(s, params[n].numel()) for n, s in zip(names, samples)}
        worst = max(e.rel_stderr for e in estimates.values())
        if bar is not None:
            bar.update(n_new)
            bar.set_postfix(max_rel_stderr=f"{worst:.3f}")
        if len(samples[0]) >= min_probes and worst <= rel_tol:
            break
    if bar is not None:
        bar.close()
    return estimates


@contextmanager
def tracing(model: nn.Module, names: Iterable[str]) -> Iterator[dict[str, nn.Parameter]]:
    """Eval mode (no dropout) and ``requires_grad`` on exactly ``names``; yields those parameters.

    Parameters that are not traced get no graph and no gradient. The flags and the train/eval mode are
    restored on exit.
    """
    all_params = dict(model.named_parameters())
    names = list(names)
    unknown = [n for n in names if n not in all_params]
    if unknown:
        raise DetrqError(f"layer {unknown[0]!r} is not a parameter of the model")
    was_training = model.training
    flags = {n: p.requires_grad for n, p in all_params.items()}
    model.eval()
    try:
        for n, p in all_params.items():
            p.requires_grad_(n in names)
        yield {n: all_params[n] for n in names}
    finally:
        for n, p in all_params.items():
            p.requires_grad_(flags[n])
        model.train(was_training)


def sensitivity_objective(
    model: nn.Module,
    batches: Sequence[tuple[list[Tensor], list[dict]]],
    metric: str,
    *,
    teacher_outputs: Sequence[dict] | None = None,
    criterion: nn.Module | None = None,
) -> tuple[Callable[[Any], Tensor], list[Any]]:
    """The loss of one sensitivity metric as ``(loss_fn, items)``, ``loss_fn(item)`` being one batch's loss.

    For ``"loss"`` the items are the ``(images, targets)`` batches and the loss is the weighted DETR training
    loss. For ``"out-float"`` and ``"out-quant"`` the items are ``(images, teacher outputs)`` and the loss is
    Eq. (5) against the teacher: the teacher outputs are computed here, once per batch and without grad, from
    the model as it is now (so call this at float weights, in eval mode), unless ``teacher_outputs`` are given.
    """
    if metric not in METRICS:
        raise DetrqError(f"unknown sensitivity metric {metric!r}; choose one of {METRICS}")
    if metric == "loss":
        crit = criterion if criterion is not None else build_criterion(model.cfg.num_classes, model.cfg.dec_layers)

        def training_loss(item: tuple[list[Tensor], list[dict]]) -> Tensor:
            images, targets = item
            return weighted_loss(crit(model(images), targets), crit.weight_dict)

        return training_loss, list(batches)
    if teacher_outputs is None:
        # nn.MultiheadAttention's inference fast path (taken only without grad) would make the teacher's
        # kernels differ from the student's; DETR's attention is sequence-first, which never takes it, so at
        # float weights the student reproduces the teacher exactly and Eq. (5) is exactly 0 (tested).
        with torch.no_grad():
            teacher_outputs = [model(images) for images, _ in batches]
    if len(teacher_outputs) != len(batches):
        raise DetrqError(f"got {len(teacher_outputs)} teacher outputs for {len(batches)} batches")

    def output_loss(item: tuple[list[Tensor], dict]) -> Tensor:
        images, teacher = item
        return distillation_loss(model(images), teacher)

    return output_loss, [(images, teacher) for (images, _), teacher in zip(batches, teacher_outputs)]


def sensitivity(
    model: nn.Module,
    batches: Sequence[tuple[list[Tensor], list[dict]]],
    metric: str,
    *,
    teacher_outputs: Sequence[dict] | None = None,
    criterion: nn.Module | None = None,
    quant_bits: int = 8,
    layers: Iterable[str] | None = None,
    max_probes: int = 200,
    min_probes: int = 10,
    rel_tol: float = 0.05,
    probes_per_pass: int = 10,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, TraceEstimate]:
    """Per-layer Hessian traces of a DETR model for one of the paper's sensitivity metrics.

    ``batches`` are ``(images, targets)`` pairs; the Hessian is that of the image-weighted mean loss.

    * ``"loss"`` (Loss Sen, Eq. (2)): the weighted DETR training loss (Hungarian matching, aux losses) against
      the ground-truth targets, at float weights. ``criterion`` defaults to ``build_criterion`` for the
      model's classes and decoder layers.
    * ``"out-float"`` (Out Sen Float): Eq. (5) multi-layer distillation against the float model's own
      outputs, at float weights.
    * ``"out-quant"`` (Out Sen Quant, Eq. (4)): Eq. (5) with the student's quantizable layers at uniform
      ``quant_bits`` (Eq. (6)) and the float teacher; the traces are taken at that quantized point and the
      float weights are restored exactly afterwards.

    Teacher outputs are computed once per batch from the float model without grad (or passed in, one per
    batch) and reused for every probe. ``layers`` (default: ``quantizable_layers(model)``) are the traced
    tensors; see ``tracing`` for the eval mode and ``requires_grad`` handling. The probe settings are
    ``layer_traces``'.
    """
    batches = list(batches)
    names = list(quantizable_layers(model)) if layers is None else list(layers)
    # The student is the uniformly quantized model, whichever layers are traced.
    student_bits = uniform_bit_map(model, quant_bits) if metric == "out-quant" else {}
    with tracing(model, names) as params:
        loss_fn, items = sensitivity_objective(model, batches, metric, teacher_outputs=teacher_outputs,
                                               criterion=criterion)
        with quantized(model, student_bits):
            return layer_traces(
                loss_fn, params, batches=items, batch_weights=[len(images) for images, _ in batches],
                max_probes=max_probes, min_probes=min_probes, rel_tol=rel_tol, probes_per_pass=probes_per_pass,
                seed=seed, progress=progress,
            )


def distillation_term_traces(
    model: nn.Module,
    batches: Sequence[tuple[list[Tensor], list[dict]]],
    *,
    quant_bits: int | None = None,
    layers: Iterable[str] | None = None,
    probes: int = 4,
    seed: int = 0,
) -> dict[str, dict[str, TraceEstimate]]:
    """Hutchinson traces of Eq. (5) and of its L1 box term alone, with the same probes.

    Returns ``{"eq5": ..., "l1": ..., "kl": ...}``, each ``{layer: TraceEstimate}``. ``"l1"`` is Eq. (5) with
    ``lambda_kl = 0``; ``"kl"`` is the per-probe difference ``eq5 - l1``, which is exactly the Hutchinson
    estimate of the KL term's Hessian because ``v.(H v)`` is linear in H and both runs draw the same probes.

    The check this serves (footnote 1 of the paper): at float weights the student equals the teacher, the
    L1 term's Hessian ``sign(b_s - b_t) * d2 b_s/dW2`` is 0 because ``sign(0) = 0``, and all the curvature of
    Out Sen Float comes from the KL term. With ``quant_bits`` the student is at uniform ``quant_bits``
    (Out Sen Quant's point), where both terms have curvature. The teacher is the float model, as in
    ``sensitivity``.
    """
    batches = list(batches)
    names = list(quantizable_layers(model)) if layers is None else list(layers)
    student_bits = uniform_bit_map(model, quant_bits) if quant_bits is not None else {}
    losses = {"eq5": distillation_loss, "l1": lambda s, t: distillation_loss(s, t, lambda_kl=0.0)}
    estimates: dict[str, dict[str, TraceEstimate]] = {}
    with tracing(model, names) as params:
        _, items = sensitivity_objective(model, batches, "out-float")  # (images, float teacher) per batch
        with quantized(model, student_bits):
            for term, loss in losses.items():
                estimates[term] = layer_traces(
                    lambda item, loss=loss: loss(model(item[0]), item[1]), params, batches=items,
                    batch_weights=[len(images) for images, _ in batches], max_probes=probes, min_probes=probes,
                    probes_per_pass=probes, seed=seed,
                )
    eq5, l1 = estimates["eq5"], estimates["l1"]
    estimates["kl"] = {
        n: TraceEstimate.from_samples([a - b for a, b in zip(eq5[n].samples, l1[n].samples)], eq5[n].numel)
        for n in names
    }
    return estimates


def total_trace(estimates: Mapping[str, TraceEstimate]) -> dict[str, float]:
    """The trace summed over layers, with its standard error from the per-probe sums (same probes per layer),
    and the layers whose every sample is exactly 0 (no curvature at all, e.g. box-only layers under the L1 term
    at float weights)."""
    per_probe = [math.fsum(s) for s in zip(*(e.samples for e in estimates.values()))]
    total = TraceEstimate.from_samples(per_probe, sum(e.numel for e in estimates.values()))
    return {"trace": total.trace, "stderr": total.stderr, "n_probes": total.n_probes,
            "max_abs_layer_trace": max(abs(e.trace) for e in estimates.values()),
            "zero_layers": [n for n, e in estimates.items() if not any(e.samples)]}
