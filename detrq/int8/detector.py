"""The embedded default's CNN detector: torchvision Faster R-CNN on a narrow ResNet-style trunk with an FPN.

torchvision's stock small detector (MobileNetV3-FPN) feeds the FPN from strides 16 and 32 only and has anchors
of 32-512 px, too coarse for 128 px images with 18-128 px objects, and its 12.8M-parameter box head alone would
exceed the 20 MB checkpoint budget. This config reuses DETR-mini's ``NarrowResNet`` trunk (torchvision
BasicBlocks, whose shared ReLU is the pattern the pt2e quantizer trips on) at strides 8-32 plus a max-pooled
level, anchors of 16-128 px, and a 512-wide TwoMLPHead. Everything else is torchvision's FasterRCNN.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from detrq.io.errors import DetrqError
from detrq.io.results import sha256_file
from detrq.models.detr import NarrowResNet


@dataclass(frozen=True)
class FrcnnConfig:
    """Architecture of the embedded Faster R-CNN; stored in its checkpoint so loading rebuilds it exactly."""

    name: str = "narrow"
    num_classes: int = 11  # 10 synthetic categories (ids 1..10) + background 0
    stem: int = 32
    stages: tuple[int, ...] = (32, 64, 128, 256)
    fpn_layers: tuple[int, ...] = (2, 3, 4)  # trunk stages feeding the FPN: strides 8, 16, 32 (+ pool: 64)
    fpn_channels: int = 64
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128)  # one per FPN level, smallest first
    representation: int = 512  # TwoMLPHead width
    image_size: int = 128  # GeneralizedRCNNTransform min_size = max_size
    # Training-time sampling, cut from torchvision's 2000 proposals / 512 RoIs per image because 128 px images
    # hold at most 6 objects and the box head's cost scales with the RoI count. Inference keeps the defaults.
    rpn_post_nms_train: int = 500
    box_rois_train: int = 128

    @classmethod
    def from_dict(cls, d: dict) -> "FrcnnConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise DetrqError(f"unknown Faster R-CNN config keys {sorted(unknown)}; the checkpoint is from another "
                             "version of detrq")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def build_frcnn(cfg: FrcnnConfig = FrcnnConfig()) -> FasterRCNN:
    """A randomly initialised Faster R-CNN with ``cfg``'s architecture (BatchNorm, trained from scratch)."""
    if len(cfg.anchor_sizes) != len(cfg.fpn_layers) + 1:
        raise DetrqError(f"anchor_sizes needs one size per FPN level ({len(cfg.fpn_layers) + 1}), "
                         f"got {len(cfg.anchor_sizes)}")
    trunk = NarrowResNet(cfg.stem, cfg.stages, norm_layer=nn.BatchNorm2d)
    backbone = BackboneWithFPN(
        trunk,
        return_layers={f"layer{i}": str(k) for k, i in enumerate(cfg.fpn_layers)},
        in_channels_list=[cfg.stages[i - 1] for i in cfg.fpn_layers],
        out_channels=cfg.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )
    levels = [str(k) for k in range(len(cfg.fpn_layers))]
    anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), ((0.5, 1.0, 2.0),) * len(cfg.anchor_sizes))
    roi_pool = MultiScaleRoIAlign(featmap_names=levels, output_size=7, sampling_ratio=2)
    box_head = TwoMLPHead(cfg.fpn_channels * 7 * 7, cfg.representation)
    predictor = FastRCNNPredictor(cfg.representation, cfg.num_classes)
    return FasterRCNN(backbone, min_size=cfg.image_size, max_size=cfg.image_size, rpn_anchor_generator=anchors,
                      box_roi_pool=roi_pool, box_head=box_head, box_predictor=predictor,
                      rpn_pre_nms_top_n_train=cfg.rpn_post_nms_train, rpn_post_nms_top_n_train=cfg.rpn_post_nms_train,
                      box_batch_size_per_image=cfg.box_rois_train)


def save_frcnn(model: FasterRCNN, cfg: FrcnnConfig, path: str | Path) -> None:
    """Write ``{"model": state_dict, "config": cfg}`` (plain data, loadable with ``weights_only=True``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(cfg)}, tmp)
    tmp.replace(path)


def load_frcnn(path: str | Path) -> tuple[FasterRCNN, FrcnnConfig, str]:
    """The model (eval mode), its config and the checkpoint's SHA-256."""
    path = Path(path)
    if not path.is_file():
        raise DetrqError(f"checkpoint not found: {path}; train one with `python -m detrq.int8.train`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for pickles that need code execution
        raise DetrqError(f"{path} is not a plain-data checkpoint ({type(e).__name__}); refusing to unpickle it")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise DetrqError(f"{path} is not a detrq Faster R-CNN checkpoint (needs 'model' and 'config')")
    cfg = FrcnnConfig.from_dict(ckpt["config"])
    model = build_frcnn(cfg)
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if missing or unexpected:
        raise DetrqError(f"{path} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval(), cfg, sha256_file(path)
