"""DETR with the official module tree and parameter names, so official checkpoints load with strict=True.

Presets: "r50" (official DETR-R50 for COCO), "mini" (the embedded default: a narrow ResNet-style trunk and a
small transformer, trained by this project on synthetic data) and "tiny" (a random model for fast tests).
Every numerical detail that the official implementation fixes (padding, mask resizing, sine position
encoding, where positions enter attention, the shared final decoder norm) is kept; see FIELD_NOTES.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock

from detrq.io.errors import DetrqError
from detrq.io.torch_files import load_weights_only
from detrq.models.boxes import box_cxcywh_to_xyxy


@dataclass(frozen=True)
class DetrConfig:
    """Everything that determines a DETR's architecture."""

    backbone: str  # a torchvision ResNet of RESNETS ("resnet50": the official DETR) or "narrow"
    num_classes: int  # max category id + 1; the logits have num_classes + 1 columns (the last is no-object)
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    num_queries: int = 100
    aux_loss: bool = True
    stem_channels: int = 24  # narrow trunk only
    stage_channels: tuple[int, ...] = field(default=(32, 64, 128))  # narrow trunk only; first stage stride 1
    train_backbone: bool = True
    min_size: int = 800  # eval image policy: shorter side resized to min_size ...
    max_size: int = 1333  # ... and the longer side capped at max_size
    dilation: bool = False  # ResNet trunks only: layer4 dilated instead of strided (the official DC5 models)


