"""COCO-layout detection data: the dataset, DETR's eval and train transforms, the collate and the
class-balanced image subset used as the Hessian image set.

Layout: ``ROOT/annotations/instances_<split>.json`` and the images in ``ROOT/<split>/``. This is COCO 2017
(``val2017``, ``train2017``) and also the synthetic set (``train``, ``val``). Targets follow official DETR:
crowd annotations and degenerate boxes are dropped, boxes are cxcywh normalised by the transformed image
size, and labels are the COCO category ids themselves.
"""

from __future__ import annotations

import contextlib
import functools
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO
from torch import Tensor

from detrq.data.validate import DataReport, check_coco
from detrq.io.errors import DetrqError
from detrq.io.results import sha256_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def get_size_with_aspect_ratio(image_size: tuple[int, int], size: int, max_size: int | None = None) -> tuple[int, int]:
    """Output ``(h, w)`` for an image of ``(w, h)``: shorter side to ``size``, longer side capped at ``max_size``.

    A line-for-line copy of official DETR's rule (``datasets/transforms.py``), including the rounding
    of the capped size and the truncating ``int()`` for the long side, because one pixel of difference
    changes the logits.
    """
    w, h = image_size
    if max_size is not None:
        min_original_size = float(min((w, h)))
        max_original_size = float(max((w, h)))
        if max_original_size / min_original_size * size > max_size:
            size = int(round(max_size * min_original_size / max_original_size))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        ow = size
        oh = int(size * h / w)
    else:
        oh = size
        ow = int(size * w / h)
    return oh, ow


def _resize(image: Image.Image, boxes: Tensor, size: int, max_size: int | None) -> tuple[Image.Image, Tensor]:
    """Resize a PIL image and its xyxy absolute boxes as official DETR's ``resize`` does."""
    oh, ow = get_size_with_aspect_ratio(image.size, size, max_size)
    # torchvision's F.resize on a PIL image is exactly PIL's bilinear resize; call PIL directly.
    resized = image.resize((ow, oh), Image.BILINEAR)
    ratio_width = float(resized.size[0]) / float(image.size[0])
    ratio_height = float(resized.size[1]) / float(image.size[1])
    boxes = boxes * torch.as_tensor([ratio_width, ratio_height, ratio_width, ratio_height])
    return resized, boxes


def _to_normalized(image: Image.Image, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    """ToTensor + ImageNet Normalize; boxes from xyxy absolute to cxcywh relative to the image size."""
    tensor = TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)
    h, w = tensor.shape[-2:]
    x0, y0, x1, y1 = target["boxes"].unbind(-1)
    cxcywh = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0), (y1 - y0)], dim=-1)
    target = dict(target)
    target["boxes"] = cxcywh / torch.tensor([w, h, w, h], dtype=torch.float32)
    target["size"] = torch.tensor([h, w])
    return tensor, target


class Transform(Protocol):
    """What the dataset needs from a transform: apply it, and describe its policy for the results file."""

    def __call__(self, image: Image.Image, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]: ...

    def describe(self) -> dict[str, Any]: ...


class EvalTransform:
    """Official DETR evaluation transform: RandomResize([min_size], max_size) (deterministic with one
    scale), ToTensor, ImageNet Normalize. Input boxes are xyxy absolute; output boxes cxcywh normalised."""

    def __init__(self, min_size: int = 800, max_size: int | None = 1333) -> None:
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image: Image.Image, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        image, boxes = _resize(image, target["boxes"], self.min_size, self.max_size)
        return _to_normalized(image, {**target, "boxes": boxes})

    def describe(self) -> dict[str, Any]:
        """The image-size policy, recorded beside every evaluation result."""
        return {
            "name": "eval",
            "min_size": self.min_size,
            "max_size": self.max_size,
            "interpolation": "PIL bilinear",
            "normalize": "imagenet",
        }


