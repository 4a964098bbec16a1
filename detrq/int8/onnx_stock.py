"""ONNX files of stock one-stage detectors, as users export them, for the ONNX path's tests and its docs rows.

- ``yolov8n``: ``detrq.int8.yolo.YOLOv8`` exported like a YOLOv8 export: [N, 3, S, S] RGB / 255 in, decoded
  ``[N, 4 + classes, anchors]`` out, dynamic batch;
- ``retinanet_resnet50_fpn`` and ``ssdlite320_mobilenet_v3_large``: torchvision's detectors exported as their
  raw head (ImageNet normalisation inside, [N, 3, S, S] in [0, 1]; out ``bbox_regression`` and ``cls_logits`` per
  anchor), the form deployment pipelines that decode outside the graph export. RetinaNet has a dynamic batch;
  SSDlite is exported at a fixed batch of 1 and its own 320 px.

Weights are seeded random with every BatchNorm's statistics recalibrated on letterboxed images of the dataset
(``stock.recalibrate_all_bn``), as ``detrq.int8.stock`` does for the two-stage models. The legacy TorchScript
exporter (opset 17) writes no source paths, so the bytes depend only on the model and its weights.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import detection

from detrq.int8.calibration import Preprocess, coco_images, load_batch
from detrq.int8.stock import recalibrate_all_bn
from detrq.int8.yolo import YOLOv8
from detrq.io.errors import DetrqError
from detrq.io.paths import resolve_path
from detrq.io.results import atomic_output

# name: input px. YOLOv8 and SSDlite at their own export sizes; RetinaNet (torchvision evaluates at 800) at 320, so
# that the peak-memory runs up to batch 64 stay within a few GB on a CPU machine.
ONNX_STOCK = {"yolov8n": 640, "retinanet_resnet50_fpn": 320, "ssdlite320_mobilenet_v3_large": 320}
OPSET = 17


class RawHead(nn.Module):
    """A torchvision one-stage detector up to its head's raw outputs, sorted by name."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(model.transform.image_mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(model.transform.image_std).view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        features = list(self.model.backbone((x - self.mean) / self.std).values())
        out = self.model.head(features)
        return tuple(out[k] for k in sorted(out))


def build(name: str, num_classes: int, seed: int) -> tuple[nn.Module, list[str]]:
    """The float module (random weights, seeded) and its output names."""
    torch.manual_seed(seed)
    if name == "yolov8n":
        return YOLOv8(num_classes), ["output0"]
    if name in ("retinanet_resnet50_fpn", "ssdlite320_mobilenet_v3_large"):
        # +1: torchvision's class 0 is the background
        model = getattr(detection, name)(weights=None, weights_backbone=None, num_classes=num_classes + 1)
        return RawHead(model), ["bbox_regression", "cls_logits"]
    raise DetrqError(f"unknown ONNX stock model {name!r}; use one of {', '.join(ONNX_STOCK)}")


def export_stock(name: str, path: str | Path, data: str | Path, *, image_size: int | None = None, seed: int = 0,
                 bn_images: int = 16) -> Path:
    """``name`` with random weights, BN recalibrated on ``bn_images`` class-balanced train images of the COCO-format
    ``data`` (letterboxed to ``image_size``, default ``ONNX_STOCK[name]``), exported to ``path``."""
    if name not in ONNX_STOCK:
        raise DetrqError(f"unknown ONNX stock model {name!r}; use one of {', '.join(ONNX_STOCK)}")
    size = image_size or ONNX_STOCK[name]
    images = coco_images(resolve_path(data), "train", bn_images, balanced_seed=seed)
    module, outputs = build(name, len(images.coco.getCatIds()), seed)
    batch, _ = load_batch(images.paths, Preprocess(size, size))
    recalibrate_all_bn(module, list(torch.from_numpy(batch).split(4)))
    fixed_batch = name.startswith("ssdlite")
    dynamic = None if fixed_batch else {n: {0: "batch"} for n in ["images", *outputs]}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(module, (torch.from_numpy(batch[:1]),), buf, dynamo=False, opset_version=OPSET,
                          input_names=["images"], output_names=outputs, dynamic_axes=dynamic)
    path = resolve_path(path)
    with atomic_output(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return path
