"""torchvision detection inputs from the COCO-layout dataset.

``detrq.data.coco`` yields DETR inputs: ImageNet-normalised images and cxcywh boxes relative to the image.
torchvision detectors normalise inside the model and want [0, 1] images with xyxy boxes in pixels. The one
conversion lives here, as a transform wrapper, so the dataset, its transforms and their augmentation are reused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from detrq.data.coco import IMAGENET_MEAN, IMAGENET_STD, CocoDetection, EvalTransform, TrainTransform, Transform

_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def to_torchvision(image: Tensor, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    """A DETR-style (normalised image, cxcywh relative boxes) pair as torchvision wants it:
    a [0, 1] image and ``boxes`` xyxy in pixels of that image; other target keys are kept."""
    h, w = (int(v) for v in target["size"])
    cx, cy, bw, bh = (target["boxes"] * torch.tensor([w, h, w, h], dtype=torch.float32)).unbind(-1)
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1).reshape(-1, 4)
    return (image * _STD + _MEAN).clamp_(0, 1), {**target, "boxes": boxes}


class TorchvisionTargets:
    """Wrap a DETR transform so the dataset yields torchvision detection inputs (see ``to_torchvision``)."""

    def __init__(self, inner: Transform) -> None:
        self.inner = inner

    def __call__(self, image: Image.Image, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        return to_torchvision(*self.inner(image, target))

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "normalize": "none ([0, 1] image; the model normalises)",
                "boxes": "xyxy pixels"}


def detection_dataset(root: str | Path, split: str, size: int, *, train: bool = False,
                      max_images: int | None = None) -> CocoDetection:
    """The split at ``size`` px (shorter side, longer side capped at ``size``) with torchvision targets;
    ``train`` adds the random horizontal flip of ``TrainTransform``."""
    inner = TrainTransform(size, size) if train else EvalTransform(size, size)
    return CocoDetection(root, split, TorchvisionTargets(inner), max_images=max_images)