PRESETS: dict[str, DetrConfig] = {
    "r50": DetrConfig(backbone="resnet50", num_classes=91),
    "mini": DetrConfig(
        backbone="narrow", num_classes=11, hidden_dim=128, nheads=4, enc_layers=3, dec_layers=3,
        dim_feedforward=256, num_queries=20, stem_channels=24, stage_channels=(32, 64, 128), min_size=128,
        max_size=128,
    ),
    "tiny": DetrConfig(
        backbone="narrow", num_classes=11, hidden_dim=32, nheads=2, enc_layers=1, dec_layers=2,
        dim_feedforward=64, num_queries=6, stem_channels=8, stage_channels=(8, 16, 32), min_size=64,
        max_size=64,
    ),
}


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters, held as buffers (no num_batches_tracked)."""

    def __init__(self, n: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # torchvision ResNet checkpoints carry this BatchNorm2d counter; the official DETR drops it too.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        # Added in place to the fresh product: one full-size tensor less, the same two roundings.
        return (x * scale.reshape(1, -1, 1, 1)).add_(bias.reshape(1, -1, 1, 1))


class StemMaxPool(nn.MaxPool2d):
    """The ResNet stem's 3x3, stride-2, padding-1 max-pool.

    Without autograd (every evaluation and measured-cost scan) it is taken as two passes of strided maxima, over
    columns then rows: the same numbers as ``max_pool2d`` (a maximum rounds nothing), about 4x faster on a CPU,
    where it was a tenth of an evaluation. With autograd ``max_pool2d`` runs: its backward sends a tied window's
    gradient to one element, ``torch.maximum``'s would split it.
    """

    def __init__(self) -> None:
        super().__init__(kernel_size=3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return super().forward(x)
        p = F.pad(x, (1, 1, 1, 1), value=float("-inf"))
        h, w = (x.shape[-2] + 1) // 2, (x.shape[-1] + 1) // 2
        cols = torch.maximum(torch.maximum(p[..., 0:2 * w - 1:2], p[..., 1:2 * w:2]), p[..., 2:2 * w + 1:2])
        return torch.maximum(torch.maximum(cols[..., 0:2 * h - 1:2, :], cols[..., 1:2 * h:2, :]),
                             cols[..., 2:2 * h + 1:2, :])


class NarrowResNet(nn.Module):
    """A small ResNet-style trunk (one BasicBlock per stage) with torchvision's attribute names.

    Stem: 3x3 conv stride 2 + max-pool (stride 4); the first stage keeps the stride, each later stage halves it,
    so three stages give stride 16 — at 128 px that is an 8x8 map, fine enough for small objects.
    """

    def __init__(self, stem: int, stages: tuple[int, ...], norm_layer=FrozenBatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem, 3, stride=2, padding=1, bias=False)
        self.bn1 = norm_layer(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = StemMaxPool()
        inplanes = stem
        for i, planes in enumerate(stages):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or inplanes != planes:
                down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), norm_layer(planes))
            block = BasicBlock(inplanes, planes, stride=stride, downsample=down, norm_layer=norm_layer)
            self.add_module(f"layer{i + 1}", nn.Sequential(block))
            inplanes = planes
        self.num_stages = len(stages)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x


# The official DETR's trunks (its --backbone choices) and their output channels; Hugging Face checkpoints use them too.
RESNETS: dict[str, int] = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}


def build_trunk(cfg: DetrConfig, norm_layer=FrozenBatchNorm2d) -> tuple[nn.Module, int]:
    """The CNN trunk named as the official ``backbone.0.body`` and its output channels."""
    if cfg.backbone in RESNETS:
        if cfg.dilation and cfg.backbone in ("resnet18", "resnet34"):
            raise DetrqError(f"{cfg.backbone} has basic blocks, which torchvision cannot dilate: dilation needs "
                             "resnet50 or resnet101")
        # torchvision's ResNets are v1.5 (stride on the 3x3 conv), as in the official DETR.
        resnet = getattr(torchvision.models, cfg.backbone)(
            weights=None, replace_stride_with_dilation=[False, False, cfg.dilation], norm_layer=norm_layer)
        resnet.maxpool = StemMaxPool()  # the same pool (parameter-free), faster without autograd
        return IntermediateLayerGetter(resnet, return_layers={"layer4": "0"}), RESNETS[cfg.backbone]
    if cfg.dilation:
        raise DetrqError("dilation applies to ResNet trunks only, not the narrow trunk")
    if cfg.backbone == "narrow":
        return NarrowResNet(cfg.stem_channels, cfg.stage_channels, norm_layer), cfg.stage_channels[-1]
    raise DetrqError(f"unknown backbone {cfg.backbone!r}: use one of {', '.join(RESNETS)} or 'narrow'")


class Backbone(nn.Module):
    """The trunk plus the padding mask resized to its feature map (official ``BackboneBase``)."""

    def __init__(self, cfg: DetrConfig):
        super().__init__()
        self.body, self.num_channels = build_trunk(cfg)
        for name, p in self.body.named_parameters():
            # Official ResNets: only layer2-4 train, conv1 and layer1 stay frozen. The narrow trunk trains whole.
            early = not any(s in name for s in ("layer2", "layer3", "layer4"))
            if not cfg.train_backbone or (cfg.backbone in RESNETS and early):
                p.requires_grad_(False)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        feat = self.body(x)
        if isinstance(feat, dict):
            feat = feat["0"]
        # Legacy 'nearest' (not 'nearest-exact'): the official code's choice decides which border cells count.
        m = F.interpolate(mask[None].float(), size=feat.shape[-2:]).to(torch.bool)[0]
        return feat, m


class PositionEmbeddingSine(nn.Module):
    """The official sine encoding: normalised cumsums, interleaved sin/cos, y channels before x channels."""

    def __init__(self, num_pos_feats: int, temperature: float = 10000.0, scale: float = 2 * math.pi):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale

    def forward(self, mask: Tensor) -> Tensor:
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        eps = 1e-6
        y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
        x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class Joiner(nn.Sequential):
    """``backbone.0`` is the trunk, ``backbone.1`` the (parameter-free) position encoding, as officially."""

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feat, m = self[0](x, mask)
        return feat, m, self[1](m).to(feat.dtype)


class EncoderLayer(nn.Module):
    """Post-norm encoder layer: positions are added to queries and keys, never to values."""

    def __init__(self, d: int, nhead: int, dff: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d, dff)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dff, d)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src: Tensor, mask: Tensor, pos: Tensor) -> Tensor:
        q = k = src + pos
        src = self.norm1(src + self.dropout1(self.self_attn(q, k, value=src, key_padding_mask=mask)[0]))
        src2 = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout2(src2))


class DecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention over queries, cross-attention into the encoder memory."""

    def __init__(self, d: int, nhead: int, dff: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d, dff)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dff, d)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        self.norm3 = nn.LayerNorm(d)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor, mask: Tensor, pos: Tensor, query_pos: Tensor) -> Tensor:
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, value=tgt)[0]))
        tgt2 = self.multihead_attn(query=tgt + query_pos, key=memory + pos, value=memory, key_padding_mask=mask)[0]
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(tgt2))


