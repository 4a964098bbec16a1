"""Tests of the COCO-layout dataset, DETR's transforms, the class-balanced subset and COCO evaluation,
on a tiny dataset each test writes into its own tmp_path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch import Tensor, nn

from detrq.data.coco import (CocoDetection, EvalTransform, TrainTransform, class_balanced_subset, class_histogram,
                             collate, get_size_with_aspect_ratio, histogram_distance)
from detrq.evaluation.evaluate import coco_metrics, evaluate
from detrq.io.errors import DetrqError
from detrq.models.detr import postprocess

torch.set_num_threads(1)

W, H = 64, 48
CATEGORIES = [1, 3, 7]
# Per image: (x, y, w, h, category); write_coco adds a crowd box and optionally a zero-width box.
BOXES = {
    1: [(4, 4, 20, 16, 1)],
    2: [(10, 8, 30, 20, 3), (40, 20, 16, 20, 7)],
    3: [(2, 2, 12, 12, 1), (20, 10, 24, 30, 3), (50, 30, 10, 12, 7)],
    4: [(20, 10, 40, 30, 7)],
}


def write_coco(root: Path, split: str = "val", zero_width_box: bool = False) -> Path:
    """Write 4 noise PNGs of 64x48 and their instances JSON, with a crowd box and optionally a zero-width box
    (COCOeval counts that one as ground truth no detection can match); returns the root."""
    rng = np.random.default_rng(0)
    (root / split).mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations = [], []
    for image_id, boxes in BOXES.items():
        name = f"{image_id:06d}.png"
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(root / split / name)
        images.append({"id": image_id, "file_name": name, "width": W, "height": H})
        for x, y, w, h, c in boxes:
            annotations.append({"image_id": image_id, "bbox": [x, y, w, h], "category_id": c, "iscrowd": 0,
                                "area": w * h})
    # Official DETR drops both of these from the targets.
    annotations.append({"image_id": 1, "bbox": [30, 20, 20, 20], "category_id": 3, "iscrowd": 1, "area": 400})
    if zero_width_box:
        annotations.append({"image_id": 4, "bbox": [5, 5, 0, 10], "category_id": 1, "iscrowd": 0, "area": 0})
    for i, a in enumerate(annotations, start=1):
        a["id"] = i
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": c, "name": f"c{c}", "supercategory": "x"} for c in CATEGORIES]}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return write_coco(tmp_path / "coco")


def gt_detections(coco: COCO, shift: float = 0.0) -> list[dict[str, Any]]:
    """Every non-crowd GT box as a score-1 detection, moved right by ``shift`` of its width."""
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
         "bbox": [a["bbox"][0] + shift * a["bbox"][2], *a["bbox"][1:]]}
        for a in coco.dataset["annotations"]
        if not a["iscrowd"]
    ]


def test_dataset_targets(tmp_path: Path) -> None:
    ds = CocoDetection(write_coco(tmp_path, zero_width_box=True), "val", EvalTransform(min_size=96, max_size=200))
    assert ds.ids == [1, 2, 3, 4]
    image, target = ds[0]
    assert image.shape == (3, 96, 128) and image.dtype == torch.float32
    assert target["image_id"] == 1
    # The crowd annotation of image 1 is dropped.
    assert target["labels"].tolist() == [1]
    assert target["orig_size"].tolist() == [H, W] and target["size"].tolist() == [96, 128]
    x, y, w, h, _ = BOXES[1][0]
    expected = torch.tensor([[(x + w / 2) / W, (y + h / 2) / H, w / W, h / H]])
    assert torch.allclose(target["boxes"], expected, atol=1e-6)
    # The zero-width box of image 4 is dropped.
    assert ds[3][1]["labels"].tolist() == [7]
    images, targets = collate([ds[0], ds[1]])
    assert isinstance(images, list) and len(images) == 2 and [t["image_id"] for t in targets] == [1, 2]


def test_dataset_subset_keeps_order(root: Path) -> None:
    ds = CocoDetection(root, "val", EvalTransform(48, 64), image_ids=[3, 1, 4], max_images=2)
    assert ds.ids == [3, 1] and len(ds) == 2
    with pytest.raises(DetrqError, match="not in instances_val.json"):
        CocoDetection(root, "val", EvalTransform(48, 64), image_ids=[99])


def test_eval_transform_sizes() -> None:
    assert get_size_with_aspect_ratio((640, 480), 800, 1333) == (800, 1066)
    # Capped: int(round(1333 * 500 / 2000)) = 333 for the short side, int(333 * 4) = 1332 for the long one.
    assert get_size_with_aspect_ratio((2000, 500), 800, 1333) == (333, 1332)
    assert get_size_with_aspect_ratio((480, 640), 800, 1333) == (1066, 800)

    image = Image.new("RGB", (640, 480))
    boxes = torch.tensor([[64.0, 48.0, 320.0, 240.0]])
    tensor, target = EvalTransform()(image, {"boxes": boxes})
    assert tensor.shape == (3, 800, 1066)
    assert target["size"].tolist() == [800, 1066]
    # Normalised cxcywh is the same whatever the scale: ((64+320)/2/640, (48+240)/2/480, 256/640, 192/480).
    assert torch.allclose(target["boxes"], torch.tensor([[0.3, 0.3, 0.4, 0.4]]), atol=1e-3)
    # Black image: every channel is -mean/std after ImageNet normalisation.
    assert torch.allclose(tensor[:, 0, 0], torch.tensor([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225]))

    wide, _ = EvalTransform()(Image.new("RGB", (2000, 500)), {"boxes": torch.zeros(0, 4)})
    assert wide.shape[-1] <= 1333 and wide.shape[-2:] == (333, 1332)

    small = Image.fromarray(np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    same, target = EvalTransform(min_size=128, max_size=128)(small, {"boxes": torch.tensor([[0.0, 0.0, 64.0, 32.0]])})
    assert same.shape == (3, 128, 128)
    assert torch.allclose(target["boxes"], torch.tensor([[0.25, 0.125, 0.5, 0.25]]))
    assert EvalTransform().describe() == {"name": "eval", "min_size": 800, "max_size": 1333,
                                          "interpolation": "PIL bilinear", "normalize": "imagenet"}


def test_train_transform_flip_is_seeded() -> None:
    image = Image.new("RGB", (64, 48))
    boxes = torch.tensor([[4.0, 4.0, 24.0, 20.0]])
    always = TrainTransform(48, 64, hflip_p=1.0, generator=torch.Generator().manual_seed(0))
    _, target = always(image, {"boxes": boxes})
    # Flipped: x from 4..24 becomes 40..60 of 64; centre 50/64.
    assert torch.allclose(target["boxes"], torch.tensor([[50 / 64, 12 / 48, 20 / 64, 16 / 48]]))

    def flips(seed: int) -> list[float]:
        t = TrainTransform(48, 64, generator=torch.Generator().manual_seed(seed))
        return [t(image, {"boxes": boxes})[1]["boxes"][0, 0].item() for _ in range(20)]

    assert flips(3) == flips(3)
    assert len(set(flips(3))) == 2


def coco_from_dict(data: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = data
    coco.createIndex()
    return coco


def skewed_coco(num_images: int = 400, seed: int = 0) -> COCO:
    """Annotations only (no pixels needed): 6 classes with a skewed frequency, 1-6 objects per image,
    and images that are mostly one class, so random subsets miss the split's mix."""
    rng = np.random.default_rng(seed)
    freq = np.array([0.45, 0.25, 0.12, 0.1, 0.05, 0.03])
    cats = [2, 4, 5, 9, 11, 20]
    images, anns = [], []
    for i in range(1, num_images + 1):
        images.append({"id": i, "file_name": f"{i}.png", "width": 100, "height": 100})
        main = rng.choice(len(cats), p=freq)
        for _ in range(rng.integers(1, 7)):
            c = main if rng.random() < 0.8 else rng.integers(len(cats))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cats[c], "bbox": [10, 10, 20, 20],
                         "iscrowd": 0, "area": 400})
    images.append({"id": num_images + 1, "file_name": "empty.png", "width": 100, "height": 100})
    return coco_from_dict({"images": images, "annotations": anns,
                           "categories": [{"id": c, "name": str(c)} for c in cats]})


