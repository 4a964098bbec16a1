"""The multi-layer output distillation loss of Eq. (5): the objective of the output sensitivity metrics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from detrq.io.errors import DetrqError

KL_DIRECTIONS = ("student||teacher", "teacher||student")
# Eq. (5)'s settings in the paper: temperature T = 6 and KL weight lambda_kl = 0.05.
TEMPERATURE = 6.0
LAMBDA_KL = 0.05


def _output_terms(student_outputs: Mapping[str, Any], teacher_outputs: Mapping[str, Any], temperature: float,
                  lambda_kl: float, kl_direction: str) -> list[tuple[Tensor, Tensor]]:
    """``(lambda_kl * KL, L1)`` of Eq. (5) for the final output and each aux output, in that order."""
    if kl_direction not in KL_DIRECTIONS:
        raise DetrqError(f"kl_direction must be one of {KL_DIRECTIONS}, got {kl_direction!r}")
    student_aux = student_outputs.get("aux_outputs", [])
    teacher_aux = teacher_outputs.get("aux_outputs", [])
    if len(student_aux) != len(teacher_aux):
        raise DetrqError(f"student has {len(student_aux)} aux outputs but teacher has {len(teacher_aux)}")
    terms = []
    for s, t in [(student_outputs, teacher_outputs), *zip(student_aux, teacher_aux)]:
        log_s = F.log_softmax(s["pred_logits"] / temperature, dim=-1)
        log_t = F.log_softmax(t["pred_logits"].detach() / temperature, dim=-1)
        if kl_direction == "teacher||student":
            log_s, log_t = log_t, log_s
        # KL(P || R) = sum_c P_c (log P_c - log R_c), from log-probabilities for stability at T = 6.
        kl = (log_s.exp() * (log_s - log_t)).sum(-1).mean()
        l1 = (s["pred_boxes"] - t["pred_boxes"].detach()).abs().sum(-1).mean()
        terms.append((lambda_kl * kl, l1))
    return terms


def distillation_terms(student_outputs: Mapping[str, Any], teacher_outputs: Mapping[str, Any],
                       temperature: float = 6.0, lambda_kl: float = 0.05,
                       kl_direction: str = "student||teacher") -> dict[str, Tensor]:
    """Eq. (5)'s two terms, each summed over the decoder outputs: ``{"kl": lambda_kl * KL, "l1": L1}``.

    ``distillation_loss`` is their sum (see it for the reductions and the KL order); it adds the terms output
    by output, so ``kl + l1`` can differ from it in the last bit of a float32.
    """
    terms = _output_terms(student_outputs, teacher_outputs, temperature, lambda_kl, kl_direction)
    return {"kl": sum(kl for kl, _ in terms), "l1": sum(l1 for _, l1 in terms)}


def distillation_loss(student_outputs: Mapping[str, Any], teacher_outputs: Mapping[str, Any],
                      temperature: float = 6.0, lambda_kl: float = 0.05,
                      kl_direction: str = "student||teacher") -> Tensor:
    """Eq. (5) summed over the final output and every auxiliary decoder output (multi-layer distillation).

    Per decoder output: ``lambda_kl * KL(softmax(p_s / T) || softmax(p_t / T)) + ||b_s - b_t||_1``, with the
    student's query i compared to the teacher's query i (no Hungarian matching). The KL order is the paper's,
    student first; ``kl_direction="teacher||student"`` gives the usual distillation order instead.

    Reductions: the KL is summed over the C + 1 classes (no-object included) and averaged over queries and
    images; the L1 distance is summed over the 4 cxcywh coordinates and averaged over queries and images. No
    T^2 factor is applied: the paper tuned lambda_kl = 0.05 with T = 6 for this exact form. The per-output
    losses are summed (not averaged) over the 1 + len(aux_outputs) decoder outputs. The teacher's outputs are
    detached: they are constants.

    Note on curvature: the L1 term is piecewise linear in the boxes, so its Hessian w.r.t. the weights is
    ``sign(b_s - b_t) * d^2 b_s / dW^2``, which autograd makes zero where the outputs are identical (sign(0) is
    0). At float weights (Out Sen Float) only the KL term has curvature; at 8-bit weights both terms do.
    """
    # Summed output by output, as ever: the same float operations, so the traces' numbers do not move.
    terms = _output_terms(student_outputs, teacher_outputs, temperature, lambda_kl, kl_direction)
    return sum(kl + l1 for kl, l1 in terms)
