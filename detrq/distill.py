"""The multi-layer output distillation loss of Eq. (5): the objective of the output sensitivity metrics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from detrq.errors import DetrqError

KL_DIRECTIONS = ("student||teacher", "teacher||student")


def _layer_loss(student: Mapping[str, Tensor], teacher: Mapping[str, Tensor], temperature: float,
                lambda_kl: float, kl_direction: str) -> Tensor:
    log_s = F.log_softmax(student["pred_logits"] / temperature, dim=-1)
    log_t = F.log_softmax(teacher["pred_logits"].detach() / temperature, dim=-1)
    if kl_direction == "teacher||student":
        log_s, log_t = log_t, log_s
    # KL(P || R) = sum_c P_c (log P_c - log R_c), from log-probabilities for stability at T = 6.
    kl = (log_s.exp() * (log_s - log_t)).sum(-1).mean()
    l1 = (student["pred_boxes"] - teacher["pred_boxes"].detach()).abs().sum(-1).mean()
    return lambda_kl * kl + l1


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
    if kl_direction not in KL_DIRECTIONS:
        raise DetrqError(f"kl_direction must be one of {KL_DIRECTIONS}, got {kl_direction!r}")
    student_aux = student_outputs.get("aux_outputs", [])
    teacher_aux = teacher_outputs.get("aux_outputs", [])
    if len(student_aux) != len(teacher_aux):
        raise DetrqError(f"student has {len(student_aux)} aux outputs but teacher has {len(teacher_aux)}")
    pairs = [(student_outputs, teacher_outputs), *zip(student_aux, teacher_aux)]
    return sum(_layer_loss(s, t, temperature, lambda_kl, kl_direction) for s, t in pairs)