def test_class_balanced_subset() -> None:
    coco = skewed_coco()
    n = 20
    ids = class_balanced_subset(coco, n, seed=0)
    assert ids == class_balanced_subset(coco, n, seed=0)
    assert ids != class_balanced_subset(coco, n, seed=1)
    assert len(set(ids)) == n and all(coco.imgToAnns[i] for i in ids)

    whole = class_histogram(coco, sorted(coco.imgs))
    assert whole.tolist() == np.bincount(
        [sorted(coco.getCatIds()).index(a["category_id"]) for a in coco.dataset["annotations"]]).tolist()
    ours = histogram_distance(class_histogram(coco, ids), whole)
    rng = np.random.default_rng(0)
    with_objects = [i for i in coco.imgs if coco.imgToAnns[i]]
    random = [histogram_distance(class_histogram(coco, rng.choice(with_objects, n, replace=False)), whole)
              for _ in range(50)]
    assert ours <= np.median(random)
    with pytest.raises(DetrqError, match="n=1000"):
        class_balanced_subset(coco, 1000, seed=0)


def test_class_balanced_subset_of_dataset(tmp_path: Path) -> None:
    root = write_coco(tmp_path, zero_width_box=True)
    ds = CocoDetection(root, "val", EvalTransform(48, 64), image_ids=[2, 3, 4])
    ids = class_balanced_subset(ds, 3, seed=0)
    assert sorted(ids) == [2, 3, 4]
    # The crowd box (class 3) and the zero-width box (class 1) are not counted.
    assert class_histogram(ds, [1, 4]).tolist() == [1, 0, 1]


