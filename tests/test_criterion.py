"""Hungarian matcher and set criterion on cases small enough to solve by hand."""

import math

import pytest
import torch

from detrq.models.criterion import HungarianMatcher, build_criterion, weighted_loss


def test_matcher_solves_the_obvious_assignment():
    # Query 0 sits on target 1, query 2 on target 0; query 1 is far from both.
    boxes = torch.tensor([[[0.7, 0.7, 0.2, 0.2], [0.1, 0.9, 0.05, 0.05], [0.3, 0.3, 0.2, 0.2]]])
    logits = torch.zeros(1, 3, 4)
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])}]
    ((src, tgt),) = HungarianMatcher()({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert dict(zip(src.tolist(), tgt.tolist())) == {0: 1, 2: 0}


def test_matcher_class_cost_breaks_a_box_tie():
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]]])
    logits = torch.tensor([[[0.0, 8.0, 0.0], [8.0, 0.0, 0.0]]])  # query 0 says class 1, query 1 class 0
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    ((src, tgt),) = HungarianMatcher()({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert src.tolist() == [0] and tgt.tolist() == [0]


def test_criterion_terms_by_hand():
    crit = build_criterion(num_classes=2, dec_layers=1)
    # Two queries, one target of class 1 matched to query 0 (it overlaps); query 1 is "no object".
    logits = torch.tensor([[[0.0, 2.0, 0.0], [0.0, 0.0, 1.0]]])
    pred = torch.tensor([[[0.5, 0.5, 0.4, 0.4], [0.1, 0.1, 0.1, 0.1]]])
    tgt_box = torch.tensor([[0.5, 0.6, 0.4, 0.2]])
    losses = crit({"pred_logits": logits, "pred_boxes": pred}, [{"labels": torch.tensor([1]), "boxes": tgt_box}])
    # Weighted CE: weights 1 for query 0 (class 1), 0.1 for query 1 (no-object), mean divides by 1.1.
    ce0 = -torch.log_softmax(logits[0, 0], -1)[1].item()
    ce1 = -torch.log_softmax(logits[0, 1], -1)[2].item()
    assert losses["loss_ce"].item() == pytest.approx((ce0 + 0.1 * ce1) / 1.1, rel=1e-6)
    assert losses["loss_bbox"].item() == pytest.approx(0.0 + 0.1 + 0.0 + 0.2, rel=1e-6)
    # xyxy: pred (0.3,0.3,0.7,0.7) area .16; target (0.3,0.5,0.7,0.7) area .08 inside it: IoU .5, hull = pred.
    assert losses["loss_giou"].item() == pytest.approx(0.5, rel=1e-6)
    assert losses["class_error"].item() == pytest.approx(0.0)
    # Predicted cardinality: query 0 -> class 1, query 1 -> no-object: 1 box for 1 target.
    assert losses["cardinality_error"].item() == pytest.approx(0.0)
    total = weighted_loss(losses, crit.weight_dict)
    expected = losses["loss_ce"] + 5 * losses["loss_bbox"] + 2 * losses["loss_giou"]
    assert total.item() == pytest.approx(expected.item())


def test_aux_losses_are_suffixed_and_rematched():
    crit = build_criterion(num_classes=3, dec_layers=3)
    torch.manual_seed(0)

    def head():
        return {"pred_logits": torch.randn(2, 5, 4), "pred_boxes": torch.rand(2, 5, 4) * 0.5 + 0.25}

    outputs = {**head(), "aux_outputs": [head(), head()]}
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.rand(2, 4) * 0.5 + 0.25},
               {"labels": torch.tensor([1]), "boxes": torch.rand(1, 4) * 0.5 + 0.25}]
    losses = crit(outputs, targets)
    for i in (0, 1):
        for k in ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error"):
            assert f"{k}_{i}" in losses
        assert f"class_error_{i}" not in losses  # official: logged for the final output only
    assert set(crit.weight_dict) == {f"{k}{s}" for k in ("loss_ce", "loss_bbox", "loss_giou")
                                     for s in ("", "_0", "_1")}
    # Each aux output is matched on its own: its loss equals the criterion applied to it alone.
    alone = crit(outputs["aux_outputs"][1], targets)
    assert losses["loss_giou_1"].item() == pytest.approx(alone["loss_giou"].item())
    assert all(math.isfinite(v.item()) for v in losses.values())


def test_no_targets_gives_finite_loss():
    crit = build_criterion(num_classes=3, dec_layers=1)
    out = {"pred_logits": torch.randn(1, 4, 4, requires_grad=True), "pred_boxes": torch.rand(1, 4, 4)}
    losses = crit(out, [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}])
    assert losses["loss_bbox"].item() == 0 and math.isfinite(losses["loss_ce"].item())
    weighted_loss(losses, crit.weight_dict).backward()
