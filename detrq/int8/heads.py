"""FX-traceable stand-ins for the two heads of a torchvision two-stage detector that FX cannot trace as they are.

torchvision's ``RPNHead`` loops over a Python list of FPN levels, and ``FastRCNNPredictor`` asserts on the input's
shape; symbolic tracing fails on both. ``LevelwiseRPNHead`` keeps the loop outside and applies one traceable
module, ``RPNLevelHead`` (3x3 conv + ReLU, then the objectness and box-delta 1x1 convs), to each level;
``BoxPredictor`` is the predictor without the assert. Both hold the original layers (same weights, same outputs),
so swapping them in changes nothing until their traceable part is quantized.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.rpn import RPNHead


class RPNLevelHead(nn.Module):
    """The RPN head on one FPN level: (objectness logits, box deltas)."""

    def __init__(self, head: RPNHead) -> None:
        super().__init__()
        self.conv, self.cls_logits, self.bbox_pred = head.conv, head.cls_logits, head.bbox_pred

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        t = self.conv(x)
        return self.cls_logits(t), self.bbox_pred(t)


class LevelwiseRPNHead(nn.Module):
    """``RPNHead``'s interface (a list of levels in, two lists out) around a per-level module ``level``."""

    def __init__(self, head: RPNHead) -> None:
        super().__init__()
        self.level = RPNLevelHead(head)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        outputs = [self.level(f) for f in features]
        return [o[0] for o in outputs], [o[1] for o in outputs]


class BoxPredictor(nn.Module):
    """``FastRCNNPredictor`` (class logits, box regression) on flattened RoI features, without its shape assert."""

    def __init__(self, predictor: FastRCNNPredictor) -> None:
        super().__init__()
        self.cls_score, self.bbox_pred = predictor.cls_score, predictor.bbox_pred

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


def make_heads_traceable(model: nn.Module) -> nn.Module:
    """Swap the RPN head and the box predictor of ``model`` (in place) for their traceable stand-ins, where present."""
    rpn = getattr(model, "rpn", None)
    if isinstance(getattr(rpn, "head", None), RPNHead):
        rpn.head = LevelwiseRPNHead(rpn.head)
    roi_heads = getattr(model, "roi_heads", None)
    if isinstance(getattr(roi_heads, "box_predictor", None), FastRCNNPredictor):
        roi_heads.box_predictor = BoxPredictor(roi_heads.box_predictor)
    return model