def test_coco_metrics(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    coco = CocoDetection(root, "val", EvalTransform(48, 64)).coco
    ids = sorted(coco.imgs)
    perfect = coco_metrics(coco, gt_detections(coco), ids)
    assert perfect["AP"] == 1.0 and perfect["AP50"] == 1.0 and perfect["AP75"] == 1.0
    assert perfect["per_class"] == {"1": 1.0, "3": 1.0, "7": 1.0}
    assert all(isinstance(perfect[k], float) for k in ("AP", "AP50", "AP75", "APs", "APm", "AR100"))
    # Small and medium objects only (64x48 images): pycocotools' -1 for APl becomes None.
    assert perfect["APl"] is None

    shifted = coco_metrics(coco, gt_detections(coco, shift=0.3), ids)
    assert shifted["AP"] < 1.0

    empty = coco_metrics(coco, [], ids)
    assert empty["AP"] == 0.0 and empty["per_class"] == {"1": 0.0, "3": 0.0, "7": 0.0}
    assert capsys.readouterr().out == ""


class GroundTruthModel(nn.Module):
    """Fake DETR that returns, batch after batch, the dataset's own targets as confident predictions."""

    def __init__(self, dataset: CocoDetection, num_classes: int = 91, num_queries: int = 5) -> None:
        super().__init__()
        self.targets = [dataset[i][1] for i in range(len(dataset))]
        self.num_classes, self.num_queries = num_classes, num_queries
        self.seen = 0

    def forward(self, images: list[Tensor]) -> dict[str, Any]:
        logits = torch.full((len(images), self.num_queries, self.num_classes + 1), -10.0)
        logits[..., -1] = 10.0  # unused queries predict no-object
        boxes = torch.full((len(images), self.num_queries, 4), 0.5)
        for b in range(len(images)):
            target = self.targets[self.seen + b]
            n = len(target["labels"])
            logits[b, torch.arange(n), target["labels"]] = 20.0
            logits[b, :n, -1] = -10.0
            boxes[b, :n] = target["boxes"]
        self.seen += len(images)
        return {"pred_logits": logits, "pred_boxes": boxes, "aux_outputs": []}


def test_evaluate_end_to_end(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = CocoDetection(root, "val", EvalTransform(min_size=96, max_size=200))
    metrics = evaluate(GroundTruthModel(ds), ds, batch_size=3, progress=False)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == 1.0
    assert metrics["protocol"] == {"split": "val", "num_images": 4, "batch_size": 3,
                                   "transform": ds.transform.describe(), "device": "cpu"}
    assert capsys.readouterr().out == ""

    calls = []

    def counting_postprocess(outputs: dict[str, Any], target_sizes: Tensor) -> list[dict[str, Tensor]]:
        calls.append(len(target_sizes))
        return postprocess(outputs, target_sizes)

    first_two = evaluate(GroundTruthModel(ds), ds, max_images=2, progress=False, postprocess=counting_postprocess)
    assert calls == [2]
    assert first_two["protocol"]["num_images"] == 2 and first_two["AP"] == pytest.approx(1.0)


def test_errors(root: Path, tmp_path: Path) -> None:
    transform = EvalTransform(48, 64)
    with pytest.raises(DetrqError, match="COCO root not found"):
        CocoDetection(tmp_path / "nowhere", "val", transform)
    with pytest.raises(DetrqError, match=r"annotation file not found: .*instances_train\.json; available: "
                                         r"instances_val\.json"):
        CocoDetection(root, "train", transform)

    corrupt = write_coco(tmp_path / "corrupt")
    (corrupt / "annotations" / "instances_val.json").write_text('{"images": [}')
    with pytest.raises(DetrqError, match=r"corrupt JSON in annotation file .*instances_val\.json: .* line 1 column"):
        CocoDetection(corrupt, "val", transform)

    not_coco = write_coco(tmp_path / "not_coco")
    (not_coco / "annotations" / "instances_val.json").write_text('{"images": []}')
    with pytest.raises(DetrqError, match="not a COCO instances file"):
        CocoDetection(not_coco, "val", transform)

    no_images = write_coco(tmp_path / "no_images")
    (no_images / "val").rename(no_images / "elsewhere")
    with pytest.raises(DetrqError, match=r"image directory not found: .*val"):
        CocoDetection(no_images, "val", transform)

    ds = CocoDetection(root, "val", transform)
    (root / "val" / "000002.png").unlink()  # gone after the dataset was checked: found where it is read
    ds[0]
    with pytest.raises(DetrqError, match=r"image file not found: .*000002\.png \(image_id 2\)"):
        ds[1]
    with pytest.raises(DetrqError, match=r"image file not found: 1x, e\.g\. image 2: 000002\.png"):
        CocoDetection(root, "val", transform)  # checked before use
