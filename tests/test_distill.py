"""Eq. (5) multi-layer distillation loss."""

import pytest
import torch
import torch.nn.functional as F

from detrq.io.errors import DetrqError
from detrq.sensitivity.distill import distillation_loss

torch.set_num_threads(1)


def fake_outputs(seed: int, batch: int = 2, queries: int = 5, classes: int = 4, aux: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)

    def layer() -> dict:
        return {"pred_logits": torch.randn(batch, queries, classes + 1, generator=g),
                "pred_boxes": torch.rand(batch, queries, 4, generator=g)}

    return {**layer(), "aux_outputs": [layer() for _ in range(aux)]}


def perturbed(outputs: dict, key: str, layer: int | None = None, eps: float = 0.1) -> dict:
    """A deep copy with ``key`` shifted in the final output (layer None) or in one aux output."""
    out = {k: v.clone() for k, v in outputs.items() if k != "aux_outputs"}
    out["aux_outputs"] = [{k: v.clone() for k, v in a.items()} for a in outputs["aux_outputs"]]
    target = out if layer is None else out["aux_outputs"][layer]
    target[key] = target[key] + eps * torch.linspace(-1, 1, target[key].numel()).view_as(target[key])
    return out


def reference(student: dict, teacher: dict, T: float, lam: float) -> torch.Tensor:
    """Eq. (5) from library primitives: kl_div(input=log r, target=log p) is KL(p || r)."""
    total = torch.zeros(())
    for s, t in [(student, teacher), *zip(student["aux_outputs"], teacher["aux_outputs"])]:
        log_s = F.log_softmax(s["pred_logits"] / T, -1)
        log_t = F.log_softmax(t["pred_logits"] / T, -1)
        queries = s["pred_logits"].shape[0] * s["pred_logits"].shape[1]
        kl = F.kl_div(log_t, log_s, log_target=True, reduction="sum") / queries
        total = total + lam * kl + F.l1_loss(s["pred_boxes"], t["pred_boxes"], reduction="sum") / queries
    return total


def test_zero_for_identical_outputs():
    out = fake_outputs(0)
    for direction in ("student||teacher", "teacher||student"):
        assert distillation_loss(out, out, kl_direction=direction).item() == 0.0


def test_matches_reference_formula():
    teacher = fake_outputs(0)
    student = fake_outputs(1)
    loss = distillation_loss(student, teacher, temperature=3.0, lambda_kl=0.5)
    assert loss.item() == pytest.approx(reference(student, teacher, 3.0, 0.5).item(), rel=1e-6)


@pytest.mark.parametrize("layer", [None, 0, 1])
def test_positive_for_perturbed_logits_or_boxes_in_any_decoder_layer(layer):
    teacher = fake_outputs(0)
    for key in ("pred_logits", "pred_boxes"):
        assert distillation_loss(perturbed(teacher, key, layer), teacher).item() > 0


def test_kl_direction_matters():
    teacher = fake_outputs(0)
    student = perturbed(teacher, "pred_logits", eps=3.0)
    forward = distillation_loss(student, teacher)
    backward = distillation_loss(student, teacher, kl_direction="teacher||student")
    assert forward.item() > 0 and backward.item() > 0
    assert forward.item() != pytest.approx(backward.item(), rel=1e-3)
    assert backward.item() == pytest.approx(distillation_loss(teacher, student).item(), rel=1e-6)


def test_teacher_gets_no_gradient_and_bad_direction_raises():
    teacher = fake_outputs(0)
    teacher["pred_logits"].requires_grad_(True)
    student = perturbed(fake_outputs(0), "pred_logits")
    student["pred_logits"].requires_grad_(True)
    distillation_loss(student, teacher).backward()
    assert student["pred_logits"].grad is not None and teacher["pred_logits"].grad is None
    with pytest.raises(DetrqError, match="kl_direction"):
        distillation_loss(student, teacher, kl_direction="both")
