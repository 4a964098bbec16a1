"""Tests of the synthetic COCO-layout dataset: determinism, COCO validity, size spread, atomic writes."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from pycocotools.coco import COCO

from detrq.data import synthetic
from detrq.data.synthetic import SyntheticSpec, area_range, make_dataset
from detrq.io.errors import DetrqError
from detrq.io.results import sha256_file

SAMPLE_IMAGES = ("000000000001.png", "000000000005.png", "000000000006.png")


def _fingerprint(root: Path) -> dict[str, str]:
    files = [root / "annotations" / f"instances_{s}.json" for s in ("train", "val")]
    files += [root / split / name for split in ("train", "val") for name in SAMPLE_IMAGES]
    return {str(f.relative_to(root)): sha256_file(f) for f in files}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth") / "data"
    return root, make_dataset(root, 12, 6, seed=0, progress=False)


def test_same_seed_same_bytes_other_seed_differs(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    root, summary = tiny
    again = make_dataset(tmp_path / "again", 12, 6, seed=0, progress=False)
    assert _fingerprint(root) == _fingerprint(tmp_path / "again")
    assert summary["splits"] == again["splits"]
    make_dataset(tmp_path / "other", 12, 6, seed=1, progress=False)
    first, other = _fingerprint(root), _fingerprint(tmp_path / "other")
    assert all(first[k] != other[k] for k in first)


def test_worker_processes_write_the_same_bytes(tmp_path: Path) -> None:
    # 230 images: three chunks of the work, shared by two processes in an order that depends on timing.
    one = make_dataset(tmp_path / "one", 230, 6, seed=3, progress=False)
    two = make_dataset(tmp_path / "two", 230, 6, seed=3, progress=False, workers=2)
    assert one == {**two, "out": one["out"]}
    for split, n in (("train", 230), ("val", 6)):
        names = sorted(p.name for p in (tmp_path / "one" / split).iterdir())
        assert len(names) == n and names == sorted(p.name for p in (tmp_path / "two" / split).iterdir())
        assert all(sha256_file(tmp_path / "one" / split / f) == sha256_file(tmp_path / "two" / split / f)
                   for f in names)
    for split in ("train", "val"):
        name = f"annotations/instances_{split}.json"
        assert sha256_file(tmp_path / "one" / name) == sha256_file(tmp_path / "two" / name)


def test_valid_coco(tiny: tuple[Path, dict]) -> None:
    root, summary = tiny
    for split, n in (("train", 12), ("val", 6)):
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(root / "annotations" / f"instances_{split}.json"))
        assert sorted(coco.getImgIds()) == list(range(1, n + 1))
        assert sorted(coco.getCatIds()) == list(range(1, 11))
        assert len({c["name"] for c in coco.loadCats(coco.getCatIds())}) == 10
        ann_ids = coco.getAnnIds()
        assert sorted(ann_ids) == list(range(1, len(ann_ids) + 1))
        assert summary["splits"][split]["annotations"] == len(ann_ids)
        for img in coco.loadImgs(coco.getImgIds()):
            with Image.open(root / split / img["file_name"]) as im:
                assert im.format == "PNG" and im.mode == "RGB" and im.size == (img["width"], img["height"])
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
            assert 1 <= len(anns) <= 6
            for a in anns:
                x, y, w, h = a["bbox"]
                assert 4 <= w and 4 <= h and 0 <= x and 0 <= y
                assert x + w <= img["width"] and y + h <= img["height"]
                assert 0 < a["area"] <= w * h
                assert 1 <= a["category_id"] <= 10 and a["iscrowd"] == 0
    info = json.loads((root / "annotations" / "instances_train.json").read_text())["info"]
    assert info["seed"] == 0 and info["generator"] == synthetic.GENERATOR_VERSION
    assert info["spec"]["image_size"] == SyntheticSpec().image_size


def test_occlusion_masks_are_the_mode_1_drawings() -> None:
    # Placement draws its 1x occlusion masks in mode "L" for speed; the stored datasets were made from mode "1"
    # drawings, so both must set the same pixels (bit counts included) or the generated objects would change.
    rng = np.random.default_rng(0)
    for points in synthetic._TEMPLATE_POINTS.values():
        for _ in range(50):
            radius, angle, dx, dy = rng.uniform(2, 90), rng.uniform(0, 7), *rng.uniform(-40, 170, 2)
            c, s = np.cos(angle), np.sin(angle)
            polygon = [(x * radius * c - y * radius * s + dx, x * radius * s + y * radius * c + dy) for x, y in points]
            drawings = {mode: Image.new(mode, (128, 128), 0) for mode in ("1", "L")}
            for im in drawings.values():
                ImageDraw.Draw(im).polygon(polygon, fill=1)
            reference = np.asarray(drawings["1"])
            bits = synthetic._mask_bits(drawings["L"])
            assert bits == int.from_bytes(np.packbits(reference).tobytes(), "big")
            assert bits.bit_count() == int(reference.sum())


def test_sizes_span_coco_area_ranges(tmp_path: Path) -> None:
    summary = make_dataset(tmp_path, 60, 1, seed=3, progress=False)
    per_area = summary["splits"]["train"]["per_area"]
    assert all(per_area[r] > 0 for r in ("small", "medium", "large")), per_area
    coco = json.loads((tmp_path / "annotations" / "instances_train.json").read_text())
    recount = {r: 0 for r in per_area}
    for a in coco["annotations"]:
        recount[area_range(a["area"])] += 1
    assert recount == per_area


def test_failed_run_keeps_the_previous_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_dataset(tmp_path, 3, 2, seed=0, progress=False)
    before = sha256_file(tmp_path / "annotations" / "instances_train.json")
    render = synthetic._render_image
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("interrupted")
        return render(*args, **kwargs)

    monkeypatch.setattr(synthetic, "_render_image", flaky)
    with pytest.raises(RuntimeError):
        make_dataset(tmp_path, 5, 2, seed=1, progress=False)
    assert sha256_file(tmp_path / "annotations" / "instances_train.json") == before
    assert len(list((tmp_path / "train").iterdir())) == 3
    monkeypatch.setattr(synthetic, "_render_image", render)
    make_dataset(tmp_path, 5, 2, seed=1, progress=False)  # a rerun cleans up the leftover temp folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["annotations", "train", "val"]
    assert len(list((tmp_path / "train").iterdir())) == 5


@pytest.mark.parametrize(
    "kwargs",
    [{"n_train": 0}, {"n_val": -1}, {"seed": -1}, {"seed": 1.5}, {"spec": "default"}],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(DetrqError):
        make_dataset(tmp_path, **{"n_train": 2, "n_val": 1, "progress": False, **kwargs})


def test_bad_spec() -> None:
    with pytest.raises(DetrqError, match="min_objects"):
        SyntheticSpec(min_objects=3, max_objects=2)
    with pytest.raises(DetrqError, match="size_mix"):
        SyntheticSpec(size_mix=(0.5, 0.5, 0.5))
    with pytest.raises(DetrqError, match="no shape can exceed"):
        SyntheticSpec(image_size=64)


def test_output_path_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(DetrqError, match="not a directory"):
        make_dataset(tmp_path / "file", 1, 1, progress=False)
