"""torchvision's stock Faster R-CNNs (the architectures users quantize) with random weights fit for INT8 measurement.

Pretrained weights cannot be downloaded here, so ``build_stock`` builds the architecture with random weights
(seeded) and trainable BatchNorm (``weights_backbone=None``), then ``recalibrate_batchnorm`` re-estimates every BN's
running statistics on a few images. Without it, random init with eval-mode BN (mean 0, variance 1) makes the
ResNet-50's features explode through the residual stack (about 20 at P2) and MobileNetV3's vanish (about 1e-8),
so int8 calibration ranges would be meaningless; after it, activations are O(1), as in a trained network.
``box_score_thresh=0``: random 91-class scores fall under torchvision's 0.05, which would leave no detections.
Size and latency depend on the architecture, not on the weights' values, as long as the RoI count matches a
trained detector's (about 1000 per image after the RPN's NMS; the workflow measures and records it). AP of a
random-weight model means nothing and is not reported.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.models import detection

from detrq.io.errors import DetrqError

STOCK_MODELS = ("fasterrcnn_resnet50_fpn", "fasterrcnn_mobilenet_v3_large_fpn")
# torchvision's evaluation size for its COCO detectors (shorter side).
STOCK_IMAGE_SIZE = 800


def _train_bn_only(model: nn.Module, bns: Sequence[nn.BatchNorm2d]) -> None:
    """``model`` in eval mode but ``bns`` in train mode, their statistics reset to a cumulative average."""
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over all batches, not an exponential one
    model.eval()
    for bn in bns:
        bn.train()


def recalibrate_all_bn(model: nn.Module, batches: Sequence[Tensor]) -> nn.Module:
    """``recalibrate_batchnorm`` for a model that takes a [N, 3, H, W] batch: every BatchNorm2d of ``model``
    (backbone, neck and head), over ``model(batch)`` for each of ``batches``; returns it in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns or len(batches) == 0:
        raise DetrqError(f"BatchNorm recalibration of {type(model).__name__} needs BatchNorm2d layers and an image")
    _train_bn_only(model, bns)
    with torch.no_grad():
        for batch in batches:
            model(batch)
    return model.eval()


def recalibrate_batchnorm(model: nn.Module, images: Sequence[Tensor], batch_size: int = 2) -> nn.Module:
    """Replace the running mean/variance of every BatchNorm2d in ``model.backbone`` by their cumulative average
    over ``images`` (train-mode forward passes, no gradients), in place; returns the model in eval mode."""
    if len(images) == 0:
        raise DetrqError("BatchNorm recalibration needs at least one image")
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        raise DetrqError(f"{type(model).__name__}.backbone has no BatchNorm2d to recalibrate (frozen BN?)")
    _train_bn_only(model, bns)
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            model.backbone(model.transform(list(images[i:i + batch_size]))[0].tensors)
    return model.eval()


def build_stock(name: str, image_size: int, seed: int, bn_images: Sequence[Tensor]) -> nn.Module:
    """torchvision's ``name`` (one of ``STOCK_MODELS``, 91 COCO classes) with seeded random weights, images
    resized to ``image_size`` px on both sides, BN statistics recalibrated on ``bn_images``; eval mode."""
    if name not in STOCK_MODELS:
        raise DetrqError(f"unknown stock model {name!r}; use one of {', '.join(STOCK_MODELS)}")
    torch.manual_seed(seed)
    model = getattr(detection, name)(weights=None, weights_backbone=None, min_size=image_size, max_size=image_size,
                                     box_score_thresh=0.0)
    return recalibrate_batchnorm(model, bn_images)
