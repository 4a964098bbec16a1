"""Decoding of YOLO-style raw detector outputs: ``[batch, 4 + classes, anchors]``, each anchor a box (cx, cy, w, h
in model-input pixels) and one score per class (already through a sigmoid), as YOLOv8-family exports give them.

Per image: the best class per anchor, a confidence threshold, class-wise NMS and the ``max_det`` most confident,
boxes mapped back through the letterbox to original-image pixels. The result has the torchvision detector layout
(``detect.Detections``), so the same agreement and COCO scoring code takes it. Class index i is the i-th category
id of the dataset in ascending order (for COCO's 80 classes that is the usual 80 -> 91 id mapping).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.ops import batched_nms

from detrq.int8.calibration import Placement
from detrq.int8.detect import Detections
from detrq.io.errors import DetrqError


def yolo_classes(shape: Sequence[int | None]) -> int | None:
    """The class count if an output of ``shape`` is in the ``[batch, 4 + classes, anchors]`` layout, else None.

    The anchors outnumber the channels in every YOLO export (8400 anchors at 640 px), which tells this layout
    from a ``[batch, anchors, 4 + classes]`` one.
    """
    if len(shape) != 3 or shape[1] is None or shape[1] <= 4:
        return None
    if shape[2] is not None and shape[2] <= shape[1]:
        return None
    return shape[1] - 4


def decode_yolo(output: np.ndarray, placements: Sequence[Placement], class_ids: Sequence[int], *,
                conf_thr: float = 0.001, iou_thr: float = 0.7, max_det: int = 300) -> Detections:
    """Detections of each image of ``output`` ([B, 4 + C, A]); defaults are the YOLO validation settings."""
    if output.ndim != 3 or output.shape[1] != 4 + len(class_ids):
        raise DetrqError(f"output of shape {list(output.shape)} is not [batch, 4 + {len(class_ids)}, anchors]")
    if len(placements) != output.shape[0]:
        raise DetrqError(f"{len(placements)} placements for a batch of {output.shape[0]}")
    ids = torch.as_tensor(list(class_ids), dtype=torch.int64)
    out: Detections = []
    for pred, placement in zip(torch.from_numpy(np.ascontiguousarray(output, dtype=np.float32)), placements):
        cx, cy, w, h = pred[:4]
        scores, labels = pred[4:].max(0)
        keep = scores > conf_thr
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)[keep]
        scores, labels = scores[keep], labels[keep]
        kept = batched_nms(boxes, scores, labels, iou_thr)[:max_det]
        original = torch.from_numpy(placement.to_original(boxes[kept].numpy())).float()
        out.append({"boxes": original, "scores": scores[kept], "labels": ids[labels[kept]]})
    return out
