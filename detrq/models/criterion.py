"""The DETR training loss: Hungarian matcher and set criterion, numerically as the official implementation.

The loss L of the paper's Eq. (1)-(2) ("Loss Sen") is ``weighted_loss(criterion(outputs, targets), ...)``.

``num_boxes`` (the L1 and GIoU normaliser) is the batch's own box count. With ``batch_over_ranks`` the ranks of a
torchrun process group each hold a part of one global batch (data-parallel training, as official DETR trains):
the count is then all-reduced and divided by the world size, as in the official code. The sharded Hessian
objectives do not set it: each of their batches lives whole on one rank, so its own count is already the one a
single process uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from detrq.models.boxes import box_cxcywh_to_xyxy, generalized_box_iou
from detrq.parallel import distributed


class HungarianMatcher(nn.Module):
    """One-to-one assignment of predictions to targets minimising class + L1 + GIoU costs."""

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0):
        super().__init__()
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """Per image, (prediction indices, target indices) of the optimal matching."""
        bs, nq = outputs["pred_logits"].shape[:2]
        out_prob = outputs["pred_logits"].flatten(0, 1).softmax(-1)
        out_bbox = outputs["pred_boxes"].flatten(0, 1)
        tgt_ids = torch.cat([t["labels"] for t in targets])
        tgt_bbox = torch.cat([t["boxes"] for t in targets])
        cost_class = -out_prob[:, tgt_ids]
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox))
        c = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        c = c.view(bs, nq, -1).cpu()
        sizes = [len(t["boxes"]) for t in targets]
        indices = [linear_sum_assignment(block[i]) for i, block in enumerate(c.split(sizes, -1))]
        return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in indices]


def _src_permutation(indices: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    return batch_idx, src_idx


class SetCriterion(nn.Module):
    """Official DETR SetCriterion with the 'labels', 'boxes' and 'cardinality' losses and aux copies."""

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict[str, float],
                 eos_coef: float = 0.1, batch_over_ranks: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.batch_over_ranks = batch_over_ranks
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def loss_labels(self, outputs: dict, targets: list[dict], indices, log: bool = True) -> dict[str, Tensor]:
        src_logits = outputs["pred_logits"]
        idx = _src_permutation(indices)
        target_classes_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        target_classes = torch.full(src_logits.shape[:2], self.num_classes, dtype=torch.int64,
                                    device=src_logits.device)
        target_classes[idx] = target_classes_o
        # With class weights, cross_entropy's mean divides by the sum of the weights, as officially.
        losses = {"loss_ce": F.cross_entropy(src_logits.transpose(1, 2), target_classes, self.empty_weight)}
        if log:
            matched = src_logits[idx]
            if target_classes_o.numel() == 0:
                acc = torch.zeros((), device=src_logits.device)
            else:
                acc = (matched.argmax(-1) == target_classes_o).float().mean() * 100
            losses["class_error"] = 100 - acc
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs: dict, targets: list[dict], indices) -> dict[str, Tensor]:
        logits = outputs["pred_logits"]
        tgt_lengths = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device)
        card_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(card_pred.float(), tgt_lengths.float())}

    def loss_boxes(self, outputs: dict, targets: list[dict], indices, num_boxes: float) -> dict[str, Tensor]:
        idx = _src_permutation(indices)
        src_boxes = outputs["pred_boxes"][idx]
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], dim=0)
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none")
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes)))
        return {"loss_bbox": loss_bbox.sum() / num_boxes, "loss_giou": (1 - giou).sum() / num_boxes}

    def _losses(self, outputs: dict, targets: list[dict], num_boxes: float, log: bool) -> dict[str, Tensor]:
        indices = self.matcher(outputs, targets)
        losses = self.loss_labels(outputs, targets, indices, log=log)
        losses.update(self.loss_boxes(outputs, targets, indices, num_boxes))
        losses.update(self.loss_cardinality(outputs, targets, indices))
        return losses

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        """The loss dict; aux outputs are re-matched and their terms get suffixes ``_0``, ``_1``, ..."""
        num_boxes = float(sum(len(t["labels"]) for t in targets))
        if self.batch_over_ranks:
            total = distributed.all_reduce_sum(torch.tensor(num_boxes, dtype=torch.float64))
            num_boxes = total.item() / distributed.world_size()
        num_boxes = max(num_boxes, 1.0)
        main = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        losses = self._losses(main, targets, num_boxes, log=True)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update({f"{k}_{i}": v for k, v in self._losses(aux, targets, num_boxes, log=False).items()})
        return losses


def build_criterion(num_classes: int = 91, dec_layers: int = 6, eos_coef: float = 0.1,
                    batch_over_ranks: bool = False) -> SetCriterion:
    """The official criterion: matcher costs 1/5/2, loss weights 1/5/2, eos_coef 0.1, aux losses;
    ``batch_over_ranks``: see the module docstring."""
    weight_dict = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    for i in range(dec_layers - 1):
        weight_dict.update({f"{k}_{i}": v for k, v in list(weight_dict.items())[:3]})
    return SetCriterion(num_classes, HungarianMatcher(1.0, 5.0, 2.0), weight_dict, eos_coef, batch_over_ranks)


def weighted_loss(loss_dict: dict[str, Tensor], weight_dict: dict[str, float]) -> Tensor:
    """The scalar DETR training loss: sum of the weighted terms (class/cardinality errors are not weighted)."""
    return sum(loss_dict[k] * w for k, w in weight_dict.items() if k in loss_dict)
