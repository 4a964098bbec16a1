"""The datasets the steps read: a split at the model's evaluation size, the Hessian images held in memory as
batches, and the seeded, resumable stream of shuffled training batches."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from detrq.data.coco import CocoDetection, EvalTransform, collate

# Evaluation sets up to this size (float32 pixels at most) are held in memory after their first pass.
KEEP_IN_MEMORY_BYTES = 1 << 30


def eval_dataset(model: nn.Module, root: str | Path, split: str, max_images: int | None = None,
                 image_ids: list[int] | None = None) -> CocoDetection:
    """A split with the model's evaluation size policy (a DETR's ``cfg``; also used for the Hessian images: no
    augmentation), validated (``data.validate``), its category ids against the model's classes too. The
    transformed images are kept in memory when they fit in ``KEEP_IN_MEMORY_BYTES`` (at most max_size² pixels
    each): every evaluation of the embedded default then decodes each image once."""
    dataset = CocoDetection(root, split, EvalTransform(model.cfg.min_size, model.cfg.max_size), image_ids=image_ids,
                            max_images=max_images, num_classes=model.cfg.num_classes)
    if len(dataset) * 3 * model.cfg.max_size ** 2 * 4 <= KEEP_IN_MEMORY_BYTES:
        dataset.hold_in_memory()
    return dataset


def hessian_batches(dataset: CocoDetection, batch_size: int, device: str = "cpu") -> list[tuple[list, list]]:
    """All of ``dataset`` as ``(images, targets)`` batches held in memory (every probe revisits them)."""
    items = [dataset[i] for i in range(len(dataset))]
    batches = []
    for k in range(0, len(items), batch_size):
        images, targets = collate(items[k:k + batch_size])
        batches.append(([im.to(device) for im in images],
                        [{k2: v.to(device) if torch.is_tensor(v) else v for k2, v in t.items()} for t in targets]))
    return batches


def shuffled_batches(dataset: CocoDetection, batch_size: int, seed: int, start: int
                     ) -> Iterator[tuple[int, tuple[list, list]]]:
    """Endless shuffled batches; epoch e uses permutation seed (seed, e), so a resume replays the same order."""
    n = len(dataset)
    per_epoch = n // batch_size
    it = start
    while True:
        epoch, pos = divmod(it, per_epoch)
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        perm = torch.randperm(n, generator=g)
        for b in range(pos, per_epoch):
            torch.manual_seed(seed * 1000003 + it)  # augmentation randomness, replayable on resume
            yield it, collate([dataset[int(i)] for i in perm[b * batch_size:(b + 1) * batch_size]])
            it += 1
