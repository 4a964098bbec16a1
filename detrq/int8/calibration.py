"""Images for an ONNX model: read from a COCO-format split or a folder, and preprocessed as the model's input
declares (size, letterbox or stretch, channel order, scaling, layout), with the placement that maps boxes back.

The defaults are those of the common YOLO export: letterbox to the input size with gray (114) padding, RGB,
pixels / 255, no mean or std, NCHW.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from detrq.data.coco import CocoDetection, class_balanced_subset
from detrq.io.errors import DetrqError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
RESIZE_MODES = ("letterbox", "stretch", "none")


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes one item of the model's input batch."""

    height: int
    width: int
    resize: str = "letterbox"  # "letterbox" (keep aspect, pad), "stretch" (to H x W), "none" (must be H x W)
    channels: str = "RGB"  # or "BGR"
    layout: str = "NCHW"  # or "NHWC"
    scale: float = 1 / 255  # pixel values 0..255 times this, then (x - mean) / std per channel
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    pad_value: int = 114  # letterbox padding, as the YOLO exports' own preprocessing
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise DetrqError(f"unknown resize {self.resize!r}; use one of {', '.join(RESIZE_MODES)}")
        if self.channels not in ("RGB", "BGR"):
            raise DetrqError(f"unknown channel order {self.channels!r}; use RGB or BGR")
        if self.height < 1 or self.width < 1:
            raise DetrqError(f"input size {self.height}x{self.width} is not an image size")


@dataclass(frozen=True)
class Placement:
    """Where an original image sits in the model input: input = original * scale + pad (per axis)."""

    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """xyxy boxes in model-input pixels -> xyxy boxes in original-image pixels."""
        out = boxes.astype(np.float64, copy=True)
        out[:, 0::2] = (out[:, 0::2] - self.pad_x) / self.scale_x
        out[:, 1::2] = (out[:, 1::2] - self.pad_y) / self.scale_y
        return out


def _resized(image: Image.Image, pp: Preprocess, source: str) -> tuple[Image.Image, Placement]:
    w, h = image.size
    if pp.resize == "none":
        if (w, h) != (pp.width, pp.height):
            raise DetrqError(f"{source} is {w}x{h} px but the model's input is {pp.width}x{pp.height}; resize "
                             "with --resize letterbox or stretch, or pass images of that size")
        return image, Placement(1.0, 1.0, 0.0, 0.0)
    if pp.resize == "stretch":
        return image.resize((pp.width, pp.height), Image.BILINEAR), Placement(pp.width / w, pp.height / h, 0.0, 0.0)
    r = min(pp.width / w, pp.height / h)
    nw, nh = max(1, round(w * r)), max(1, round(h * r))
    left, top = (pp.width - nw) // 2, (pp.height - nh) // 2
    canvas = Image.new("RGB", (pp.width, pp.height), (pp.pad_value,) * 3)
    canvas.paste(image.resize((nw, nh), Image.BILINEAR), (left, top))
    return canvas, Placement(nw / w, nh / h, float(left), float(top))


def prepare(image: Image.Image, pp: Preprocess, source: str = "image") -> tuple[np.ndarray, Placement]:
    """One image as the model takes it ([3, H, W] or [H, W, 3], ``pp.dtype``) and its placement."""
    image, placement = _resized(image.convert("RGB"), pp, source)
    a = np.asarray(image, dtype=np.float32)
    if pp.channels == "BGR":
        a = a[..., ::-1]
    a = (a * pp.scale - np.asarray(pp.mean, np.float32)) / np.asarray(pp.std, np.float32)
    if pp.layout == "NCHW":
        a = a.transpose(2, 0, 1)
    return np.ascontiguousarray(a, dtype=pp.dtype), placement


def read_image(path: Path) -> Image.Image:
    """The image at ``path``, or one line saying it is not one."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:  # what PIL's decoders raise
        raise DetrqError(f"{path} is not a readable image ({type(e).__name__})") from None


@dataclass
class ImageSet:
    """Image files, with their COCO ids and ground truth where they come from a COCO-format split."""

    paths: list[Path]
    source: dict[str, Any]  # what the results file records about where the images came from
    ids: list[int] | None = None
    coco: Any = field(default=None, repr=False)  # pycocotools COCO of the split, for AP

    def __len__(self) -> int:
        return len(self.paths)


def folder_images(folder: str | Path, limit: int | None = None) -> ImageSet:
    """The image files of ``folder`` (by suffix, sorted by name; other files ignored), the first ``limit``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DetrqError(f"image folder not found: {folder}")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DetrqError(f"the calibration set is empty: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    paths = paths[:limit]
    return ImageSet(paths, {"folder": str(folder), "num_images": len(paths), "order": "sorted by file name"})


def coco_images(root: str | Path, split: str, limit: int | None = None, balanced_seed: int | None = None
                ) -> ImageSet:
    """Images of a COCO-format split (``root/annotations/instances_<split>.json``, ``root/<split>/``): a seeded
    class-balanced subset of ``limit`` images if ``balanced_seed`` is set, else the first ``limit`` by id."""
    dataset = CocoDetection(root, split, transform=None)  # only its checked index and file names are used
    if limit is not None and limit < 1:
        raise DetrqError(f"the calibration set is empty ({limit} images asked); pass at least 1")
    if not dataset.ids:
        raise DetrqError(f"the calibration set is empty: {split} of {root} has no images")
    if balanced_seed is not None and limit is not None:
        ids = class_balanced_subset(dataset.coco, min(limit, len(dataset.ids)), balanced_seed)
        policy = f"class_balanced_subset, seed {balanced_seed}"
    else:
        ids, policy = dataset.ids[:limit], "first by image id"
    paths = [dataset.image_dir / dataset.coco.imgs[i]["file_name"] for i in ids]
    return ImageSet(paths, {"split": split, "num_images": len(ids), "policy": policy}, list(ids), dataset.coco)


def load_batch(paths: Sequence[Path], pp: Preprocess) -> tuple[np.ndarray, list[Placement]]:
    """The images at ``paths`` preprocessed and stacked into one batch, with their placements."""
    items = [prepare(read_image(p), pp, str(p)) for p in paths]
    return np.stack([a for a, _ in items]), [pl for _, pl in items]


def batches(paths: Sequence[Path], pp: Preprocess, batch_size: int, fixed: bool) -> list[np.ndarray]:
    """All of ``paths`` as model input batches of ``batch_size``; with a ``fixed`` batch dimension only full
    batches (the remainder is left out), else the last batch may be smaller."""
    if not paths:
        raise DetrqError("the calibration set is empty; pass at least one image")
    if fixed and len(paths) < batch_size:
        raise DetrqError(f"the model's batch dimension is fixed at {batch_size} but only {len(paths)} calibration "
                         "images were given")
    stop = len(paths) - batch_size + 1 if fixed else len(paths)
    return [load_batch(paths[i:i + batch_size], pp)[0] for i in range(0, stop, batch_size)]
