"""The INT8 quantization plan and what every backend shares: which parts of a model get int8, the float copy
the backends quantize, the inputs each part sees, and the ``Backend`` interface.

The one entry point of INT8 post-training quantization: ``quantize_int8(model, calib_images, backend)``.

What gets quantized (``quantization_plan``):
- a torchvision detector (anything with a CNN ``backbone`` and a ``transform``: Faster/Mask/Keypoint R-CNN,
  RetinaNet, FCOS, SSD): the ``parts`` asked for, out of ``DETECTOR_PARTS``: "backbone" (with its FPN),
  "rpn_head" (the RPN's 3x3 conv and its objectness and box-delta convs, run per FPN level), "box_head" (the
  two-stage models' TwoMLPHead fc6/fc7, where most weights and FLOPs after the backbone are) and
  "box_predictor" (the class-logit and box-regression linears). By default every part the model has.
  The RPN head and the box predictor go through the FX-traceable stand-ins of ``detrq.int8.heads``;
- a plain CNN (a module with Conv2d layers and no ``backbone``): the whole model.
The rest of a detector always stays float: anchor decoding, top-k and NMS, RoI pooling (MultiScaleRoIAlign picks
a level per box) and the post-processing are data-dependent control flow over boxes with no int8 kernels, so
quantizing them would only add quantize/dequantize pairs. The box predictor is the most error-sensitive layer
(the DETR-quantization paper keeps its class and box heads in float); leave "box_predictor" out of ``parts`` to
keep it float, and compare AP both ways.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops.misc import FrozenBatchNorm2d

from detrq.int8.heads import make_heads_traceable
from detrq.io.errors import DetrqError

DETECTOR_PARTS = ("backbone", "rpn_head", "box_head", "box_predictor")
# Where each part sits once ``make_heads_traceable`` has swapped in the stand-ins.
_PART_PATHS = {"backbone": "backbone", "rpn_head": "rpn.head.level", "box_head": "roi_heads.box_head",
               "box_predictor": "roi_heads.box_predictor"}


@dataclass(frozen=True)
class QuantizationPlan:
    """Which parts get int8, and how the model takes a batch."""

    kind: str  # "detector" (takes a list of [C, H, W] images) or "classifier" (takes a [N, C, H, W] batch)
    parts: tuple[str, ...]  # names from DETECTOR_PARTS, or ("",) for a classifier

    @property
    def targets(self) -> tuple[str, ...]:
        """Module paths of the parts, in a model whose heads went through ``make_heads_traceable``."""
        return tuple(_PART_PATHS.get(p, p) for p in self.parts)


def _has(module: nn.Module, kind: type) -> bool:
    return any(isinstance(m, kind) for m in module.modules())


def _detector_parts(model: nn.Module) -> tuple[str, ...]:
    """The ``DETECTOR_PARTS`` that ``model`` has (heads as torchvision builds them)."""
    found = ["backbone"]
    if isinstance(getattr(getattr(model, "rpn", None), "head", None), RPNHead):
        found.append("rpn_head")
    roi_heads = getattr(model, "roi_heads", None)
    box_head = getattr(roi_heads, "box_head", None)
    if isinstance(box_head, nn.Module) and _has(box_head, nn.Linear):
        found.append("box_head")
    if isinstance(getattr(roi_heads, "box_predictor", None), FastRCNNPredictor):
        found.append("box_predictor")
    return tuple(found)


def quantization_plan(model: nn.Module, parts: Sequence[str] | None = None) -> QuantizationPlan:
    """The parts of ``model`` that ``quantize_int8`` quantizes (see the module docstring for the policy).

    ``parts`` (detectors only) names a subset of ``DETECTOR_PARTS``; None takes every part the model has.
    """
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Module) and hasattr(model, "transform"):
        if not _has(backbone, nn.Conv2d):
            raise DetrqError(f"{type(model).__name__}.backbone has no Conv2d layer; int8 PTQ here is for CNN backbones")
        present = _detector_parts(model)
        if parts is None:
            parts = present
        unknown = [p for p in parts if p not in DETECTOR_PARTS]
        if unknown:
            raise DetrqError(f"unknown parts {unknown}; choose from {', '.join(DETECTOR_PARTS)}")
        absent = [p for p in parts if p not in present]
        if absent:
            raise DetrqError(f"{type(model).__name__} has no {', '.join(absent)} to quantize; it has "
                             f"{', '.join(present)}")
        if not parts:
            raise DetrqError("parts is empty; name at least one of " + ", ".join(present))
        return QuantizationPlan("detector", tuple(p for p in DETECTOR_PARTS if p in parts))
    if parts is not None:
        raise DetrqError(f"parts= is for detectors; {type(model).__name__} is quantized whole")
    if _has(model, nn.Conv2d):
        return QuantizationPlan("classifier", ("",))
    raise DetrqError(f"{type(model).__name__} has no CNN backbone (no Conv2d layer); quantize_int8 takes a "
                     "torchvision detector with a CNN backbone or a CNN classifier")


def traceable_copy(model: nn.Module) -> nn.Module:
    """The float model as the backends quantize it: a copy with frozen BN folded and the heads made traceable,
    so that its part paths (``QuantizationPlan.targets``) and their inputs are the quantized model's."""
    return make_heads_traceable(fold_frozen_batchnorm(copy.deepcopy(model))).eval()


def fold_frozen_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every FrozenBatchNorm2d (pretrained torchvision backbones) by an eval-mode BatchNorm2d with the
    same statistics, in place, so that the backends fuse it into the preceding conv like any BatchNorm."""
    for name, child in model.named_children():
        if isinstance(child, FrozenBatchNorm2d):
            bn = nn.BatchNorm2d(child.weight.numel(), eps=child.eps).eval()
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, key).data.copy_(getattr(child, key))
            setattr(model, name, bn)
        else:
            fold_frozen_batchnorm(child)
    return model


def calibration_batches(plan: QuantizationPlan, images: Sequence[Tensor] | Tensor, batch_size: int) -> list:
    """``images`` split into model inputs: lists of images for a detector, stacked tensors for a classifier."""
    if len(images) == 0:
        raise DetrqError("the calibration set is empty; pass at least one image")
    images = list(images)
    chunks = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    return chunks if plan.kind == "detector" else [torch.stack(c) for c in chunks]


def capture_inputs(model: nn.Module, targets: Sequence[str], batch) -> dict[str, tuple]:
    """The positional inputs each target submodule receives when ``model`` runs on ``batch``."""
    if targets == ("",):
        return {"": (batch,)}
    seen: dict[str, tuple] = {}

    def keep_first(target: str):
        def hook(_m, args):
            # Returns None: a pre-hook's return value would replace the arguments of later calls (the RPN head
            # runs once per FPN level).
            seen.setdefault(target, tuple(a.detach() for a in args))
        return hook

    hooks = [model.get_submodule(t).register_forward_pre_hook(keep_first(t)) for t in targets]
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for h in hooks:
            h.remove()
    missing = [t for t in targets if t not in seen]
    if missing:
        raise DetrqError(f"{missing} never ran on the calibration images; is the model in eval mode?")
    return seen


@dataclass(frozen=True)
class Backend:
    """prepare(float module, example inputs) -> observed module; convert(observed module) -> int8 module."""

    prepare: Callable[[nn.Module, tuple], nn.Module]
    convert: Callable[[nn.Module], nn.Module]
