"""Inference of torchvision-style detectors over the COCO-layout dataset, scored with the shared
``detrq.evaluation.evaluate.coco_metrics`` (so DETR and the CNN detectors are scored identically), and per-image
agreement between a float model's and its int8 twin's detections.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import box_iou
from tqdm import tqdm

from detrq.data.coco import CocoDetection, collate
from detrq.evaluation.evaluate import coco_metrics
from detrq.io.errors import DetrqError

Detections = list[dict[str, Tensor]]  # per image: boxes [N, 4] xyxy in original pixels, scores [N], labels [N]


def run_detector(model: nn.Module | Callable, dataset: CocoDetection, *, max_images: int | None = None,
                 batch_size: int = 8, progress: bool = False) -> Detections:
    """Every detection of ``model`` on the first ``max_images`` images, boxes rescaled to the original image
    size (the dataset's transform may have resized it). ``model`` takes a list of [0, 1] images."""
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    if n < 1:
        raise DetrqError("run_detector got no images; pass a non-empty dataset and max_images >= 1")
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size,
                                         collate_fn=collate)
    if isinstance(model, nn.Module):
        model.eval()
    out: Detections = []
    with torch.no_grad():
        for images, targets in tqdm(loader, desc="detect", unit="batch", disable=not progress):
            for t, det in zip(targets, model(images)):
                (h, w), (oh, ow) = t["size"].tolist(), t["orig_size"].tolist()
                scale = torch.tensor([ow / w, oh / h, ow / w, oh / h])
                out.append({"boxes": det["boxes"].float() * scale, "scores": det["scores"].float(),
                            "labels": det["labels"]})
    return out


def coco_detections(dataset: CocoDetection, detections: Detections) -> list[dict[str, Any]]:
    """``run_detector`` output as COCO result records (xywh boxes), for ``coco_metrics``."""
    records = []
    for image_id, det in zip(dataset.ids, detections):
        x0, y0, x1, y1 = det["boxes"].unbind(-1)
        xywh = torch.stack([x0, y0, x1 - x0, y1 - y0], dim=-1).tolist()
        records.extend({"image_id": image_id, "category_id": int(c), "bbox": b, "score": float(s)}
                       for b, s, c in zip(xywh, det["scores"].tolist(), det["labels"].tolist()))
    return records


def evaluate_detector(model: nn.Module | Callable, dataset: CocoDetection, *, max_images: int | None = None,
                      batch_size: int = 8, progress: bool = False) -> dict[str, Any]:
    """COCO metrics (fractions, via ``coco_metrics``) and the raw detections of ``model`` on ``dataset``."""
    detections = run_detector(model, dataset, max_images=max_images, batch_size=batch_size, progress=progress)
    metrics = coco_metrics(dataset.coco, coco_detections(dataset, detections), dataset.ids[:len(detections)])
    metrics["protocol"] = {"split": dataset.split, "num_images": len(detections), "batch_size": batch_size,
                           "transform": dataset.transform.describe()}
    return {"metrics": metrics, "detections": detections}


@dataclass
class ImageAgreement:
    """How far one image's int8 detections are from the float model's (0 everywhere = identical)."""

    mismatch: float  # 1 - F1 of same-label matches at IoU >= iou_thr between the confident detection sets
    box_rel_error: float  # matched pairs: sum |box_int8 - box_float| / box_float perimeter, averaged
    score_rel_error: float  # matched pairs: |score_int8 - score_float| / score_float, averaged


def match_detections(f: dict[str, Tensor], q: dict[str, Tensor], iou_thr: float) -> list[tuple[int, int]]:
    """Greedy one-to-one pairs (float index, int8 index) of same-label detections with IoU >= ``iou_thr``,
    the most confident float detection first, as COCO evaluation matches."""
    if len(f["boxes"]) == 0 or len(q["boxes"]) == 0:
        return []
    iou = box_iou(f["boxes"], q["boxes"]) * (f["labels"][:, None] == q["labels"][None, :])
    pairs = []
    for i in torch.argsort(f["scores"], descending=True).tolist():
        j = int(iou[i].argmax())
        if iou[i, j] >= iou_thr:
            pairs.append((i, j))
            iou[:, j] = -1
    return pairs


def _agreement(f: dict[str, Tensor], q: dict[str, Tensor], score_thr: float, iou_thr: float) -> ImageAgreement:
    f = {k: v[f["scores"] >= score_thr] for k, v in f.items()}
    q = {k: v[q["scores"] >= score_thr] for k, v in q.items()}
    n = len(f["boxes"]) + len(q["boxes"])
    if n == 0:
        return ImageAgreement(0.0, 0.0, 0.0)
    pairs = match_detections(f, q, iou_thr)
    mismatch = 1.0 - 2 * len(pairs) / n
    if not pairs:
        return ImageAgreement(mismatch, float("nan"), float("nan"))
    i, j = map(list, zip(*pairs))
    fb, qb, fs, qs = f["boxes"][i], q["boxes"][j], f["scores"][i], q["scores"][j]
    perimeter = 2 * (fb[:, 2:] - fb[:, :2]).sum(-1)
    box = ((qb - fb).abs().sum(-1) / perimeter.clamp(min=1e-6)).mean()
    return ImageAgreement(mismatch, float(box), float(((qs - fs).abs() / fs).mean()))


def paired_scores(float_dets: Detections, int8_dets: Detections, iou_thr: float = 0.5
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Scores of every float detection and of its matched int8 detection (0 where int8 has none), plus the
    unmatched int8 detections against 0: the data of the float-vs-int8 score hexbin."""
    fs, qs = [], []
    for f, q in zip(float_dets, int8_dets):
        pairs = dict(match_detections(f, q, iou_thr))
        matched = set(pairs.values())
        fs += f["scores"].tolist() + [0.0] * (len(q["scores"]) - len(matched))
        qs += [float(q["scores"][pairs[i]]) if i in pairs else 0.0 for i in range(len(f["scores"]))]
        qs += [float(s) for j, s in enumerate(q["scores"]) if j not in matched]
    return np.asarray(fs), np.asarray(qs)


def detection_agreement(float_dets: Detections, int8_dets: Detections, *, score_thr: float = 0.5,
                        iou_thr: float = 0.5) -> dict[str, Any]:
    """Per-image relative error of the int8 detections against the float ones, with mean and std over images.

    Only detections scoring at least ``score_thr`` count (those a user would keep). Box and score errors
    average over the images that have at least one matched pair.
    """
    if len(float_dets) != len(int8_dets) or not float_dets:
        raise DetrqError(f"detection_agreement needs two equally long, non-empty lists, got {len(float_dets)} "
                         f"and {len(int8_dets)}")
    per_image = [_agreement(f, q, score_thr, iou_thr) for f, q in zip(float_dets, int8_dets)]
    summary: dict[str, Any] = {"score_thr": score_thr, "iou_thr": iou_thr, "num_images": len(per_image)}
    for key in ("mismatch", "box_rel_error", "score_rel_error"):
        v = np.array([getattr(a, key) for a in per_image], dtype=np.float64)
        v = v[~np.isnan(v)]
        summary[key] = {"mean": float(v.mean()) if v.size else None, "std": float(v.std()) if v.size else None,
                        "max": float(v.max()) if v.size else None, "num_images": int(v.size)}
    return summary
