"""Small worlds the tests build: a synthetic COCO-layout set and a randomly initialised DETR checkpoint beside it."""

from pathlib import Path

import torch

from detrq.data.synthetic import make_dataset
from detrq.models.detr import build_detr


def tiny_world(root: Path, n_train: int, n_val: int, *, data_seed: int, preset: str = "tiny") -> Path:
    """``root/data`` (``n_train`` / ``n_val`` images, generator seed ``data_seed``) and ``root/<preset>.pth``, the
    preset's weights as torch seed 0 initialises them; returns the checkpoint's path."""
    make_dataset(root / "data", n_train, n_val, seed=data_seed, progress=False)
    torch.manual_seed(0)
    checkpoint = root / f"{preset}.pth"
    torch.save({"model": build_detr(preset).state_dict()}, checkpoint)
    return checkpoint