class Encoder(nn.Module):
    def __init__(self, cfg: DetrConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg.hidden_dim, cfg.nheads, cfg.dim_feedforward, cfg.dropout)
                                    for _ in range(cfg.enc_layers))

    def forward(self, src: Tensor, mask: Tensor, pos: Tensor) -> Tensor:
        for layer in self.layers:
            src = layer(src, mask, pos)
        return src


class Decoder(nn.Module):
    def __init__(self, cfg: DetrConfig):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg.hidden_dim, cfg.nheads, cfg.dim_feedforward, cfg.dropout)
                                    for _ in range(cfg.dec_layers))
        self.norm = nn.LayerNorm(cfg.hidden_dim)

    def forward(self, tgt: Tensor, memory: Tensor, mask: Tensor, pos: Tensor, query_pos: Tensor) -> Tensor:
        """Returns [L, Q, B, d]: every layer's output after the shared final norm (the aux outputs use it too)."""
        out = []
        for layer in self.layers:
            tgt = layer(tgt, memory, mask, pos, query_pos)
            out.append(self.norm(tgt))
        return torch.stack(out)


class Transformer(nn.Module):
    def __init__(self, cfg: DetrConfig):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def encode(self, src: Tensor, mask: Tensor, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The encoder memory [HW, B, d] with the flattened mask [B, HW] and positions [HW, B, d]."""
        src = src.flatten(2).permute(2, 0, 1)
        pos = pos.flatten(2).permute(2, 0, 1)
        mask = mask.flatten(1)
        return self.encoder(src, mask, pos), mask, pos

    def decode(self, memory: Tensor, mask: Tensor, pos: Tensor, query_embed: Tensor) -> Tensor:
        """Decoder states [L, B, Q, d] from ``encode``'s outputs."""
        query_pos = query_embed.unsqueeze(1).repeat(1, memory.shape[1], 1)
        hs = self.decoder(torch.zeros_like(query_pos), memory, mask, pos, query_pos)
        return hs.transpose(1, 2)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos: Tensor) -> Tensor:
        """Returns decoder states [L, B, Q, d]."""
        return self.decode(*self.encode(src, mask, pos), query_embed)


class MLP(nn.Module):
    """Linear layers with ReLU between them (the box head)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, num_layers: int):
        super().__init__()
        dims = [d_in] + [d_hidden] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [d_out]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return x


def pad_images(images: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Pad to the batch's max H and max W (no rounding), zeros bottom/right; mask is True on padding."""
    h = max(im.shape[1] for im in images)
    w = max(im.shape[2] for im in images)
    batch = images[0].new_zeros((len(images), 3, h, w))
    mask = torch.ones((len(images), h, w), dtype=torch.bool, device=images[0].device)
    for im, b, m in zip(images, batch, mask):
        b[:, : im.shape[1], : im.shape[2]].copy_(im)
        m[: im.shape[1], : im.shape[2]] = False
    return batch, mask


