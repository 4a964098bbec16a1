"""The paper's check that the Hessian image set is a stable sample: the float model's training loss on K sets.

The paper (Experiments): "We randomly sampled 10 sets of 100 training images and found that the variance of
each set's loss to be less than 1% of the mean." Each set here is drawn the way the Hessian set is
(``class_balanced_subset``, seeds ``seed, seed + 1, ...``, so set 0 is the Hessian set itself), and a set's loss
is the mean of its images' weighted DETR training losses (the Loss Sen objective, eval mode, batch of one image
so that each image's loss does not depend on which images share its batch).

The sentence can be read two ways, so both numbers are reported: ``var_over_mean`` (variance of the K set
losses divided by their mean: the literal reading, which is compared with the 1 % threshold) and
``std_over_mean`` (the coefficient of variation, the scale-free reading). Note that var/mean has the unit of
the loss, so its verdict depends on the loss's scale; std/mean does not.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from detrq.data.coco import class_balanced_subset
from detrq.data.loading import eval_dataset
from detrq.io.cache import cache_key, load_cached
from detrq.io.errors import DetrqError
from detrq.io.results import environment, write_json_atomic
from detrq.models.criterion import build_criterion, weighted_loss
from detrq.models.detr import DETR

THRESHOLD = 0.01  # "less than 1% of the mean"


def set_statistics(set_losses: list[float], threshold: float = THRESHOLD) -> dict[str, Any]:
    """Mean, sample variance and standard deviation of the set losses, both ratios and the verdict."""
    if len(set_losses) < 2:
        raise DetrqError(f"the stability check needs at least 2 sets, got {len(set_losses)}")
    mean = math.fsum(set_losses) / len(set_losses)
    var = math.fsum((x - mean) ** 2 for x in set_losses) / (len(set_losses) - 1)
    std = math.sqrt(var)
    return {
        "set_losses": list(set_losses), "mean": mean, "var": var, "std": std,
        "var_over_mean": var / mean, "std_over_mean": std / mean, "threshold": threshold,
        "compared": "var_over_mean", "holds": var / mean < threshold, "holds_std_over_mean": std / mean < threshold,
    }


def loss_stability(model: DETR, checkpoint_sha: str, root: str | Path, split: str, out: str | Path, *,
                   num_sets: int = 10, set_size: int = 100, seed: int = 0, device: str = "cpu",
                   cached_only: bool = False) -> dict[str, Any] | None:
    """The training loss of the float ``model`` on ``num_sets`` class-balanced sets of ``set_size`` images.

    Writes and returns ``set_statistics(...)`` plus the sets' image ids, cached by everything that determines
    it. Each image's loss is computed once even when it belongs to several sets. ``cached_only``: return None
    instead of computing when ``out`` does not hold this result.
    """
    full = eval_dataset(model, root, split)
    sets = [class_balanced_subset(full, set_size, seed + k) for k in range(num_sets)]
    key = cache_key(kind="stability", checkpoint=checkpoint_sha, split=split, sets=sets,
                    transform=full.transform.describe())
    cached = load_cached(out, key)
    if cached is not None or cached_only:
        return cached
    criterion = build_criterion(model.cfg.num_classes, model.cfg.dec_layers).to(device)
    unique = sorted({i for s in sets for i in s})
    images = eval_dataset(model, root, split, image_ids=unique)
    per_image: dict[int, float] = {}
    model.eval()
    with torch.no_grad():
        for k, image_id in enumerate(unique):
            image, target = images[k]
            target = {n: v.to(device) if torch.is_tensor(v) else v for n, v in target.items()}
            losses = criterion(model([image.to(device)]), [target])
            per_image[image_id] = float(weighted_loss(losses, criterion.weight_dict))
    set_losses = [math.fsum(per_image[i] for i in s) / len(s) for s in sets]
    result = {"cache_key": key, "checkpoint_sha256": checkpoint_sha, "split": split, "num_sets": num_sets,
              "set_size": set_size, "seed": seed, **set_statistics(set_losses), "sets": sets,
              "environment": environment()}
    write_json_atomic(out, result)
    return result
