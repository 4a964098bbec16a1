"""Benchmark: how long the COCO validator (``detrq.data.validate``) takes on a val2017-sized layout.

Writes, in a temporary directory, 5000 image entries with 36,781 annotations over 80 categories with COCO's ids
(48 images without annotations, as in val2017) and 5000 small image files, then times ``check_coco``:

* cold: read and hash the JSON, check every entry and every image file (header, JPEG end marker / PNG CRCs);
* warm: the same call again in the same process (the in-process cache: hash + stat of every image);
* for comparison, a full decode of 200 of the images, extrapolated to 5000 (what the check avoids).

Prints figures measured in one run; never asserts. The image files are small (default 160x120) to keep the
layout quick to write; the check reads headers, so the file size matters little (a full decode would).

Run: .venv/bin/python benchmarks/check_data.py [--images 5000] [--format jpeg|png] [--size 160x120]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from detrq.data.validate import check_coco

COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def write_layout(root: Path, n_images: int, n_annotations: int, fmt: str, size: tuple[int, int]) -> Path:
    rng = np.random.default_rng(0)
    split = root / "val2017"
    split.mkdir(parents=True)
    (root / "annotations").mkdir()
    w, h = size
    ext = "jpg" if fmt == "jpeg" else "png"
    base = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    images = []
    for i in range(1, n_images + 1):
        name = f"{i:012d}.{ext}"
        base.save(split / name, format=fmt.upper())
        images.append({"id": i, "file_name": name, "width": w, "height": h, "license": 1})
    annotated = rng.permutation(n_images)[: n_images - 48] + 1  # val2017 has 48 images without annotations
    annotations = []
    for k in range(n_annotations):
        bw, bh = rng.uniform(2, w / 2), rng.uniform(2, h / 2)
        x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        annotations.append({"id": k + 1, "image_id": int(annotated[k % len(annotated)]),
                            "category_id": int(rng.choice(COCO_CATEGORY_IDS)), "iscrowd": 0,
                            "bbox": [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)],
                            "area": round(bw * bh, 2), "segmentation": [[x, y, x + bw, y, x + bw, y + bh]]})
    categories = [{"id": c, "name": f"c{c}", "supercategory": "s"} for c in COCO_CATEGORY_IDS]
    path = root / "annotations" / "instances_val2017.json"
    path.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": annotations,
                                "categories": categories}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--annotations", type=int, default=36781)
    parser.add_argument("--format", default="jpeg", choices=["jpeg", "png"])
    parser.add_argument("--size", default="160x120", help="WIDTHxHEIGHT of every image file")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        ann = write_layout(root, args.images, args.annotations, args.format, size)
        print(f"layout: {args.images} {args.format} images of {size[0]}x{size[1]}, {args.annotations} annotations, "
              f"{ann.stat().st_size / 2**20:.1f} MiB of JSON, written in {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        _, report = check_coco(ann, root / "val2017", num_classes=91, quiet=True)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        check_coco(ann, root / "val2017", num_classes=91, quiet=True)
        warm = time.perf_counter() - start
        start = time.perf_counter()
        names = sorted((root / "val2017").iterdir())[:200]
        for p in names:
            with Image.open(p) as im:
                im.convert("RGB")
        decode = (time.perf_counter() - start) / len(names) * args.images
        print(f"check_coco cold: {cold:.2f} s; warm (in-process cache): {warm:.2f} s; "
              f"a full decode of every image instead: about {decode:.1f} s at this image size")
        print(f"found: {len(report.errors)} kinds of error, warnings: "
              + ", ".join(f"{k} {f.count}" for k, f in report.warnings.items()))


if __name__ == "__main__":
    main()
