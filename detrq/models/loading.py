"""A DETR with its checkpoint loaded: the model every step of the paper starts from.

A checkpoint is an official-layout file (``{"model": state_dict}``, built from a preset), a file that also carries its
architecture and labels (what ``convert --from-hf`` writes), or a Hugging Face checkpoint directory (converted to the
official layout as it is read, ``hf.py``). A checkpoint that carries its architecture decides it; the preset serves
the plain files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from torch import Tensor

from detrq.io.errors import DetrqError
from detrq.io.results import sha256_file
from detrq.models.detr import DETR, PRESETS, DetrConfig, load_state, read_checkpoint
from detrq.models.hf import hf_sha256, read_hf

# The keys a converted checkpoint file carries beside "model" (plain JSON types, so weights_only loads them).
CONFIG_KEY = "detrq_config"
LABELS_KEY = "id2label"
VARIANT_KEY = "hf_backbone"


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read into the official layout, with what it says about itself."""

    state_dict: dict[str, Tensor]
    config: DetrConfig | None  # the architecture it carries (None: a plain file; a preset gives it)
    id2label: dict[int, str] | None  # class names by class index, when it names them
    variant: str | None  # the Hugging Face backbone variant it came from (timm / no_timm), if any
    sha256: str
    source: Path


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint file or Hugging Face directory (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        hf = read_hf(path)
        return Checkpoint(hf.state_dict, hf.config, hf.id2label, hf.variant, hf_sha256(path), path)
    ckpt = read_checkpoint(path)
    config = ckpt.get(CONFIG_KEY)
    labels = ckpt.get(LABELS_KEY)
    return Checkpoint(ckpt["model"], config_from_dict(config, path) if config is not None else None,
                      {int(k): v for k, v in labels.items()} if labels else None, ckpt.get(VARIANT_KEY),
                      sha256_file(path), path)


def config_from_dict(raw: Any, source: str | Path) -> DetrConfig:
    """A ``DetrConfig`` from its stored dict (JSON turns tuples into lists)."""
    try:
        return DetrConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in dict(raw).items()})
    except (TypeError, ValueError):
        raise DetrqError(f"{source}: its stored {CONFIG_KEY} is not a detrq DETR config") from None


def checkpoint_payload(ckpt: Checkpoint) -> dict[str, Any]:
    """What ``torch.save`` writes for ``ckpt`` as a file: the state dict plus its architecture and labels."""
    # Fresh contiguous tensors: the file's bytes then depend on the values alone, not on where they were read from.
    payload: dict[str, Any] = {"model": {k: v.detach().contiguous().clone() for k, v in ckpt.state_dict.items()}}
    if ckpt.config is not None:
        payload[CONFIG_KEY] = asdict(ckpt.config)
    if ckpt.id2label is not None:
        payload[LABELS_KEY] = {str(k): v for k, v in ckpt.id2label.items()}
    if ckpt.variant is not None:
        payload[VARIANT_KEY] = ckpt.variant
    return payload


def model_config(ckpt: Checkpoint, preset: str | None, *, min_size: int | None = None,
                 max_size: int | None = None) -> DetrConfig:
    """The architecture of ``ckpt``: its own, else ``preset``'s; with the eval size policy overridden where given."""
    if ckpt.config is not None:
        config = ckpt.config
    elif preset is None or preset not in PRESETS:
        raise DetrqError(f"{ckpt.source} does not carry its architecture: pass --preset (one of {', '.join(PRESETS)})"
                         if preset is None else f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    else:
        config = PRESETS[preset]
    return replace(config, **{k: v for k, v in (("min_size", min_size), ("max_size", max_size)) if v is not None})


def build_model(ckpt: Checkpoint, preset: str | None, device: str = "cpu", *, min_size: int | None = None,
                max_size: int | None = None) -> DETR:
    """``ckpt`` loaded (strict) into the DETR of ``model_config``, in eval mode on ``device``."""
    model = DETR(model_config(ckpt, preset, min_size=min_size, max_size=max_size))
    load_state(model, ckpt.state_dict, ckpt.source)
    return model.to(device).eval()


def load_model(preset: str, checkpoint: str | Path, device: str = "cpu", *, min_size: int | None = None,
               max_size: int | None = None) -> tuple[DETR, str]:
    """A model with ``checkpoint`` (a file or Hugging Face directory) loaded (strict), in eval mode, and the
    checkpoint's SHA-256. The architecture is the checkpoint's own when it carries one, else ``preset``'s.

    ``min_size``/``max_size`` override the image-size policy (None keeps it); ``eval_dataset`` and therefore the
    Hessian images and every evaluation follow the model's policy.
    """
    ckpt = open_checkpoint(checkpoint)
    return build_model(ckpt, preset, device, min_size=min_size, max_size=max_size), ckpt.sha256