class DETR(nn.Module):
    """DETR; attribute creation order reproduces the official state-dict order."""

    def __init__(self, cfg: DetrConfig):
        super().__init__()
        self.cfg = cfg
        self.num_queries = cfg.num_queries
        self.transformer = Transformer(cfg)
        self.class_embed = nn.Linear(cfg.hidden_dim, cfg.num_classes + 1)
        self.bbox_embed = MLP(cfg.hidden_dim, cfg.hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(cfg.num_queries, cfg.hidden_dim)
        backbone = Backbone(cfg)
        self.input_proj = nn.Conv2d(backbone.num_channels, cfg.hidden_dim, kernel_size=1)
        self.backbone = Joiner(backbone, PositionEmbeddingSine(cfg.hidden_dim // 2))
        self.aux_loss = cfg.aux_loss

    def features(self, images: list[Tensor] | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Padding and backbone: ``(feat, mask, pos)``, which depend on the ``backbone.*`` weights only.

        ``images``: a list of normalised [3,H,W] tensors of any sizes (or a [B,3,H,W] batch of one size).
        """
        if isinstance(images, Tensor) and images.dim() == 4:
            images = list(images)
        x, mask = pad_images(images)
        return self.backbone(x, mask)

    def head(self, feat: Tensor, mask: Tensor, pos: Tensor) -> dict:
        """Everything after the backbone (input projection, transformer, class and box heads) on its features:
        ``decode(*encode(feat, mask, pos))``."""
        return self.decode(*self.encode(feat, mask, pos))

    def encode(self, feat: Tensor, mask: Tensor, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Input projection and encoder: ``(memory, mask, pos)``, which depend on no decoder or head weight."""
        return self.transformer.encode(self.input_proj(feat), mask, pos)

    def decode(self, memory: Tensor, mask: Tensor, pos: Tensor) -> dict:
        """Decoder, class and box heads on ``encode``'s outputs: the outputs dict."""
        hs = self.transformer.decode(memory, mask, pos, self.query_embed.weight)
        logits = self.class_embed(hs)
        boxes = self.bbox_embed(hs).sigmoid()
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        return out

    def forward(self, images: list[Tensor] | Tensor) -> dict:
        """``head(*features(images))``: a per-layer scan can reuse the backbone features for a layer outside
        ``backbone.``, and the encoder memory for a decoder or head layer."""
        return self.head(*self.features(images))


def build_detr(preset: str = "r50", **overrides) -> DETR:
    """A DETR from a preset name ("r50", "mini", "tiny"), with optional config field overrides."""
    if preset not in PRESETS:
        raise DetrqError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return DETR(replace(PRESETS[preset], **overrides))


@torch.no_grad()
def postprocess(outputs: dict, target_sizes: Tensor) -> list[dict[str, Tensor]]:
    """Official PostProcess: softmax, drop the no-object column, max; boxes to absolute xyxy.

    ``target_sizes`` is [B, 2] of (h, w) of the original images. No threshold and no top-k.
    """
    prob = F.softmax(outputs["pred_logits"], -1)
    scores, labels = prob[..., :-1].max(-1)
    boxes = box_cxcywh_to_xyxy(outputs["pred_boxes"])
    img_h, img_w = target_sizes.unbind(1)
    scale = torch.stack([img_w, img_h, img_w, img_h], dim=1).to(boxes.dtype)
    boxes = boxes * scale[:, None, :]
    return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)]


def _state_dict_shapes(preset: str, num_classes: int | None = None) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = build_detr(preset, num_classes=num_classes)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def guess_preset(state_dict: dict[str, Tensor]) -> str | None:
    """The preset whose key set matches ``state_dict`` best (class count aside), or None if none is close."""
    keys = set(state_dict)
    best, best_overlap = None, 0.0
    for name in PRESETS:
        shapes = _state_dict_shapes(name)
        overlap = len(keys & set(shapes)) / max(len(keys | set(shapes)), 1)
        same_shapes = all(tuple(state_dict[k].shape) == shapes[k] for k in keys & set(shapes)
                          if not k.startswith("class_embed"))
        if same_shapes and overlap > best_overlap:
            best, best_overlap = name, overlap
    return best if best_overlap > 0.5 else None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint file in the official format (``{"model": state_dict, ...}``, with whatever else it carries)
    or a bare state dict (returned as ``{"model": state_dict}``), read with ``weights_only=True``."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        raise DetrqError(f"{path} is a bare safetensors file: pass the Hugging Face directory that holds it with its "
                         "config.json, or a .pth")
    ckpt = load_weights_only(path, "checkpoint")
    sd = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise DetrqError(f"{path} holds no DETR state dict (expected {{'model': state_dict}} or a state dict)")
    return {**ckpt, "model": sd} if "model" in ckpt else {"model": sd}


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The state dict of a checkpoint file (``read_checkpoint``)."""
    return read_checkpoint(path)["model"]


def load_checkpoint(model: DETR, path: str | Path) -> DETR:
    """Load a checkpoint file into ``model`` with strict=True, or raise one clear ``DetrqError``. (A Hugging Face
    directory, or a file that carries its own architecture, goes through ``loading.load_model``.)"""
    return load_state(model, read_state_dict(path), path)


def load_state(model: DETR, sd: dict[str, Tensor], source: str | Path) -> DETR:
    """Load an official-layout state dict read from ``source`` into ``model`` with strict=True, or raise one
    ``DetrqError`` naming the missing, unexpected or mis-shaped entries and the preset the state dict fits."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own and not k.endswith("num_batches_tracked")]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
        if wrong:
            k = wrong[0]
            parts.append(f"shape mismatch at {k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}")
        fit = guess_preset(sd)
        hint = f"; the file looks like preset {fit!r}" if fit else "; it fits no known preset"
        raise DetrqError(f"checkpoint {source} does not match the model: {'; '.join(parts)}{hint}")
    model.load_state_dict(sd, strict=True)
    return model