class TrainTransform:
    """Training augmentation for the small embedded model: random horizontal flip, then the eval resize
    (one of ``min_size`` when it is a sequence, as official RandomResize) and normalisation.

    Randomness comes from ``generator`` when given; otherwise from the global torch RNG, which a
    DataLoader seeds differently in each worker (a shared generator would repeat across workers).
    """

    def __init__(
        self,
        min_size: int | Sequence[int],
        max_size: int | None,
        hflip_p: float = 0.5,
        generator: torch.Generator | None = None,
    ) -> None:
        self.scales = [min_size] if isinstance(min_size, int) else list(min_size)
        if not self.scales:
            raise DetrqError("TrainTransform got an empty min_size list; pass an int or a non-empty list of sizes")
        self.max_size = max_size
        self.hflip_p = hflip_p
        self.generator = generator

    def __call__(self, image: Image.Image, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        boxes = target["boxes"]
        if torch.rand((), generator=self.generator).item() < self.hflip_p:
            w = image.width
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            boxes = boxes[:, [2, 1, 0, 3]] * torch.as_tensor([-1, 1, -1, 1]) + torch.as_tensor([w, 0, w, 0])
        size = self.scales[int(torch.randint(len(self.scales), (), generator=self.generator))]
        image, boxes = _resize(image, boxes, size, self.max_size)
        return _to_normalized(image, {**target, "boxes": boxes})

    def describe(self) -> dict[str, Any]:
        """The augmentation and size policy, recorded with training runs."""
        return {
            "name": "train",
            "min_size": self.scales[0] if len(self.scales) == 1 else self.scales,
            "max_size": self.max_size,
            "hflip_p": self.hflip_p,
            "interpolation": "PIL bilinear",
            "normalize": "imagenet",
        }


def load_coco_checked(annotation_file: str | Path, image_dir: str | Path | None = None, *,
                      num_classes: int | None = None) -> tuple[COCO, DataReport]:
    """``load_coco`` and the validator's report (``data.validate``): hard problems raise one ``DetrqError``
    line, soft ones are printed once as ``warning:`` lines; ``image_dir`` also checks the image files."""
    data, report = check_coco(annotation_file, image_dir, num_classes=num_classes)
    coco = COCO()
    coco.dataset = data
    # createIndex prints progress lines; keep stdout clean for notebooks and nbval.
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco, report


def load_coco(annotation_file: str | Path, image_dir: str | Path | None = None, *,
              num_classes: int | None = None) -> COCO:
    """Load a COCO instances JSON into a pycocotools ``COCO``, validated (see ``load_coco_checked``), no prints
    on stdout."""
    return load_coco_checked(annotation_file, image_dir, num_classes=num_classes)[0]


def _kept_annotations(coco: COCO, image_id: int) -> tuple[Tensor, Tensor]:
    """xyxy absolute boxes and category ids of one image, filtered as official ConvertCocoPolysToMask:
    no crowd, boxes clamped to the image, then only boxes with positive width and height."""
    info = coco.imgs[image_id]
    w, h = info["width"], info["height"]
    anns = [a for a in coco.imgToAnns.get(image_id, []) if a.get("iscrowd", 0) == 0]
    boxes = torch.as_tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2].clamp_(min=0, max=w)
    boxes[:, 1::2].clamp_(min=0, max=h)
    labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
    keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
    return boxes[keep], labels[keep]


