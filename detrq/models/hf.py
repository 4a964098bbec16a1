"""Hugging Face DETR checkpoints, converted at the edge to and from the official layout.

A Hugging Face checkpoint is a directory with ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``),
named as the hub's ``facebook/detr-resnet-50`` is and as transformers 5 still writes with ``save_pretrained``
(FIELD_NOTES.md, "Hugging Face DETR checkpoints"). Its names differ from the official ones only by renaming and by
splitting each attention's ``in_proj`` into ``q_proj``, ``k_proj`` and ``v_proj`` (rows in q, k, v order):

* ``backbone.0.body.X`` is ``model.backbone.conv_encoder.model.X`` with a timm ResNet (timm's names are
  torchvision's), or with the "no_timm" Hugging Face ResNet ``embedder.embedder.*`` (conv1/bn1) and
  ``encoder.stages.{s-1}.layers.{m}.{layer.{k-1} | shortcut}.{convolution | normalization}``;
* ``input_proj``, ``query_embed``, ``class_embed``, ``bbox_embed``, ``transformer.decoder.norm`` are
  ``model.input_projection``, ``model.query_position_embeddings``, ``class_labels_classifier``, ``bbox_predictor``,
  ``model.decoder.layernorm``; in each layer ``linear1/2`` are ``fc1/2``, the decoder's ``multihead_attn`` is
  ``encoder_attn`` and the norms are ``self_attn_layer_norm``, (``encoder_attn_layer_norm``,) ``final_layer_norm``.

The expected names are derived from the model that the config builds, so a missing or extra tensor and a shape
mismatch are named exactly. Label ids: logit column i of the classifier is class i (the official DETR's class index
is the COCO category id), named ``id2label[i]``; the last column is no-object.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from detrq.io.errors import DetrqError
from detrq.io.torch_files import load_weights_only
from detrq.models.detr import DETR, RESNETS, DetrConfig

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
PREPROCESSOR_FILE = "preprocessor_config.json"
# The two backbone variants of the hub's DETR checkpoints: a timm ResNet, or the Hugging Face ResNet ("no_timm").
VARIANTS: tuple[str, ...] = ("timm", "no_timm")
# Hugging Face ResNet configs equal to a torchvision ResNet: (layer_type, depths, hidden_sizes) with a 64-channel stem.
_HF_RESNETS: dict[str, tuple[str, list[int], list[int]]] = {
    "resnet18": ("basic", [2, 2, 2, 2], [64, 128, 256, 512]),
    "resnet34": ("basic", [3, 4, 6, 3], [64, 128, 256, 512]),
    "resnet50": ("bottleneck", [3, 4, 6, 3], [256, 512, 1024, 2048]),
    "resnet101": ("bottleneck", [3, 4, 23, 3], [256, 512, 1024, 2048]),
}
# The eval size policy of DetrImageProcessor when a checkpoint has no preprocessor_config.json.
_DEFAULT_SIZE = (800, 1333)
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# Names a transformers 5 model's in-memory state_dict() uses (FIELD_NOTES): accepted and read as the on-disk ones.
_IN_MEMORY_ALIASES = ((r"^model\.backbone\.model\.", "model.backbone.conv_encoder.model."),
                      (r"\.o_proj\.", ".out_proj."), (r"\.mlp\.(fc[12])\.", r".\1."))


@dataclass(frozen=True)
class HfCheckpoint:
    """A Hugging Face DETR checkpoint read into the official layout."""

    config: DetrConfig
    state_dict: dict[str, Tensor]  # official names, loads into ``DETR(config)`` with strict=True
    id2label: dict[int, str]  # class index -> name, for every class (the no-object column excluded)
    variant: str  # "timm" or "no_timm"


# --- names -----------------------------------------------------------------------------------------------------

def _backbone_name(rest: str, variant: str) -> str:
    """The Hugging Face name of ``backbone.0.body.<rest>`` (a torchvision ResNet name)."""
    if variant == "timm":
        return rest
    m = re.fullmatch(r"(conv1|bn1)\.(\w+)", rest)
    if m:
        return f"embedder.embedder.{'convolution' if m[1] == 'conv1' else 'normalization'}.{m[2]}"
    m = re.fullmatch(r"layer(\d)\.(\d+)\.(conv|bn)(\d)\.(\w+)", rest)
    if m:
        kind = "convolution" if m[3] == "conv" else "normalization"
        return f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.layer.{int(m[4]) - 1}.{kind}.{m[5]}"
    m = re.fullmatch(r"layer(\d)\.(\d+)\.downsample\.([01])\.(\w+)", rest)
    if m:
        kind = "convolution" if m[3] == "0" else "normalization"
        return f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.shortcut.{kind}.{m[4]}"
    raise DetrqError(f"no Hugging Face name for backbone entry {rest!r}")


_LAYER_PARTS = {
    "encoder": {"linear1": "fc1", "linear2": "fc2", "norm1": "self_attn_layer_norm", "norm2": "final_layer_norm",
                "self_attn": "self_attn"},
    "decoder": {"linear1": "fc1", "linear2": "fc2", "norm1": "self_attn_layer_norm",
                "norm2": "encoder_attn_layer_norm", "norm3": "final_layer_norm", "self_attn": "self_attn",
                "multihead_attn": "encoder_attn"},
}
_TOP = (("input_proj.", "model.input_projection."), ("query_embed.", "model.query_position_embeddings."),
        ("class_embed.", "class_labels_classifier."), ("bbox_embed.", "bbox_predictor."),
        ("transformer.decoder.norm.", "model.decoder.layernorm."))


def hf_names(name: str, variant: str) -> list[str]:
    """The on-disk Hugging Face name(s) of one official state-dict entry: three (q, k, v) for an ``in_proj``."""
    if name.startswith("backbone.0.body."):
        return [f"model.backbone.conv_encoder.model.{_backbone_name(name[len('backbone.0.body.'):], variant)}"]
    for official, hf in _TOP:
        if name.startswith(official):
            return [hf + name[len(official):]]
    m = re.fullmatch(r"transformer\.(encoder|decoder)\.layers\.(\d+)\.(\w+)\.(.+)", name)
    if m and m[3] in _LAYER_PARTS[m[1]]:
        prefix = f"model.{m[1]}.layers.{m[2]}.{_LAYER_PARTS[m[1]][m[3]]}"
        in_proj = re.fullmatch(r"in_proj_(weight|bias)", m[4])
        if in_proj:
            return [f"{prefix}.{p}_proj.{in_proj[1]}" for p in "qkv"]
        return [f"{prefix}.{m[4]}"]
    raise DetrqError(f"no Hugging Face name for {name!r}")


def to_hf(state_dict: Mapping[str, Tensor], variant: str) -> dict[str, Tensor]:
    """An official-layout state dict under the Hugging Face on-disk names (``in_proj`` split in three rows)."""
    _check_variant(variant)
    out: dict[str, Tensor] = {}
    for name, t in state_dict.items():
        names = hf_names(name, variant)
        # Contiguous copies: safetensors refuses tensors that share storage (the chunks of one in_proj would).
        parts = t.chunk(3, dim=0) if len(names) == 3 else [t]
        out.update({n: p.contiguous().clone() for n, p in zip(names, parts)})
    return out


def from_hf(tensors: Mapping[str, Tensor], config: DetrConfig, variant: str, source: str) -> dict[str, Tensor]:
    """The official-layout state dict of ``DETR(config)`` from Hugging Face tensors, or one ``DetrqError`` naming a
    missing or extra tensor or a shape mismatch."""
    _check_variant(variant)
    tensors = {_canonical(k): v for k, v in tensors.items() if not k.endswith("num_batches_tracked")}
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in DETR(config).state_dict().items()}
    wanted = {name: hf_names(name, variant) for name in expected}
    hf_shapes = {}
    for name, shape in expected.items():
        for n in wanted[name]:  # an in_proj's rows split three ways
            hf_shapes[n] = (shape[0] // len(wanted[name]), *shape[1:])
    missing = [n for n in hf_shapes if n not in tensors]
    extra = [n for n in tensors if n not in hf_shapes]
    wrong = [n for n in hf_shapes if n in tensors and tuple(tensors[n].shape) != hf_shapes[n]]
    if missing or extra or wrong:
        if missing or extra:
            kind, names = ("missing", missing) if missing else ("unexpected", extra)
            what = f"{kind} tensor {names[0]!r}" + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")
        else:
            what = (f"shape mismatch at {wrong[0]!r}: file {tuple(tensors[wrong[0]].shape)}, config.json implies "
                    f"{hf_shapes[wrong[0]]}")
        raise DetrqError(f"{source} does not match its config.json ({config.backbone} {variant} backbone, "
                         f"{config.enc_layers}+{config.dec_layers} layers, d_model {config.hidden_dim}): {what}")
    return {name: torch.cat([tensors[n] for n in names]) if len(names) == 3 else tensors[names[0]]
            for name, names in wanted.items()}


def _canonical(name: str) -> str:
    for pattern, repl in _IN_MEMORY_ALIASES:
        name = re.sub(pattern, repl, name)
    return name


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise DetrqError(f"unknown backbone variant {variant!r}; choose one of {', '.join(VARIANTS)}")


# --- config.json ------------------------------------------------------------------------------------------------

def _backbone_from_config(raw: Mapping[str, Any], source: str) -> tuple[str, str, bool]:
    """(torchvision ResNet name, variant, dilation) from the v4-era flat keys or the nested ``backbone_config``."""
    sub = raw.get("backbone_config")
    if isinstance(sub, Mapping) and sub.get("model_type") == "timm_backbone":  # what transformers 5 writes
        name, dilation, indices = sub.get("backbone"), sub.get("output_stride") == 16, sub.get("out_indices")
        variant = "timm"
    elif isinstance(sub, Mapping) or raw.get("use_timm_backbone") is False:
        # transformers dilates only timm backbones: a no_timm model runs undilated whatever "dilation" says.
        return _hf_resnet(sub or {}, source), "no_timm", False
    else:  # v4 era: use_timm_backbone (default True) with a timm model name
        name, dilation, indices = raw.get("backbone") or "resnet50", bool(raw.get("dilation")), None
        variant = "timm"
    base = str(name).split(".")[0]  # "resnet50.a1_in1k" is timm's resnet50 with a pretrained tag
    if base not in RESNETS:
        raise DetrqError(f"{source}: backbone {name!r} is not supported; detrq's DETR has the official "
                         f"torchvision trunks {', '.join(RESNETS)}")
    if indices is not None and list(indices)[-1] != 4:
        raise DetrqError(f"{source}: the timm backbone's last out index is {list(indices)[-1]}, not 4; DETR reads "
                         "layer4")
    return base, variant, dilation


def _hf_resnet(sub: Mapping[str, Any], source: str) -> str:
    """The torchvision name of a Hugging Face ResNetConfig (its defaults are ResNet-50's)."""
    layer_type = sub.get("layer_type", "bottleneck")
    depths = list(sub.get("depths", [3, 4, 6, 3]))
    hidden = list(sub.get("hidden_sizes", [256, 512, 1024, 2048]))
    same = [n for n, spec in _HF_RESNETS.items() if spec == (layer_type, depths, hidden)]
    if sub.get("model_type", "resnet") != "resnet" or not same or sub.get("embedding_size", 64) != 64:
        raise DetrqError(f"{source}: backbone_config ({sub.get('model_type', 'resnet')}, {layer_type}, depths "
                         f"{depths}, widths {hidden}) is none of the torchvision trunks {', '.join(RESNETS)}")
    odd = [k for k, ok in (("downsample_in_first_stage", not sub.get("downsample_in_first_stage", False)),
                           ("downsample_in_bottleneck", not sub.get("downsample_in_bottleneck", False)),
                           ("hidden_act", sub.get("hidden_act", "relu") == "relu")) if not ok]
    if odd:
        raise DetrqError(f"{source}: backbone_config sets {odd[0]}={sub.get(odd[0])!r}, which torchvision's "
                         f"{same[0]} does not have")
    out = sub.get("out_features") or [f"stage{i}" for i in sub.get("out_indices") or [4]]
    if list(out)[-1] != "stage4":
        raise DetrqError(f"{source}: the backbone's last output is {list(out)[-1]!r}, not 'stage4'; DETR reads it")
    return same[0]


def labels_from_config(raw: Mapping[str, Any], source: str) -> dict[int, str]:
    """``id2label`` with integer keys, which must be exactly 0..N-1 (logit column i is class i)."""
    id2label = raw.get("id2label")
    if not isinstance(id2label, Mapping) or not id2label:
        n = raw.get("num_labels")
        if isinstance(n, int) and n > 0:
            return {i: f"LABEL_{i}" for i in range(n)}
        raise DetrqError(f"{source} has no id2label (nor num_labels): the class count is unknown")
    try:
        labels = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        raise DetrqError(f"{source}: id2label keys must be integers, got {list(id2label)[:3]}") from None
    if sorted(labels) != list(range(len(labels))):
        gaps = sorted(set(range(max(labels) + 1)) - set(labels))
        raise DetrqError(f"{source}: id2label ids must run 0..{len(labels) - 1} (logit column i is class i); "
                         f"{'missing ' + str(gaps[:3]) if gaps else 'negative ids'} — list every id, 'N/A' for "
                         "unused ones, as the hub's COCO checkpoints do")
    return labels


def config_from_hf(raw: Mapping[str, Any], source: str, size: tuple[int, int] = _DEFAULT_SIZE
                   ) -> tuple[DetrConfig, str, dict[int, str]]:
    """(detrq config, backbone variant, id2label) of a Hugging Face DETR ``config.json``; one ``DetrqError`` for a
    model that is not DETR or a setting detrq's DETR does not have."""
    arch = (raw.get("architectures") or [None])[0]
    if raw.get("model_type") != "detr" or arch not in (None, "DetrForObjectDetection"):
        what = arch or raw.get("model_type") or "unknown"
        raise DetrqError(f"{source} is a {what} checkpoint, not DETR (model_type 'detr', DetrForObjectDetection)")
    checks = (("position_embedding_type", "sine"), ("activation_function", "relu"), ("num_channels", 3))
    for key, value in checks:
        if raw.get(key, value) != value:
            raise DetrqError(f"{source}: {key} is {raw[key]!r}; detrq's DETR (the official one) has {value!r}")
    for enc, dec, default in (("encoder_attention_heads", "decoder_attention_heads", 8),
                              ("encoder_ffn_dim", "decoder_ffn_dim", 2048)):
        if raw.get(enc, default) != raw.get(dec, default):
            raise DetrqError(f"{source}: {enc} ({raw.get(enc, default)}) differs from {dec} ({raw.get(dec, default)});"
                             " the official DETR uses one value for both")
    backbone, variant, dilation = _backbone_from_config(raw, source)
    labels = labels_from_config(raw, source)
    # aux_loss: the official model's decoder outputs are all kept (Eq. (5) and the training loss sum over them);
    # the hub's auxiliary_loss only says whether transformers adds their losses in training.
    config = DetrConfig(backbone=backbone, num_classes=len(labels), hidden_dim=raw.get("d_model", 256),
                        nheads=raw.get("encoder_attention_heads", 8), enc_layers=raw.get("encoder_layers", 6),
                        dec_layers=raw.get("decoder_layers", 6), dim_feedforward=raw.get("encoder_ffn_dim", 2048),
                        dropout=raw.get("dropout", 0.1), num_queries=raw.get("num_queries", 100), aux_loss=True,
                        min_size=size[0], max_size=size[1], dilation=dilation)
    return config, variant, labels


def config_to_hf(config: DetrConfig, variant: str, id2label: Mapping[int, str]) -> dict[str, Any]:
    """A ``config.json`` that ``DetrForObjectDetection.from_pretrained`` loads (transformers 4 and 5): the v4-era
    flat keys, with a ``backbone_config`` for the no_timm variant."""
    _check_variant(variant)
    if config.backbone not in RESNETS:
        raise DetrqError(f"a {config.backbone!r} trunk has no Hugging Face form; only the ResNet trunks "
                         f"({', '.join(RESNETS)}) convert")
    if variant == "no_timm" and config.dilation:
        raise DetrqError("Hugging Face's ResNet backbone (no_timm) has no dilation; use the timm variant")
    if sorted(id2label) != list(range(config.num_classes)):
        raise DetrqError(f"id2label needs ids 0..{config.num_classes - 1}, one per class of the model")
    layer_type, depths, hidden = _HF_RESNETS[config.backbone]
    names = {str(i): id2label[i] for i in range(config.num_classes)}
    return {
        "architectures": ["DetrForObjectDetection"], "model_type": "detr",
        "d_model": config.hidden_dim, "encoder_layers": config.enc_layers, "decoder_layers": config.dec_layers,
        "encoder_attention_heads": config.nheads, "decoder_attention_heads": config.nheads,
        "encoder_ffn_dim": config.dim_feedforward, "decoder_ffn_dim": config.dim_feedforward,
        "num_queries": config.num_queries, "dropout": config.dropout, "activation_function": "relu",
        "position_embedding_type": "sine", "auxiliary_loss": False, "dilation": config.dilation, "num_channels": 3,
        "id2label": names, "label2id": {v: int(k) for k, v in names.items()},
        "use_timm_backbone": variant == "timm", "use_pretrained_backbone": False,
        "backbone": config.backbone if variant == "timm" else None,
        "backbone_config": None if variant == "timm" else {
            "model_type": "resnet", "layer_type": layer_type, "depths": depths, "hidden_sizes": hidden,
            "embedding_size": 64, "hidden_act": "relu", "downsample_in_first_stage": False,
            "downsample_in_bottleneck": False, "num_channels": 3, "out_features": ["stage4"]},
    }


def _size_policy(raw: Mapping[str, Any]) -> tuple[int, int]:
    """(shorter side, longer-side cap) of a DetrImageProcessor config, in its dict or its older int form."""
    size = raw.get("size")
    if isinstance(size, Mapping) and "shortest_edge" in size:
        return int(size["shortest_edge"]), int(size.get("longest_edge", _DEFAULT_SIZE[1]))
    if isinstance(size, int):
        return size, int(raw.get("max_size", _DEFAULT_SIZE[1]))
    return _DEFAULT_SIZE


def preprocessor_to_hf(config: DetrConfig) -> dict[str, Any]:
    """The DetrImageProcessor config of detrq's eval policy (resize, ImageNet normalisation), so that the size policy
    survives a round trip."""
    return {"image_processor_type": "DetrImageProcessor", "format": "coco_detection", "do_resize": True,
            "size": {"shortest_edge": config.min_size, "longest_edge": config.max_size}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD,
            "do_pad": True}


# --- directories ------------------------------------------------------------------------------------------------

def _read_config(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DetrqError(f"corrupt JSON in {path}: {getattr(e, 'msg', e)}") from None
    if not isinstance(raw, dict):
        raise DetrqError(f"{path} is not a JSON object")
    return raw


def weights_file(directory: Path) -> Path:
    """The weights of a Hugging Face checkpoint directory: model.safetensors, else pytorch_model.bin."""
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    sharded = sorted(p.name for p in directory.glob("*.index.json"))
    hint = f" (sharded weights, {sharded[0]}, are not supported)" if sharded else ""
    raise DetrqError(f"no {' or '.join(WEIGHT_FILES)} in {directory}{hint}")


def _read_tensors(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as e:
            raise DetrqError(f"cannot read {path}: {str(e).splitlines()[0][:200]}") from None
    obj = load_weights_only(path, "weights file")
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise DetrqError(f"{path} holds no state dict of tensors")
    return obj


def check_hf_dir(directory: str | os.PathLike) -> Path:
    """``directory`` if it holds a Hugging Face checkpoint's config.json, else one ``DetrqError``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DetrqError(f"Hugging Face checkpoint directory not found: {directory}")
    if not (directory / CONFIG_FILE).is_file():
        raise DetrqError(f"no {CONFIG_FILE} in {directory}: not a Hugging Face checkpoint directory (it needs "
                         f"{CONFIG_FILE} and {' or '.join(WEIGHT_FILES)})")
    return directory


def read_hf(directory: str | os.PathLike) -> HfCheckpoint:
    """A Hugging Face DETR checkpoint directory in the official layout (config, state dict, labels, variant)."""
    directory = check_hf_dir(directory)
    raw = _read_config(directory / CONFIG_FILE)
    pre = directory / PREPROCESSOR_FILE
    size = _size_policy(_read_config(pre)) if pre.is_file() else _DEFAULT_SIZE
    config, variant, labels = config_from_hf(raw, str(directory / CONFIG_FILE), size)
    path = weights_file(directory)
    tensors = _read_tensors(path)
    rows = tensors.get("class_labels_classifier.weight")
    if rows is not None and rows.shape[0] != len(labels) + 1:
        raise DetrqError(f"label mismatch in {directory}: id2label has {len(labels)} classes but "
                         f"class_labels_classifier has {rows.shape[0]} rows (classes + no-object: "
                         f"{len(labels) + 1} expected)")
    return HfCheckpoint(config, from_hf(tensors, config, variant, str(path)), labels, variant)


def hf_sha256(directory: str | os.PathLike) -> str:
    """One SHA-256 for a Hugging Face checkpoint directory: over its config, preprocessor config and weights."""
    directory = Path(directory)
    digest = hashlib.sha256()
    for path in (directory / CONFIG_FILE, directory / PREPROCESSOR_FILE, weights_file(directory)):
        if path.is_file():
            digest.update(path.name.encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def write_hf(directory: str | os.PathLike, state_dict: Mapping[str, Tensor], config: DetrConfig, variant: str,
             id2label: Mapping[int, str]) -> Path:
    """Write a directory that ``DetrForObjectDetection.from_pretrained`` loads: config.json, model.safetensors (the
    hub's on-disk names) and preprocessor_config.json. It is built beside ``directory`` and swapped in whole, so an
    earlier directory survives any failure."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise DetrqError(f"{directory} exists and is not a directory")
    raw = config_to_hf(config, variant, id2label)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(to_hf(state_dict, variant), staging / WEIGHT_FILES[0], metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(raw, indent=2) + "\n")
        (staging / PREPROCESSOR_FILE).write_text(json.dumps(preprocessor_to_hf(config), indent=2) + "\n")
        staging.chmod(0o755)
        old = None
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.replace(directory, old / "dir")
        os.replace(staging, directory)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


# --- labels against data ----------------------------------------------------------------------------------------

def _norm(name: str) -> str:
    return re.sub(r"[\s_-]+", " ", name).strip().casefold()


def check_labels(id2label: Mapping[int, str], categories: Sequence[Mapping[str, Any]], source: str) -> None:
    """Every category of the data (``{"id", "name"}``) must be the model's class of that id: one ``DetrqError``
    naming the first that is not. A class named ``LABEL_<id>`` (Hugging Face's placeholder) matches any name."""
    by_name = {_norm(v): k for k, v in id2label.items()}
    for cat in categories:
        cid, name = int(cat["id"]), str(cat.get("name", ""))
        model_name = id2label.get(cid)
        if model_name is None:
            raise DetrqError(f"label mismatch: {source} has category id {cid} ({name!r}) but the checkpoint's id2label "
                             f"runs 0..{len(id2label) - 1}")
        if model_name == f"LABEL_{cid}" or _norm(model_name) == _norm(name):
            continue
        other = by_name.get(_norm(name))
        hint = (f"; the checkpoint calls class {other} {name!r}: the data numbers its categories differently, "
                "remap its ids to the checkpoint's") if other is not None else ""
        raise DetrqError(f"label mismatch: category {cid} is {name!r} in {source} but {model_name!r} in the "
                         f"checkpoint's id2label{hint}")
