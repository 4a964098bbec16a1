"""Per-layer sensitivities of a DETR model: the paper's three Hessian metrics and the first-order metric.

``sensitivity`` wires an objective (objectives.py) to an estimator (estimators.py) for the paper's metrics;
``first_order_sensitivity`` gives both terms of the first-order output sensitivity; ``distillation_term_traces``
splits Eq. (5)'s curvature into its L1 and KL terms (footnote 1's check).

Inside a torchrun process group (``detrq.parallel.distributed``) ``sensitivity`` and ``first_order_sensitivity`` shard
the batches over the ranks and return one process's estimates on every rank; ``distillation_term_traces`` does
not shard.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from detrq.parallel import distributed
from detrq.quant.bitmaps import quantizable_layers, quantized, uniform_bit_map
from detrq.sensitivity.distill import distillation_loss
from detrq.sensitivity.estimates import TraceEstimate
from detrq.sensitivity.estimators import Objective, layer_traces
from detrq.sensitivity.first_order import jacobian_row_norm_sums
from detrq.sensitivity.objectives import METRICS, check_metric, sensitivity_objective, teacher_outputs_of, tracing
from detrq.sensitivity.settings import TraceSettings

Batches = Sequence[tuple[list[Tensor], list[dict]]]


def sensitivity(model: nn.Module, batches: Batches, metric: str, settings: TraceSettings = TraceSettings(), *,
                teacher_outputs: Sequence[dict] | None = None, criterion: nn.Module | None = None,
                quant_bits: int = 8, layers: Iterable[str] | None = None, progress: bool = False
                ) -> dict[str, TraceEstimate]:
    """Per-layer Hessian (or GGN) traces of a DETR model for one of the paper's metrics, with ``settings``.

    ``batches`` are ``(images, targets)`` pairs; the objective is the image-weighted mean loss. For
    ``"out-quant"`` the student's quantizable layers are at uniform ``quant_bits`` (Eq. (6)) while the teacher
    is the float model; the traces are taken at that point and the float weights are restored exactly.
    Teacher outputs are computed once from the float model (or passed in, one per batch). ``layers`` (default:
    ``quantizable_layers(model)``) are the traced tensors; see ``tracing`` for the eval mode and
    ``requires_grad`` handling. Inside a torchrun process group each rank evaluates its block of the batches.
    """
    check_metric(metric, METRICS)
    batches = list(batches)
    if settings.estimator == "fisher":
        batches = per_image(batches)
    names = list(quantizable_layers(model)) if layers is None else list(layers)
    # The student is the uniformly quantized model, whichever layers are traced.
    student_bits = uniform_bit_map(model, quant_bits) if metric == "out-quant" else {}
    with tracing(model, names) as params:
        objective = sensitivity_objective(model, batches, metric, teacher_outputs=teacher_outputs,
                                          criterion=criterion, owned=rank_block(len(batches)))
        with quantized(model, student_bits):
            return layer_traces(objective, params, settings, progress=progress)


def rank_block(n: int) -> range | None:
    """This torchrun rank's block of ``n`` batches (whole batches: DETR's outputs depend on the batch padding);
    None in one process."""
    return distributed.shard(n) if distributed.active() else None


def per_image(batches: Batches) -> list[tuple[list[Tensor], list[dict]]]:
    """The same images as one-image batches (the empirical Fisher needs each image's own gradient)."""
    return [([image], [target]) for images, targets in batches for image, target in zip(images, targets)]


def first_order_sensitivity(model: nn.Module, batches: Batches, settings: TraceSettings = TraceSettings(), *,
                            layers: Iterable[str] | None = None, progress: bool = False,
                            kl: Mapping[str, TraceEstimate] | None = None) -> dict[str, Any]:
    """Both per-layer terms of the first-order output sensitivity, at float weights.

    ``"kl"``: the Eq. (5) Hessian traces at float weights (= the KL term's, = its GGN), with
    ``settings.estimator`` (``ggn`` by default in params: exact there), or ``kl`` when given (Out Sen Float's
    traces with the same settings are these very numbers); ``"jacobian"``: the box Jacobian's
    row-norm sums ``S_l`` (``first_order.jacobian_row_norm_sums``); ``"l1_scale"``: Eq. (5)'s L1 normalisation
    ``1 / (images * queries)`` that turns ``S_l`` into a loss; ``"num_images"``, ``"num_queries"``.
    """
    batches = list(batches)
    names = list(quantizable_layers(model)) if layers is None else list(layers)
    if kl is None:
        kl = sensitivity(model, batches, "out-float", settings, layers=names, progress=progress)
    with tracing(model, names) as params:
        jac = jacobian_row_norm_sums(model, [images for images, _ in batches], params, settings,
                                     owned=rank_block(len(batches)), progress=progress)
    num_images = sum(len(images) for images, _ in batches)
    return {"kl": kl, "jacobian": jac, "l1_scale": 1.0 / (num_images * model.num_queries),
            "num_images": num_images, "num_queries": model.num_queries}


def distillation_term_traces(model: nn.Module, batches: Batches, *, quant_bits: int | None = None,
                             layers: Iterable[str] | None = None, probes: int = 4, seed: int = 0
                             ) -> dict[str, dict[str, TraceEstimate]]:
    """Hutchinson traces of Eq. (5) and of its L1 box term alone, with the same probes.

    Returns ``{"eq5": ..., "l1": ..., "kl": ...}``, each ``{layer: TraceEstimate}``. ``"l1"`` is Eq. (5) with
    ``lambda_kl = 0``; ``"kl"`` is the per-probe difference ``eq5 - l1``, which is exactly the Hutchinson
    estimate of the KL term's Hessian because ``v.(H v)`` is linear in H and both runs draw the same probes.

    The check this serves (footnote 1 of the paper): at float weights the student equals the teacher, the
    L1 term's Hessian ``sign(b_s - b_t) * d2 b_s/dW2`` is 0 because ``sign(0) = 0``, and all the curvature of
    Out Sen Float comes from the KL term. With ``quant_bits`` the student is at uniform ``quant_bits``
    (Out Sen Quant's point), where both terms have curvature. The teacher is the float model.
    """
    batches = list(batches)
    names = list(quantizable_layers(model)) if layers is None else list(layers)
    student_bits = uniform_bit_map(model, quant_bits) if quant_bits is not None else {}
    settings = TraceSettings(estimator="hutchinson", max_probes=probes, min_probes=probes, probes_per_pass=probes,
                             seed=seed)
    losses = {"eq5": distillation_loss, "l1": lambda s, t: distillation_loss(s, t, lambda_kl=0.0)}
    sizes = [len(images) for images, _ in batches]
    estimates: dict[str, dict[str, TraceEstimate]] = {}
    with tracing(model, names) as params:
        items = [(images, t) for (images, _), t in zip(batches, teacher_outputs_of(model, batches))]
        with quantized(model, student_bits):
            for term, loss in losses.items():
                objective = Objective.weighted(lambda item, loss=loss: loss(model(item[0]), item[1]), items, sizes)
                estimates[term] = layer_traces(objective, params, settings)
    eq5, l1 = estimates["eq5"], estimates["l1"]
    estimates["kl"] = {
        n: TraceEstimate.from_samples([a - b for a, b in zip(eq5[n].samples, l1[n].samples)], eq5[n].numel)
        for n in names
    }
    return estimates