class CocoDetection(torch.utils.data.Dataset):
    """Images and DETR targets from a COCO-layout split.

    ``image_ids`` restricts to those images in the given order; ``max_images`` keeps the first ones. The
    annotation file and the images are validated first (``data.validate``; ``num_classes`` also checks the
    category ids against a model's classes), and ``data_report`` keeps the soft problems found.
    By default every image in the annotation file is used, sorted by id, as official DETR (images
    without annotations included, since COCO evaluation counts them). After ``hold_in_memory()`` each image is
    decoded and transformed once and then served from memory (for a deterministic transform and a set small
    enough to hold: the embedded default's 500 val images at 128 px take 98 MB, and are evaluated hundreds of
    times).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Transform,
        *,
        image_ids: Sequence[int] | None = None,
        max_images: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        self.root = Path(root)
        self._kept: dict[int, tuple[Tensor, dict[str, Any]]] | None = None
        self.split = split
        self.transform = transform
        if not self.root.is_dir():
            raise DetrqError(
                f"COCO root not found: {self.root}; pass the directory holding annotations/ and {split}/"
            )
        self.image_dir = self.root / split
        image_dir = self.image_dir if self.image_dir.is_dir() else None
        self.coco, self.data_report = load_coco_checked(self.root / "annotations" / f"instances_{split}.json",
                                                        image_dir, num_classes=num_classes)
        if image_dir is None:
            raise DetrqError(f"image directory not found: {self.image_dir}; put the {split} images there")
        if image_ids is None:
            ids = sorted(self.coco.imgs)
        else:
            ids = [int(i) for i in image_ids]
            unknown = [i for i in ids if i not in self.coco.imgs]
            if unknown:
                raise DetrqError(
                    f"{len(unknown)} image ids are not in instances_{split}.json (first: {unknown[:5]}); "
                    "pass ids from this split"
                )
        if max_images is not None:
            if max_images < 1:
                raise DetrqError(f"max_images must be at least 1, got {max_images}")
            ids = ids[:max_images]
        self.ids: list[int] = ids

    def __len__(self) -> int:
        return len(self.ids)

    @functools.cached_property
    def annotations_sha256(self) -> str:
        """SHA-256 of the split's annotation file: cache keys name the data by it, once per dataset (COCO val2017's
        file is 25 MB, and a sweep keys hundreds of evaluations of one dataset)."""
        return sha256_file(self.root / "annotations" / f"instances_{self.split}.json")

    def hold_in_memory(self) -> None:
        """Keep each transformed image after its first load (the transform must be deterministic)."""
        if self._kept is None:
            self._kept = {}

    @property
    def in_memory(self) -> bool:
        """Whether the transformed images are kept (``hold_in_memory``)."""
        return self._kept is not None

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        if self._kept is None:
            return self._load(index)
        if index not in self._kept:
            self._kept[index] = self._load(index)
        image, target = self._kept[index]
        return image, dict(target)  # a fresh dict: a caller may add keys without touching the kept one

    def _load(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        image_id = self.ids[index]
        path = self.image_dir / self.coco.imgs[image_id]["file_name"]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except FileNotFoundError:
            raise DetrqError(
                f"image file not found: {path} (image_id {image_id}); the image directory does not match "
                f"instances_{self.split}.json"
            ) from None
        except UnidentifiedImageError:
            raise DetrqError(f"unreadable image file: {path} (image_id {image_id}); replace the file") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # truncated, corrupt data
            raise DetrqError(f"corrupt image file: {path} (image_id {image_id}): {e}; replace the file") from None
        boxes, labels = _kept_annotations(self.coco, image_id)
        w, h = image.size
        target = {
            "image_id": image_id,
            "boxes": boxes,
            "labels": labels,
            "orig_size": torch.tensor([h, w]),
            "size": torch.tensor([h, w]),
        }
        return self.transform(image, target)


def collate(batch: Sequence[tuple[Tensor, dict[str, Any]]]) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Keep images as a list: the model pads a batch itself (to the batch max H and W, as official)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def _as_coco(coco_or_dataset: COCO | CocoDetection) -> COCO:
    return coco_or_dataset.coco if isinstance(coco_or_dataset, CocoDetection) else coco_or_dataset


def _annotation_arrays(coco: COCO) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Image id and category position of every annotation a target keeps (same rule as the dataset,
    vectorised, so that COCO train2017's 860k annotations take about a second), and the sorted category ids."""
    cat_ids = sorted(coco.getCatIds())
    cat_pos = {c: k for k, c in enumerate(cat_ids)}
    anns = coco.dataset["annotations"]
    img = np.fromiter((a["image_id"] for a in anns), dtype=np.int64, count=len(anns))
    cat = np.fromiter((cat_pos.get(a["category_id"], -1) for a in anns), dtype=np.int64, count=len(anns))
    crowd = np.fromiter((a.get("iscrowd", 0) for a in anns), dtype=np.int64, count=len(anns))
    xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
    size = np.array([(coco.imgs[i]["width"], coco.imgs[i]["height"]) for i in img], dtype=np.float64).reshape(-1, 2)
    x0 = np.clip(xywh[:, 0], 0, size[:, 0])
    y0 = np.clip(xywh[:, 1], 0, size[:, 1])
    x1 = np.clip(xywh[:, 0] + xywh[:, 2], 0, size[:, 0])
    y1 = np.clip(xywh[:, 1] + xywh[:, 3], 0, size[:, 1])
    keep = (crowd == 0) & (x1 > x0) & (y1 > y0) & (cat >= 0)
    return img[keep], cat[keep], cat_ids


