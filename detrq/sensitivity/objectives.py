"""The objectives whose curvature the sensitivity metrics measure, as ``estimators.Objective``s.

* ``"loss"`` (Loss Sen, Eq. (2)): the weighted DETR training loss (Hungarian matching, aux losses) against the
  ground truth, at float weights.
* ``"out-float"`` (Out Sen Float): the Eq. (5) multi-layer distillation loss against the float model's own
  outputs, at float weights.
* ``"out-quant"`` (Out Sen Quant, Eq. (4)): Eq. (5) with the student at uniform 8-bit weights.

Eq. (5) objectives carry their GGN factor. Its KL term's Hessian w.r.t. one query's logits z at the student's
probabilities p = softmax(z / T) is ``c / T^2 (diag(p) - p p')`` (c: lambda_kl times the loss's reduction);
``A = diag(sqrt p) - p sqrt(p)'`` satisfies ``A A' = diag(p) - p p'``, so the cotangent ``s = sqrt(c) / T A u``
with ``u ~ N(0, I)`` is an exact output-space probe. The L1 box term is piecewise linear: its GGN is 0. At float
weights the KL gradient is 0 and the L1 term has no curvature (sign(0) = 0), so there the GGN *is* the Hessian
of Eq. (5) (Out Sen Float, exact). At the 8-bit point it drops the residual curvature of both terms and uses the
Fisher form of the KL Hessian (an approximation, labelled so wherever it is used).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from detrq.io.errors import DetrqError
from detrq.models.criterion import build_criterion, weighted_loss
from detrq.sensitivity.distill import LAMBDA_KL, TEMPERATURE, distillation_loss
from detrq.sensitivity.estimators import Objective

# The paper's three metrics, and the metric beyond the paper (first-order output sensitivity).
METRICS: tuple[str, ...] = ("loss", "out-float", "out-quant")
FIRST_ORDER: str = "out-first-order"
ALL_METRICS: tuple[str, ...] = (*METRICS, FIRST_ORDER)
METRIC_NAMES: dict[str, str] = {"loss": "Loss Sen", "out-float": "Out Sen Float", "out-quant": "Out Sen Quant",
                                FIRST_ORDER: "Out Sen First-Order (beyond the paper)"}


def approximates(metric: str, estimator: str) -> bool:
    """True when ``estimator`` estimates an approximation of ``metric``'s Hessian: the GGN away from float
    weights (Loss Sen, Out Sen Quant; at float weights, Out Sen Float and the first-order KL term, it is exact),
    and the empirical Fisher everywhere."""
    return (estimator == "ggn" and metric in ("loss", "out-quant")) or estimator == "fisher"


def check_metric(metric: str, allowed: tuple[str, ...] = ALL_METRICS) -> str:
    """``metric`` if it is one of ``allowed``, else a one-line ``DetrqError``."""
    if metric not in allowed:
        raise DetrqError(f"unknown sensitivity metric {metric!r}; choose one of {', '.join(allowed)}")
    return metric


def decoder_outputs(outputs: dict[str, Any]) -> list[dict[str, Tensor]]:
    """The final output followed by every auxiliary decoder output: the terms Eq. (5) sums over."""
    return [outputs, *outputs.get("aux_outputs", [])]


def decoder_output_count(model: nn.Module) -> int:
    """``len(decoder_outputs(model(images)))``, known without a forward pass."""
    return model.cfg.dec_layers if model.aux_loss else 1


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


def teacher_outputs_of(model: nn.Module, batches: Sequence[tuple[list[Tensor], Any]]) -> list[dict]:
    """The model's outputs on every batch, without grad: Eq. (5)'s teacher (call at float weights)."""
    # nn.MultiheadAttention's inference fast path (taken only without grad) would make the teacher's kernels
    # differ from the student's; DETR's attention is sequence-first, which never takes it, so at float weights
    # the student reproduces the teacher exactly and Eq. (5) is exactly 0 (tested).
    with torch.no_grad():
        return [model(images) for images, _ in batches]


def kl_ggn_factor(outputs: dict[str, Any], share: float, generator: torch.Generator, *,
                  temperature: float = TEMPERATURE, lambda_kl: float = LAMBDA_KL) -> list[tuple[Tensor, Tensor]]:
    """Output-space GGN probe of Eq. (5)'s KL term for one batch of weight ``share`` (see the module docstring).

    The KL is averaged over images and queries of the batch (distill.py), so each query's Hessian carries
    ``c = share * lambda_kl / (images * queries)``; one cotangent per decoder output's logits.
    """
    pairs = []
    for out in decoder_outputs(outputs):
        logits = out["pred_logits"]
        batch, queries = logits.shape[:2]
        p = torch.softmax(logits.detach().double() / temperature, dim=-1)
        u = torch.randn(logits.shape, generator=generator, dtype=torch.float64).to(logits.device)
        root = p.sqrt()
        s = root * u - p * (root * u).sum(-1, keepdim=True)
        scale = math.sqrt(share * lambda_kl / (batch * queries)) / temperature
        pairs.append((logits, (scale * s).to(logits.dtype)))
    return pairs


def skip_kl_ggn_probe(model: nn.Module, item: tuple[list[Tensor], Any], generator: torch.Generator) -> None:
    """Draw and drop what ``kl_ggn_factor`` draws for ``model``'s outputs on ``item``'s images (same shapes, same
    order), so that a rank that skips the item keeps one process's probe stream."""
    shape = (len(item[0]), model.num_queries, model.cfg.num_classes + 1)
    for _ in range(decoder_output_count(model)):
        torch.randn(shape, generator=generator, dtype=torch.float64)


