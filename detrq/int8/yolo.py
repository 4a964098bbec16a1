"""A YOLOv8-architecture detector in plain PyTorch, so that detrq's ONNX path is measured on a YOLO-family model
without the Ultralytics package (AGPL-3.0) in the lock file.

The module tree follows YOLOv8's published design at its "n" scale (width 0.25, depth 0.33): Conv-BN-SiLU blocks,
C2f stages, SPPF, a PAN-FPN neck over strides 8/16/32 and the decoupled anchor-free head with a distribution
focal loss (DFL) box branch of 16 bins. ``forward`` returns what a YOLOv8 ONNX export returns: ``[batch, 4 +
classes, anchors]`` with boxes as (cx, cy, w, h) in input pixels and sigmoid class scores (8400 anchors at 640 px).
The weights here are random; ``detrq.int8.onnx_stock`` recalibrates the BN statistics before export.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

STRIDES = (8, 16, 32)
REG_MAX = 16  # DFL bins per box side


class ConvBN(nn.Module):
    """Conv2d (no bias) + BatchNorm + SiLU, YOLOv8's ``Conv``."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool) -> None:
        super().__init__()
        self.cv1, self.cv2 = ConvBN(c, c, 3), ConvBN(c, c, 3)
        self.add = shortcut

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """Split in two, run ``n`` bottlenecks on one half keeping every intermediate, concatenate, fuse."""

    def __init__(self, c_in: int, c_out: int, n: int, shortcut: bool) -> None:
        super().__init__()
        self.c = c_out // 2
        self.cv1 = ConvBN(c_in, 2 * self.c)
        self.cv2 = ConvBN((2 + n) * self.c, c_out)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: Tensor) -> Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.cv1 = ConvBN(c_in, c_in // 2)
        self.cv2 = ConvBN(c_in // 2 * 4, c_out)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x: Tensor) -> Tensor:
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.pool(y[-1]))
        return self.cv2(torch.cat(y, 1))


class Detect(nn.Module):
    """YOLOv8's decoupled head: per level a box branch (4 x 16 DFL logits) and a class branch, then decoding."""

    def __init__(self, num_classes: int, channels: tuple[int, ...]) -> None:
        super().__init__()
        self.nc = num_classes
        c2, c3 = max(16, channels[0] // 4, 4 * REG_MAX), max(channels[0], min(num_classes, 100))
        self.cv2 = nn.ModuleList(nn.Sequential(ConvBN(c, c2, 3), ConvBN(c2, c2, 3), nn.Conv2d(c2, 4 * REG_MAX, 1))
                                 for c in channels)
        self.cv3 = nn.ModuleList(nn.Sequential(ConvBN(c, c3, 3), ConvBN(c3, c3, 3), nn.Conv2d(c3, num_classes, 1))
                                 for c in channels)
        self.dfl = nn.Conv2d(REG_MAX, 1, 1, bias=False).requires_grad_(False)
        self.dfl.weight.data[:] = torch.arange(REG_MAX, dtype=torch.float32).view(1, REG_MAX, 1, 1)

    def forward(self, feats: list[Tensor]) -> Tensor:
        b = feats[0].shape[0]
        raw = torch.cat([torch.cat([c2(x), c3(x)], 1).flatten(2) for x, c2, c3 in zip(feats, self.cv2, self.cv3)], 2)
        box, cls = raw.split((4 * REG_MAX, self.nc), 1)
        # DFL: the expected bin of a softmax over 16 bins, per side (left, top, right, bottom)
        dist = self.dfl(box.view(b, 4, REG_MAX, -1).transpose(2, 1).softmax(1)).view(b, 4, -1)
        anchors, strides = self._anchors(feats)
        lt, rb = dist.chunk(2, 1)
        x1y1, x2y2 = anchors - lt, anchors + rb
        boxes = torch.cat([(x1y1 + x2y2) / 2, x2y2 - x1y1], 1) * strides
        return torch.cat([boxes, cls.sigmoid()], 1)

    @staticmethod
    def _anchors(feats: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Grid-cell centres of every level ([2, A], in cells) and each anchor's stride ([1, A])."""
        points, strides = [], []
        for x, s in zip(feats, STRIDES):
            h, w = x.shape[2:]
            sy, sx = torch.meshgrid(torch.arange(h, dtype=x.dtype) + 0.5, torch.arange(w, dtype=x.dtype) + 0.5,
                                    indexing="ij")
            points.append(torch.stack([sx, sy]).flatten(1))
            strides.append(torch.full((1, h * w), float(s), dtype=x.dtype))
        return torch.cat(points, 1), torch.cat(strides, 1)


class YOLOv8(nn.Module):
    """YOLOv8 at scale "n" by default (``width`` 0.25, ``depth`` 0.33, 3.0M parameters with 80 classes)."""

    def __init__(self, num_classes: int = 80, width: float = 0.25, depth: float = 0.33) -> None:
        super().__init__()

        def c(ch: int) -> int:
            return int(ch * width)

        def n(k: int) -> int:
            return max(round(k * depth), 1)

        self.stem = nn.Sequential(ConvBN(3, c(64), 3, 2), ConvBN(c(64), c(128), 3, 2), C2f(c(128), c(128), n(3), True))
        self.p3 = nn.Sequential(ConvBN(c(128), c(256), 3, 2), C2f(c(256), c(256), n(6), True))
        self.p4 = nn.Sequential(ConvBN(c(256), c(512), 3, 2), C2f(c(512), c(512), n(6), True))
        self.p5 = nn.Sequential(ConvBN(c(512), c(1024), 3, 2), C2f(c(1024), c(1024), n(3), True),
                                SPPF(c(1024), c(1024)))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.top4 = C2f(c(1024) + c(512), c(512), n(3), False)
        self.top3 = C2f(c(512) + c(256), c(256), n(3), False)
        self.down3 = ConvBN(c(256), c(256), 3, 2)
        self.bottom4 = C2f(c(256) + c(512), c(512), n(3), False)
        self.down4 = ConvBN(c(512), c(512), 3, 2)
        self.bottom5 = C2f(c(512) + c(1024), c(1024), n(3), False)
        self.detect = Detect(num_classes, (c(256), c(512), c(1024)))

    def forward(self, x: Tensor) -> Tensor:
        p3 = self.p3(self.stem(x))
        p4 = self.p4(p3)
        p5 = self.p5(p4)
        t4 = self.top4(torch.cat([self.up(p5), p4], 1))
        t3 = self.top3(torch.cat([self.up(t4), p3], 1))
        b4 = self.bottom4(torch.cat([self.down3(t3), t4], 1))
        b5 = self.bottom5(torch.cat([self.down4(b4), p5], 1))
        return self.detect([t3, b4, b5])