def class_histogram(coco_or_dataset: COCO | CocoDetection, image_ids: Sequence[int]) -> np.ndarray:
    """Object counts per category (in sorted category-id order) over ``image_ids``, as targets keep them."""
    img, cat, cat_ids = _annotation_arrays(_as_coco(coco_or_dataset))
    return np.bincount(cat[np.isin(img, np.asarray(image_ids, dtype=np.int64))], minlength=len(cat_ids))


def histogram_distance(a: np.ndarray, b: np.ndarray) -> float:
    """L1 distance between two class histograms after normalising each to sum 1 (0 = same distribution)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.abs(a / max(a.sum(), 1e-12) - b / max(b.sum(), 1e-12)).sum())


def class_balanced_subset(coco_or_dataset: COCO | CocoDetection, n: int, seed: int) -> list[int]:
    """Seeded sample of ``n`` image ids, each with at least one object, whose class histogram approximates
    the whole split's (the paper's Hessian image set).

    Greedy: shuffle the eligible images with ``seed``, keep a pool of ``min(all, 50 n)``, then add one
    image at a time, the one that brings the subset's normalised histogram closest (L1) to the split's.
    Ties go to the earlier image in the shuffled order, so the result depends on the seed only. For a
    ``CocoDetection`` the population is its images; for a ``COCO`` all images in the file.
    """
    coco = _as_coco(coco_or_dataset)
    img, cat, cat_ids = _annotation_arrays(coco)
    if isinstance(coco_or_dataset, CocoDetection):
        in_population = np.isin(img, np.asarray(coco_or_dataset.ids, dtype=np.int64))
        img, cat = img[in_population], cat[in_population]
    eligible = np.unique(img)
    if not 1 <= n <= len(eligible):
        raise DetrqError(f"class_balanced_subset: n={n} but the split has {len(eligible)} images with objects; "
                         f"pass 1 <= n <= {len(eligible)}")
    target = np.bincount(cat, minlength=len(cat_ids)).astype(np.float64)
    target /= target.sum()

    pool = np.random.default_rng(seed).permutation(eligible)[: min(len(eligible), 50 * n)]
    # Position of each annotation's image in the pool (or -1), via a sorted search instead of a dict.
    order = np.argsort(pool)
    where = np.searchsorted(pool[order], img)
    where = np.clip(where, 0, len(pool) - 1)
    pos = np.where(pool[order][where] == img, order[where], -1)
    in_pool = pos >= 0
    counts = np.bincount(pos[in_pool] * len(cat_ids) + cat[in_pool], minlength=len(pool) * len(cat_ids))
    counts = counts.reshape(len(pool), len(cat_ids)).astype(np.float64)
    per_image_total = counts.sum(axis=1)

    chosen: list[int] = []
    available = np.ones(len(pool), dtype=bool)
    current = np.zeros(len(cat_ids))
    for _ in range(n):
        candidate = (current + counts) / (current.sum() + per_image_total)[:, None]
        dist = np.abs(candidate - target).sum(axis=1)
        dist[~available] = np.inf
        best = int(np.argmin(dist))
        chosen.append(int(pool[best]))
        available[best] = False
        current += counts[best]
    return chosen
