"""Checking a COCO-format data set before it is used: one validator for every loader, the evaluation and the
Hessian image sampler (all of them go through ``data.coco.load_coco``), also run on its own by
``python -m detrq check-data``.

It checks what the loaders, the DETR criterion and pycocotools rely on: the JSON's structure and types; image
entries (unique ids, file present and decodable, size as recorded); annotations (unique ids, an existing image,
a known category, a finite bbox with positive width and height that overlaps its image, area and iscrowd of the
right type); categories (unique ids, and inside the model's class range when one is given).

Every problem is collected, not only the first: a ``DataReport`` counts each kind and keeps the first few
examples. Hard errors (``ERRORS``) would crash a loader or change the mAP without a word, so ``check_coco``
raises one ``DetrqError`` line naming the file, the problems and the fix. Soft problems (``WARNINGS``) have one
well-defined reading that the loaders apply (e.g. a box crossing the image border is clipped); they are printed
once per process as ``warning:`` lines and go into the evaluation protocol (``DataReport.protocol``).

Results are cached in this process only (never on disk: data directories may be read-only), keyed by the
annotation file's SHA-256 and the size and mtime of every image file.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from detrq.io.errors import DetrqError

# kind -> what is wrong (hard errors: the data cannot be used as it is).
ERRORS: dict[str, str] = {
    "structure": "not a COCO instances file: the top level must be an object with lists 'images', 'annotations' "
                 "and 'categories' of objects",
    "image_id": "image id missing, not an integer, or used twice",
    "image_file_name": "image file_name missing or not a string",
    "image_size": "image width/height missing or not a positive integer",
    "image_missing": "image file not found",
    "image_unreadable": "image file cannot be decoded (corrupt or truncated)",
    "image_size_mismatch": "image file's size differs from the recorded width/height",
    "annotation_id": "annotation id missing, not an integer, or used twice",
    "annotation_image": "annotation's image_id is not an image of the file",
    "annotation_category": "annotation's category_id is not in 'categories'",
    "bbox_type": "bbox is not a list of 4 finite numbers [x, y, width, height]",
    "bbox_negative": "bbox width or height is negative",
    "bbox_outside": "bbox lies entirely outside its image",
    "area": "area missing, not a finite number, or negative (COCO evaluation needs it)",
    "iscrowd": "iscrowd is not 0 or 1",
    "category_id": "category id missing, not an integer, or used twice",
    "category_out_of_range": "category id outside the model's classes (0 <= id < num_classes)",
}
# kind -> what the loaders do about it (soft: used with this reading, and recorded).
WARNINGS: dict[str, str] = {
    "bbox_clipped": "bbox crosses the image border by more than 1 pixel: clipped to the image in the model's "
                    "targets, evaluated as recorded",
    "bbox_empty": "bbox has zero width or height: dropped from the model's targets, counted by COCO evaluation "
                  "as an object no detection can match",
    "image_without_annotations": "image has no annotations: evaluated as an image without objects",
    "duplicate_file_name": "two image entries share one file: that image is evaluated twice",
}
EXAMPLES = 3  # examples kept per kind
BORDER_TOLERANCE = 1.0  # pixels a box may cross the image border before it counts as clipped
_CACHE: dict[tuple, tuple[tuple, DataReport]] = {}
_PRINTED: set[str] = set()


@dataclass
class Finding:
    """One kind of problem: how many times it occurs and the first few examples."""

    count: int = 0
    examples: list[str] = field(default_factory=list)


@dataclass
class DataReport:
    """Everything ``validate_coco`` found in one annotation file (and its images, when checked)."""

    source: str  # the annotation file's name as shown in messages
    images: int = 0
    annotations: int = 0
    categories: int = 0
    images_checked: bool = False
    errors: dict[str, Finding] = field(default_factory=dict)
    warnings: dict[str, Finding] = field(default_factory=dict)

    def add(self, kind: str, example: str) -> None:
        found = (self.errors if kind in ERRORS else self.warnings).setdefault(kind, Finding())
        found.count += 1
        if len(found.examples) < EXAMPLES:
            found.examples.append(example)

    @property
    def ok(self) -> bool:
        return not self.errors

    def error_line(self) -> str:
        """The one line a hard error stops with: the file, each kind with its count and first example, the fix."""
        total = sum(f.count for f in self.errors.values())
        kinds = "; ".join(f"{ERRORS[k]}: {f.count}x, e.g. {f.examples[0]}" for k, f in self.errors.items())
        return (f"{self.source}: {total} problem{'s' if total > 1 else ''} to fix before use: {kinds}. Fix the "
                f"annotation file or the images (`python -m detrq check-data` lists every kind with examples)")

    def warning_lines(self) -> list[str]:
        return [f"{self.source}: {WARNINGS[k]}: {f.count}x, e.g. {'; '.join(f.examples)}"
                for k, f in self.warnings.items()]

    def protocol(self) -> dict[str, Any]:
        """The soft problems as recorded in a results file: deterministic, no absolute paths."""
        return {k: {"count": f.count, "what": WARNINGS[k], "examples": list(f.examples)}
                for k, f in sorted(self.warnings.items())}

    def summary(self) -> str:
        """A multi-line account for ``check-data``: counts, then every kind of problem with its examples."""
        lines = [f"{self.source}: {self.images} images, {self.annotations} annotations, {self.categories} "
                 f"categories{'' if self.images_checked else ' (image files not checked)'}"]
        for title, found, text in (("error", self.errors, ERRORS), ("warning", self.warnings, WARNINGS)):
            for k, f in found.items():
                lines.append(f"  {title} {k}: {f.count}x {text[k]}")
                lines.extend(f"      e.g. {e}" for e in f.examples)
        if not self.errors and not self.warnings:
            lines.append("  no problems found")
        return "\n".join(lines)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _short(x: Any) -> str:
    text = json.dumps(x) if not isinstance(x, float) or math.isfinite(x) else str(x)
    return text if len(text) <= 40 else text[:37] + "..."


def _image_problem(path: Path, width: int, height: int) -> tuple[str, str] | None:
    """(kind, detail) when the file at ``path`` is missing, undecodable or of another size; None when fine.

    Reads the header (and, for PNG, every chunk's CRC via ``verify``; for JPEG, the end-of-image marker):
    a full decode of every image would take minutes on COCO. ``CocoDetection`` catches what this misses."""
    if not path.is_file():
        return "image_missing", ""
    try:
        with Image.open(path) as im:
            size, fmt = im.size, im.format
            if fmt == "JPEG":
                with open(path, "rb") as f:
                    f.seek(max(0, path.stat().st_size - 1024))
                    if b"\xff\xd9" not in f.read():
                        return "image_unreadable", "no JPEG end-of-image marker (truncated)"
            else:
                im.verify()
    except Exception as e:  # PIL raises many types for a bad file (OSError, SyntaxError, ValueError, ...)
        return "image_unreadable", f"{type(e).__name__}: {e}"
    if size != (width, height):
        return "image_size_mismatch", f"file is {size[0]}x{size[1]}, recorded {width}x{height}"
    return None


def validate_coco(data: Any, source: str = "annotations", *, image_dir: Path | None = None,
                  num_classes: int | None = None) -> DataReport:
    """Every problem of a parsed COCO instances file (and of its image files in ``image_dir`` when given)."""
    report = DataReport(source)
    lists = {k: data.get(k) if isinstance(data, dict) else None for k in ("images", "annotations", "categories")}
    bad = [k for k, v in lists.items() if not isinstance(v, list)]
    if bad:
        report.add("structure", f"{', '.join(repr(k) for k in bad)} missing or not a list")
        return report
    for k, entries in lists.items():
        n_bad = sum(not isinstance(e, dict) for e in entries)
        if n_bad:
            report.add("structure", f"{n_bad} entries of {k!r} are not objects")
    if report.errors:
        return report
    images, annotations, categories = lists["images"], lists["annotations"], lists["categories"]
    report.images, report.annotations, report.categories = len(images), len(annotations), len(categories)

    cat_ids: set[int] = set()
    for c in categories:
        cid = c.get("id")
        if not _is_int(cid) or cid in cat_ids:
            report.add("category_id", f"category {_short(cid)}{' (twice)' if cid in cat_ids else ''}")
            continue
        cat_ids.add(cid)
        if num_classes is not None and not 0 <= cid < num_classes:
            report.add("category_out_of_range", f"category {cid} (the model has {num_classes} classes)")

    sizes: dict[int, tuple[int, int]] = {}
    files: dict[str, int] = {}
    for im in images:
        iid = im.get("id")
        if not _is_int(iid) or iid in sizes:
            report.add("image_id", f"image {_short(iid)}{' (twice)' if _is_int(iid) and iid in sizes else ''}")
            continue
        name, w, h = im.get("file_name"), im.get("width"), im.get("height")
        if not isinstance(name, str) or not name:
            report.add("image_file_name", f"image {iid}: file_name {_short(name)}")
            name = None
        if not all(_is_int(v) and v > 0 for v in (w, h)):
            report.add("image_size", f"image {iid}: width {_short(w)}, height {_short(h)}")
            sizes[iid] = (0, 0)
            continue
        sizes[iid] = (w, h)
        if name is None:
            continue
        if name in files:
            report.add("duplicate_file_name", f"images {files[name]} and {iid}: {name}")
        files.setdefault(name, iid)
        if image_dir is not None:
            problem = _image_problem(image_dir / name, w, h)
            if problem:
                report.add(problem[0], f"image {iid}: {name}" + (f" ({problem[1]})" if problem[1] else ""))
    report.images_checked = image_dir is not None

    ann_ids: set[int] = set()
    annotated: set[int] = set()
    for a in annotations:
        aid = a.get("id")
        what = f"annotation {_short(aid)}"
        if not _is_int(aid) or aid in ann_ids:
            report.add("annotation_id", what + (" (twice)" if _is_int(aid) and aid in ann_ids else ""))
        else:
            ann_ids.add(aid)
        iid = a.get("image_id")
        if not _is_int(iid) or iid not in sizes:
            report.add("annotation_image", f"{what}: image_id {_short(iid)}")
            iid = None
        else:
            annotated.add(iid)
        cid = a.get("category_id")
        if not _is_int(cid) or cid not in cat_ids:
            report.add("annotation_category", f"{what}: category_id {_short(cid)}")
        area = a.get("area")
        if not _is_number(area) or area < 0:
            report.add("area", f"{what}: area {_short(area)}")
        crowd = a.get("iscrowd", 0)
        if not isinstance(crowd, (int, float)) or crowd not in (0, 1):
            report.add("iscrowd", f"{what}: iscrowd {_short(crowd)}")
        box = a.get("bbox")
        if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
            report.add("bbox_type", f"{what}: bbox {_short(box)}")
            continue
        x, y, bw, bh = box
        if bw < 0 or bh < 0:
            report.add("bbox_negative", f"{what}: bbox {_short(box)}")
            continue
        if bw == 0 or bh == 0:
            report.add("bbox_empty", f"{what}: bbox {_short(box)}")
            continue
        if iid is None or sizes[iid] == (0, 0):
            continue
        w, h = sizes[iid]
        if x >= w or y >= h or x + bw <= 0 or y + bh <= 0:
            report.add("bbox_outside", f"{what}: bbox {_short(box)} in a {w}x{h} image")
        elif (x < -BORDER_TOLERANCE or y < -BORDER_TOLERANCE or x + bw > w + BORDER_TOLERANCE
              or y + bh > h + BORDER_TOLERANCE):
            report.add("bbox_clipped", f"{what}: bbox {_short(box)} in a {w}x{h} image")
    for iid in sizes:
        if iid not in annotated:
            report.add("image_without_annotations", f"image {iid}")
    return report


def _file_signature(data: Any, image_dir: Path | None) -> tuple:
    """(size, mtime) of every image file the annotation file names: a changed image invalidates the cache."""
    if image_dir is None or not isinstance(data, dict) or not isinstance(data.get("images"), list):
        return ()
    out = []
    for im in data["images"]:
        name = im.get("file_name") if isinstance(im, dict) else None
        try:
            st = (image_dir / name).stat() if isinstance(name, str) and name else None
        except OSError:
            st = None
        out.append((st.st_size, st.st_mtime_ns) if st else None)
    return tuple(out)


def read_annotations(annotation_file: str | Path) -> tuple[Any, str]:
    """The parsed JSON of an annotation file and its SHA-256, with one-line errors for a missing or corrupt file."""
    path = Path(annotation_file)
    if not path.is_file():
        siblings = sorted(p.name for p in path.parent.glob("instances_*.json")) if path.parent.is_dir() else []
        hint = f"available: {', '.join(siblings)}" if siblings else "check the dataset root and split name"
        raise DetrqError(f"annotation file not found: {path}; {hint}")
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DetrqError(f"corrupt JSON in annotation file {path}: {e.msg} at line {e.lineno} column {e.colno}; "
                         "re-download or regenerate it") from None
    except UnicodeDecodeError:
        raise DetrqError(f"annotation file {path} is not UTF-8 JSON; re-download or regenerate it") from None
    return data, hashlib.sha256(raw).hexdigest()


def check_coco(annotation_file: str | Path, image_dir: str | Path | None = None, *, num_classes: int | None = None,
               raise_errors: bool = True, quiet: bool = False) -> tuple[Any, DataReport]:
    """Read and validate an annotation file (and the images in ``image_dir``); return ``(data, report)``.

    Hard errors raise one ``DetrqError`` line (unless ``raise_errors`` is False); each soft problem is printed
    once per process as a ``warning:`` line on stderr (unless ``quiet``).
    """
    path = Path(annotation_file)
    data, digest = read_annotations(path)
    image_dir = Path(image_dir) if image_dir is not None else None
    key = (digest, str(image_dir.resolve()) if image_dir else None, num_classes, str(path))
    signature = _file_signature(data, image_dir)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] == signature:
        report = hit[1]
    else:
        report = validate_coco(data, str(path), image_dir=image_dir, num_classes=num_classes)
        _CACHE[key] = (signature, report)
    if report.errors and raise_errors:
        raise DetrqError(report.error_line())
    if not quiet:
        for line in report.warning_lines():
            if line not in _PRINTED:
                _PRINTED.add(line)
                print(f"warning: {line}", file=sys.stderr)
    return data, report