def sensitivity_objective(model: nn.Module, batches: Sequence[tuple[list[Tensor], list[dict]]], metric: str, *,
                          teacher_outputs: Sequence[dict] | None = None, criterion: nn.Module | None = None,
                          owned: range | None = None) -> Objective:
    """One paper metric's objective over ``batches`` (``(images, targets)``), image-weighted.

    For ``"loss"`` the items are the batches and the loss is the weighted DETR training loss. For the Eq. (5)
    metrics the items are ``(images, teacher outputs)``; the teacher outputs are computed here from the model
    as it is now (so call this at float weights, in eval mode), unless ``teacher_outputs`` are given. ``owned``
    (a torchrun rank's block of the batches, ``Objective.owned``) limits the teacher outputs computed here to it.
    """
    check_metric(metric, METRICS)
    batches = list(batches)
    sizes = [len(images) for images, _ in batches]
    if metric == "loss":
        crit = criterion if criterion is not None else build_criterion(model.cfg.num_classes, model.cfg.dec_layers)

        def training_loss(item: tuple[list[Tensor], list[dict]]) -> Tensor:
            images, targets = item
            return weighted_loss(crit(model(images), targets), crit.weight_dict)

        return Objective.weighted(training_loss, batches, sizes, owned=owned)
    if teacher_outputs is None:
        mine = range(len(batches)) if owned is None else owned
        computed = dict(zip(mine, teacher_outputs_of(model, [batches[i] for i in mine])))
        teacher_outputs = [computed.get(i) for i in range(len(batches))]
    if len(teacher_outputs) != len(batches):
        raise DetrqError(f"got {len(teacher_outputs)} teacher outputs for {len(batches)} batches")

    def output_loss(item: tuple[list[Tensor], dict]) -> Tensor:
        images, teacher = item
        return distillation_loss(model(images), teacher)

    items = [(images, teacher) for (images, _), teacher in zip(batches, teacher_outputs)]
    return Objective.weighted(output_loss, items, sizes, outputs=lambda item: model(item[0]),
                              ggn_factor=kl_ggn_factor, ggn_exact=metric == "out-float", owned=owned,
                              ggn_skip=partial(skip_kl_ggn_probe, model))
