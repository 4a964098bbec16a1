"""Where the time and the activation memory of a torchvision two-stage detector go, stage by stage.

``stage_breakdown`` times each stage of a Faster R-CNN forward (exclusive times: a stage's time excludes the
stages nested in it, so the stages add up to the total) and records the bytes of each stage's output and the
number of RoIs that reach the box head. Run on a float model and its int8 twin, it shows which stages int8
speeds up, which float stages bound the latency ratio (``ratio_floor``: the int8 time if every quantized stage
took no time at all, over the float total), and why peak memory does or does not fall (the tensors that the
post-backbone stages hold stay float in both models).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

# (stage, module path, the stage it is nested in). "transform" is the resize + normalisation before the backbone;
# "postprocess" is the box decoding, score threshold and per-class NMS after the box predictor plus the rescale
# of boxes to the input size (roi_heads' own time, and transform.postprocess).
STAGES = (
    ("transform", "transform", None),
    ("backbone+fpn", "backbone", None),
    ("rpn_head", "rpn.head", "rpn"),
    ("rpn", "rpn", None),  # exclusive of the head: anchors, box decoding, top-k, NMS
    ("roi_align", "roi_heads.box_roi_pool", "postprocess"),
    ("box_head", "roi_heads.box_head", "postprocess"),
    ("box_predictor", "roi_heads.box_predictor", "postprocess"),
    ("postprocess", "roi_heads", None),
)
# The stage that each of quantize.DETECTOR_PARTS is.
PART_STAGES = {"backbone": "backbone+fpn", "rpn_head": "rpn_head", "box_head": "box_head",
               "box_predictor": "box_predictor"}


def _bytes(out: Any) -> int:
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(out) if isinstance(t, Tensor))


def _restore(obj: object, name: str, own: Any) -> None:
    """Put back the instance attribute ``own`` (a compiled module's forward), or remove the timing wrapper so the
    class's method shows through again."""
    if own is None:
        delattr(obj, name)
    else:
        setattr(obj, name, own)


def stage_breakdown(model: nn.Module, images: Sequence[Tensor], repeats: int = 3) -> dict[str, Any]:
    """Exclusive seconds per image of each stage of ``STAGES`` (one image per call, after one warm-up pass),
    the total, each stage's output in MB (the last image) and the RoIs per image that reach the box head."""
    inclusive: dict[str, float] = defaultdict(float)
    out_mb: dict[str, float] = {}
    rois: list[int] = []
    originals = {}
    for stage, path, _ in STAGES:
        mod = model.get_submodule(path)
        originals[path] = vars(mod).get("forward")

        def timed(*args, _f=mod.forward, _s=stage, **kwargs):
            t0 = time.perf_counter()
            out = _f(*args, **kwargs)
            inclusive[_s] += time.perf_counter() - t0
            out_mb[_s] = _bytes(out) / 2**20
            if _s == "roi_align":
                rois.append(int(out.shape[0]))
            return out

        mod.forward = timed
    post, own_post = model.transform.postprocess, vars(model.transform).get("postprocess")

    def timed_post(*args, **kwargs):
        t0 = time.perf_counter()
        out = post(*args, **kwargs)
        inclusive["postprocess"] += time.perf_counter() - t0
        return out

    model.transform.postprocess = timed_post
    try:
        with torch.no_grad():
            for im in images:
                model([im])  # warm-up
            inclusive.clear()
            rois.clear()
            t0 = time.perf_counter()
            for _ in range(repeats):
                for im in images:
                    model([im])
            total = time.perf_counter() - t0
    finally:
        for path in originals:
            _restore(model.get_submodule(path), "forward", originals[path])
        _restore(model.transform, "postprocess", own_post)
    exclusive = dict(inclusive)
    for stage, _, parent in STAGES:
        if parent is not None:
            exclusive[parent] -= inclusive[stage]
    n = repeats * len(images)
    seconds = {stage: exclusive[stage] / n for stage, _, _ in STAGES}
    seconds["other"] = total / n - sum(seconds.values())
    return {"s_per_image": seconds, "total_s_per_image": total / n, "output_mb": out_mb,
            "rois_per_image": sum(rois) / len(rois) if rois else 0.0}


def compare_breakdowns(float_bd: dict[str, Any], int8_bd: dict[str, Any], parts: Sequence[str]) -> dict[str, Any]:
    """Per-stage int8/float ratios, and the floor of the total ratio set by the stages that stay float:
    their int8-model time over the float total (the ratio if the quantized ``parts`` cost nothing)."""
    f, q = float_bd["s_per_image"], int8_bd["s_per_image"]
    quantized = {PART_STAGES[p] for p in parts}
    float_stages = [s for s in q if s not in quantized]
    return {"stage_ratio": {s: q[s] / f[s] if f[s] > 0 else None for s in f},
            "float_stages": float_stages,
            "ratio_floor": sum(q[s] for s in float_stages) / float_bd["total_s_per_image"],
            "ratio": int8_bd["total_s_per_image"] / float_bd["total_s_per_image"]}
