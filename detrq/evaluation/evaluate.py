"""Inference over a COCO-layout dataset and pycocotools bbox evaluation, as official DETR evaluates.

Every prediction (no threshold, no top-k) goes to COCOeval (its per-image matching in the exact, vectorised form of
``fast_match.FastCOCOeval``); the returned dict holds the standard metrics, per-class AP and the evaluation protocol
(image count, batch size, size policy, device).

Inside a torchrun process group each rank runs a contiguous block of whole batches (the same batches, so the
same padding, as one process), rank 0 gathers the detections in order and runs COCOeval once: its metrics are
one process's.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn
from tqdm import tqdm

from detrq.data.coco import CocoDetection, collate
from detrq.evaluation.fast_match import FastCOCOeval
from detrq.io.errors import DetrqError
from detrq.parallel import distributed

# Position of each reported metric in COCOeval.stats.
_STATS = {"AP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5, "AR100": 8}
# The weights that ``DETR.features`` depends on: the backbone's.
TRUNK_PREFIX = "backbone."

Postprocess = Callable[[dict[str, Tensor], Tensor], list[dict[str, Tensor]]]


def _valid_or_none(value: float) -> float | None:
    # pycocotools writes -1 where a metric has no ground truth (e.g. APl without large objects).
    return None if value < 0 else float(value)


def restrict_to_ap(evaluator: COCOeval) -> None:
    """Limit ``evaluator`` to what AP needs: area range "all" and 100 detections per image. pycocotools matches
    each area range separately, so the per-image results for "all" are the same, 4x faster."""
    evaluator.params.areaRng, evaluator.params.areaRngLbl = evaluator.params.areaRng[:1], ["all"]
    evaluator.params.maxDets = [100]


def load_results(coco_gt: COCO, detections: Sequence[dict[str, Any]]) -> COCO:
    """``detections`` as a pycocotools result set on ``coco_gt`` (pycocotools prints while loading: callers
    silence stdout)."""
    if detections:
        return coco_gt.loadRes([dict(d) for d in detections])  # loadRes adds keys to the dicts it gets: copies
    # loadRes cannot take an empty list; an empty result set evaluates to 0 AP instead.
    coco_dt = COCO()
    coco_dt.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                       "annotations": []}
    coco_dt.createIndex()
    return coco_dt


def _accumulated(coco_gt: COCO, detections: Sequence[dict[str, Any]], image_ids: Sequence[int],
                 ap_only: bool = False) -> COCOeval:
    """COCOeval of ``detections`` on ``image_ids`` after ``evaluate`` and ``accumulate`` (stdout silenced).

    ``ap_only`` restricts it to what AP needs (``restrict_to_ap``).
    """
    ids = [int(i) for i in image_ids]
    # pycocotools prints its progress; keep stdout clean for notebooks and nbval.
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = FastCOCOeval(coco_gt, load_results(coco_gt, detections), iouType="bbox")
        evaluator.params.imgIds = ids
        if ap_only:
            restrict_to_ap(evaluator)
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


def coco_ap(coco_gt: COCO, detections: Sequence[dict[str, Any]], image_ids: Sequence[int]) -> float | None:
    """``coco_metrics(...)["AP"]`` alone, computed as COCOeval's summary does, without the other area ranges."""
    # precision: [IoU thresholds, recall points, categories, area ranges, max dets]; area "all", 100 dets.
    precision = _accumulated(coco_gt, detections, image_ids, ap_only=True).eval["precision"][:, :, :, 0, -1]
    valid = precision[precision > -1]
    return float(np.mean(valid)) if valid.size else None


