"""A preset DETR with its checkpoint loaded: the model every step of the paper starts from."""

from __future__ import annotations

from pathlib import Path

from detrq.io.results import sha256_file
from detrq.models.detr import DETR, build_detr, load_checkpoint


def load_model(preset: str, checkpoint: str | Path, device: str = "cpu", *, min_size: int | None = None,
               max_size: int | None = None) -> tuple[DETR, str]:
    """A preset model with ``checkpoint`` loaded (strict), in eval mode, and the checkpoint's SHA-256.

    ``min_size``/``max_size`` override the preset's image-size policy (None keeps it); ``eval_dataset`` and
    therefore the Hessian images and every evaluation follow the model's policy.
    """
    model = build_detr(preset, min_size=min_size, max_size=max_size)
    load_checkpoint(model, checkpoint)
    return model.to(device).eval(), sha256_file(checkpoint)