def coco_metrics(coco_gt: COCO, detections: Sequence[dict[str, Any]], image_ids: Sequence[int]) -> dict[str, Any]:
    """COCO bbox metrics of ``detections`` ({"image_id", "category_id", "bbox" xywh, "score"}) on ``image_ids``.

    Returns AP, AP50, AP75, APs, APm, APl, AR100 as fractions and "per_class" {category id as str: AP}.
    A metric with no ground truth to measure is None. No detections give 0 wherever ground truth exists.
    """
    evaluator = _accumulated(coco_gt, detections, image_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.summarize()
    metrics: dict[str, Any] = {name: _valid_or_none(evaluator.stats[i]) for name, i in _STATS.items()}
    # precision: [IoU thresholds, recall points, categories, area ranges, max dets]; area "all", 100 dets.
    precision = evaluator.eval["precision"]
    per_class: dict[str, float | None] = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_class[str(cat_id)] = float(np.mean(p)) if p.size else None
    metrics["per_class"] = per_class
    return metrics


class TrunkCache:
    """The backbone features ``(feat, mask, pos)`` of one dataset's evaluation batches, kept for the last
    ``keep`` backbone weights seen.

    Bit maps that quantize the ``backbone.*`` layers alike (the same Pareto budget under another metric, Table 1's
    rows of one scheme family) give the same features: the evaluations after the first run only the head
    (``DETR.head``, what ``DETR.forward`` runs on them), the same numbers. The key is a digest of the backbone's
    weights as they are, so a reuse never depends on how a bit map or a quantizer got them.
    """

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._kept: dict[str, list[tuple[Tensor, Tensor, Tensor]]] = {}

    @staticmethod
    def key(model: nn.Module) -> str:
        """Digest of every ``backbone.*`` parameter and buffer (names, dtypes, shapes and bytes)."""
        digest = hashlib.blake2b(digest_size=16)
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.startswith(TRUNK_PREFIX):
                data = t.detach().cpu().contiguous()
                digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
                digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def get(self, key: str) -> list[tuple[Tensor, Tensor, Tensor]] | None:
        return self._kept.get(key)

    def put(self, key: str, features: list[tuple[Tensor, Tensor, Tensor]]) -> None:
        self._kept.pop(key, None)
        self._kept[key] = features
        while len(self._kept) > self.keep:
            del self._kept[next(iter(self._kept))]  # the oldest: jobs of one backbone come one after another


def _default_postprocess() -> Postprocess:
    # Imported lazily so that evaluation does not depend on the model module at import time.
    from detrq.models.detr import postprocess

    return postprocess


def outputs_to_detections(outputs: dict[str, Tensor], targets: Sequence[dict[str, Any]],
                          postprocess: Postprocess | None = None) -> list[dict[str, Any]]:
    """A batch's model outputs as COCO detections ({"image_id", "category_id", "bbox" xywh, "score"}).

    ``targets`` give each image's ``image_id`` and ``orig_size`` (h, w); ``postprocess`` (default: the official
    PostProcess) turns the outputs into absolute xyxy boxes. Every query is kept: no threshold, no top-k.
    """
    postprocess = postprocess or _default_postprocess()
    sizes = torch.stack([t["orig_size"] for t in targets]).to(outputs["pred_boxes"].device)
    detections: list[dict[str, Any]] = []
    for target, result in zip(targets, postprocess(outputs, sizes)):
        boxes = result["boxes"].cpu()
        x0, y0, x1, y1 = boxes.unbind(-1)
        xywh = torch.stack([x0, y0, x1 - x0, y1 - y0], dim=-1).tolist()
        scores = result["scores"].cpu().tolist()
        labels = result["labels"].cpu().tolist()
        detections.extend(
            {"image_id": target["image_id"], "category_id": int(label), "bbox": box, "score": score}
            for box, score, label in zip(xywh, scores, labels)
        )
    return detections


def evaluate(
    model: nn.Module,
    dataset: CocoDetection,
    *,
    batch_size: int = 2,
    device: str | torch.device = "cpu",
    max_images: int | None = None,
    progress: bool = True,
    postprocess: Postprocess | None = None,
    trunk: TrunkCache | None = None,
) -> dict[str, Any] | None:
    """Run ``model`` over ``dataset`` (the first ``max_images`` images if given) and return COCO metrics
    plus "protocol" and "detections" (the raw detection list scored by ``coco_metrics``: dicts with
    "image_id", "category_id", "bbox" xywh, "score"; ``detrq.evaluation.bootstrap`` resamples them).
    The model is moved to ``device`` and put in eval mode; its training flag is restored. Inside a torchrun
    process group the ranks share the batches and only rank 0 returns the metrics (the others return None).
    ``trunk`` (a ``DETR`` on one process) takes the backbone features from that cache when it holds them for the
    model's backbone weights, and keeps them otherwise.
    """
    if batch_size < 1 or (max_images is not None and max_images < 1):
        raise DetrqError(f"batch_size and max_images must be at least 1, got {batch_size} and {max_images}")
    postprocess = postprocess or _default_postprocess()
    indices = range(len(dataset) if max_images is None else min(max_images, len(dataset)))
    batches = distributed.shard(-(-len(indices) // batch_size))
    mine = indices[batches.start * batch_size:batches.stop * batch_size]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, mine), batch_size=batch_size, shuffle=False, num_workers=0,
        collate_fn=collate,
    )
    was_training = model.training
    model.to(device).eval()
    detections: list[dict[str, Any]] = []
    try:
        with torch.no_grad():
            # The same batches of the same images on the same device, and the same backbone weights.
            key = None if trunk is None else f"{id(dataset)}:{mine}:{batch_size}:{device}:{trunk.key(model)}"
            kept = None if trunk is None else trunk.get(key)
            made = []  # the features computed here, kept when the cache had none
            for k, (images, targets) in enumerate(tqdm(loader, desc="eval", unit="batch", disable=not progress)):
                if trunk is None:
                    outputs = model([im.to(device) for im in images])
                else:
                    if kept is None:
                        made.append(model.features([im.to(device) for im in images]))
                    outputs = model.head(*(made[k] if kept is None else kept[k]))
                detections.extend(outputs_to_detections(outputs, targets, postprocess))
            if made:
                trunk.put(key, made)
    finally:
        model.train(was_training)
    parts = distributed.gather_to_main(detections)
    if parts is None:
        return None
    detections = [d for part in parts for d in part]
    metrics = coco_metrics(dataset.coco, detections, [dataset.ids[i] for i in indices])
    metrics["protocol"] = {
        "split": dataset.split,
        "num_images": len(indices),
        "batch_size": batch_size,
        "transform": dataset.transform.describe(),
        "device": str(device),
    }
    report = getattr(dataset, "data_report", None)
    if report is not None and report.warnings:  # soft problems of the data (data.validate), so a reader knows
        metrics["protocol"]["data_warnings"] = report.protocol()
    metrics["detections"] = detections
    return metrics
