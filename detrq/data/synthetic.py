"""Deterministic synthetic detection dataset in COCO layout: the embedded default's train and val sets.

Ten classes, five shapes times two hue families ("red_circle" ... "blue_cross"), 1-6 rotated objects per
image on a textured, noisy background, sized so that COCO's small / medium / large ranges are all
populated on a 128 px image. Every image is a pure function of (seed, split, index, spec): its generator is
``np.random.default_rng([seed, split_code, index])``, pixel arithmetic after the random draws is integer
(Pillow's uint8 resampling and compositing, our own integer alpha blending), and our only transcendental
calls are ``math.sin``/``math.cos`` on scalars, so the pixels do not depend on numpy's SIMD or BLAS paths.
PNG bytes are additionally identical wherever Pillow bundles the same zlib (the pinned version).

Layout written (read by ``detrq.data.coco``)::

    OUT/annotations/instances_train.json   OUT/train/000000000001.png ...
    OUT/annotations/instances_val.json     OUT/val/000000000001.png ...
"""

from __future__ import annotations

import colorsys
import functools
import math
import operator
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from detrq.io.errors import DetrqError
from detrq.io.results import write_json_atomic
from detrq.parallel.pool import given, run_jobs

# Bump whenever a change alters any pixel or annotation, so a stored dataset can be told apart.
GENERATOR_VERSION = "detrq-synthetic-1"
SHAPES = ("circle", "square", "triangle", "star", "cross")
# (name, hue in [0, 1)): hue families far apart so a jittered red never looks blue.
COLOURS = (("red", 0.0), ("blue", 0.61))
SPLIT_CODES = {"train": 1, "val": 2}
# COCO's area ranges as COCOeval applies them to the ``area`` field.
SMALL_MAX, LARGE_MIN = 32.0**2, 96.0**2
AREA_RANGES = ("small", "medium", "large")
SHRINK = 0.7  # area factor per retry of an object that found no place


@dataclass(frozen=True)
class SyntheticSpec:
    """Knobs of the generator; ``dataclasses.asdict`` of it is stored in the annotation JSON."""

    image_size: int = 128
    min_objects: int = 1
    max_objects: int = 6
    # Share of objects sampled per COCO area range (small, medium, large). Crowded images shrink late
    # objects, so more end up small: the default yields about 37% / 42% / 20%.
    size_mix: tuple[float, float, float] = (0.15, 0.55, 0.30)
    min_area: float = 100.0  # px^2 of the smallest object (about 10 x 10)
    max_area: float = 1.4 * 96.0**2  # px^2 of the largest object
    max_truncation: float = 0.1  # fraction of an object's box width/height allowed outside the image
    max_iou: float = 0.4  # box IoU above which a placement is rejected
    min_visible: float = 0.6  # every object keeps at least this fraction of its mask unoccluded
    max_attempts: int = 12  # placements tried per object size before it shrinks
    hue_jitter: float = 0.03
    object_saturation: tuple[float, float] = (0.65, 1.0)
    object_value: tuple[float, float] = (0.55, 1.0)
    background_saturation: float = 0.3  # below object saturation, so objects stay the most colourful thing
    distractors: tuple[int, int] = (2, 7)  # faint blobs and lines per image, inclusive range
    noise: int = 7  # per-pixel noise is the sum of two uniform integers in [-noise, noise] (sd ~6 levels)
    supersample: int = 4  # shapes are drawn at this factor and box-averaged down: anti-aliasing

    def __post_init__(self) -> None:
        problems = []
        if self.image_size < 32:
            problems.append("image_size must be at least 32")
        if not 1 <= self.min_objects <= self.max_objects:
            problems.append("need 1 <= min_objects <= max_objects")
        if len(self.size_mix) != 3 or min(self.size_mix) < 0 or abs(sum(self.size_mix) - 1.0) > 1e-9:
            problems.append("size_mix must be three non-negative shares summing to 1")
        # Below about 8 x 8 px a star or a cross is a blob, no longer a recognisable shape.
        if not 64.0 <= self.min_area < SMALL_MAX or not LARGE_MIN < self.max_area:
            problems.append(f"need 64 <= min_area < {SMALL_MAX:g} and max_area > {LARGE_MIN:g}")
        if not 0.0 <= self.max_truncation < 0.5 or not 0.0 < self.max_iou <= 1.0 or not 0.0 <= self.min_visible <= 1.0:
            problems.append("need 0 <= max_truncation < 0.5, 0 < max_iou <= 1, 0 <= min_visible <= 1")
        if self.max_attempts < 1 or self.supersample < 1 or self.noise < 0:
            problems.append("max_attempts and supersample must be >= 1 and noise >= 0")
        if not 0 <= self.distractors[0] <= self.distractors[1]:
            problems.append("distractors must be a range (lo, hi) with 0 <= lo <= hi")
        if problems:
            raise DetrqError("invalid SyntheticSpec: " + "; ".join(problems))
        _size_plan(self)  # raises if the image is too small for the requested large share


def _ring(radii: list[float], phase: float) -> np.ndarray:
    """Vertices at equal angular steps with the given radii (cycled), first vertex at angle ``phase``."""
    k = len(radii)
    angles = [phase + 2 * math.pi * j / k for j in range(k)]
    return np.array([[r * math.cos(a), r * math.sin(a)] for a, r in zip(angles, radii)])


def _cross(width_ratio: float = 0.4) -> np.ndarray:
    """A plus sign whose arm width is ``width_ratio`` of its span, scaled to circumradius 1."""
    h, w = 1.0, width_ratio
    quarter = [[w, h], [w, w], [h, w]]  # one arm's outline, then rotated by 90 degrees three times
    pts = quarter + [[y, -x] for x, y in quarter] + [[-x, -y] for x, y in quarter] + [[-y, x] for x, y in quarter]
    return np.array(pts) / math.hypot(h, w)


# Unit templates: circumradius 1, centred on the origin, y pointing down as in image coordinates.
TEMPLATES = {
    "circle": _ring([1.0] * 64, 0.0),
    "square": _ring([1.0] * 4, math.pi / 4),
    "triangle": _ring([1.0] * 3, -math.pi / 2),
    "star": _ring([1.0, 0.5] * 5, -math.pi / 2),
    "cross": _cross(),
}


def _polygon_area(v: np.ndarray) -> float:
    # Shoelace with math.fsum, not np.dot: BLAS summation order varies by CPU, and radii derive from this.
    pts = v.tolist()
    return abs(math.fsum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]))) / 2


UNIT_AREAS = {name: _polygon_area(v) for name, v in TEMPLATES.items()}
# Per shape: probabilities of the three COCO area ranges and the target-area interval of each.
_SizePlan = dict[str, tuple[np.ndarray, list[tuple[float, float]]]]


def categories() -> list[dict[str, Any]]:
    """COCO categories: ids 1..10, colour-major ("red_circle" = 1 ... "blue_cross" = 10)."""
    return [
        {"id": 1 + c * len(SHAPES) + s, "name": f"{colour}_{shape}", "supercategory": shape}
        for c, (colour, _) in enumerate(COLOURS)
        for s, shape in enumerate(SHAPES)
    ]


def area_range(area: float) -> str:
    """COCO's area range name for an annotation ``area``."""
    return "small" if area < SMALL_MAX else "medium" if area < LARGE_MIN else "large"


def _size_plan(spec: SyntheticSpec) -> _SizePlan:
    """Per shape: probabilities of the three area ranges and the target-area interval of each.

    Thin shapes (triangle, star) cannot exceed 96^2 px^2 inside a 128 px image, so the large share is
    given to the shapes that can and taken from their small/medium share: the marginal over uniformly
    drawn classes still equals ``spec.size_mix`` and every class keeps the same frequency.
    """
    # A circumradius this big still fits at any rotation with max_truncation on both sides.
    r_cap = spec.image_size / (2 * (1 - 2 * spec.max_truncation))
    top = {s: min(spec.max_area, UNIT_AREAS[s] * r_cap * r_cap) for s in SHAPES}
    # 10% headroom so rasterisation and border clipping rarely push a large object back to medium.
    can_be_large = [s for s in SHAPES if top[s] >= 1.1 * LARGE_MIN]
    p_small, p_medium, p_large = spec.size_mix
    if p_large > 0 and not can_be_large:
        raise DetrqError(
            f"SyntheticSpec: no shape can exceed {LARGE_MIN:g} px^2 at image_size {spec.image_size}; "
            "set size_mix[2] = 0"
        )
    p_large_given = p_large * len(SHAPES) / len(can_be_large) if can_be_large else 0.0
    if p_large_given > 1:
        raise DetrqError(f"SyntheticSpec: size_mix[2] may be at most {len(can_be_large) / len(SHAPES):.2f}")
    plan = {}
    for s in SHAPES:
        pl = p_large_given if s in can_be_large else 0.0
        rest = (1 - pl) / (p_small + p_medium) if p_small + p_medium > 0 else 0.0
        probs = np.array([p_small * rest, p_medium * rest, pl])
        large = (1.05 * LARGE_MIN, max(1.05 * LARGE_MIN, top[s]))
        intervals = [(spec.min_area, SMALL_MAX), (SMALL_MAX, LARGE_MIN), large]
        plan[s] = (probs / probs.sum(), intervals)
    return plan


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return round(r * 255), round(g * 255), round(b * 255)


def _background(rng: np.random.Generator, spec: SyntheticSpec) -> Image.Image:
    """Smooth low-saturation colour field, soft faint blobs, then a few sharp faint lines."""
    size = spec.image_size
    g = int(rng.integers(2, 5))
    base_hue, base_value = rng.random(), rng.uniform(0.25, 0.8)
    cells = []
    for _ in range(g * g):
        hue, sat = base_hue + rng.uniform(-0.15, 0.15), rng.uniform(0, spec.background_saturation)
        cells.append(_hsv_to_rgb(hue, sat, base_value + rng.uniform(-0.2, 0.2)))
    grid = np.array(cells, dtype=np.uint8).reshape(g, g, 3)
    img = Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC).convert("RGBA")
    n = int(rng.integers(spec.distractors[0], spec.distractors[1] + 1))
    n_blobs = int(rng.integers(0, n + 1))
    for kind, count in (("blob", n_blobs), ("line", n - n_blobs)):
        overlay = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        draw = ImageDraw.Draw(overlay)
        for _ in range(count):
            hue, sat, value = rng.random(), rng.uniform(0, 0.5), rng.uniform(0.1, 1.0)
            colour = _hsv_to_rgb(hue, sat, value) + (int(rng.integers(40, 110)),)  # faint: alpha <= 0.43
            if kind == "blob":
                cx, cy = rng.uniform(0, size, 2)
                rx, ry = rng.uniform(0.03, 0.2, 2) * size
                draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=colour)
            else:
                x0, y0, x1, y1 = rng.uniform(-0.2, 1.2, 4) * size
                draw.line([x0, y0, x1, y1], fill=colour, width=int(rng.integers(1, 4)))
        img = Image.alpha_composite(img, overlay)
        if kind == "blob":
            # Blur after the blobs only: soft texture underneath, lines stay crisp like real clutter.
            img = img.filter(ImageFilter.GaussianBlur(2))
    return img.convert("RGB")


@dataclass
class _Placed:
    category_id: int
    z: int  # drawing order: higher is on top
    colour: tuple[int, int, int]
    x0: int  # crop origin of ``alpha`` in the image
    y0: int
    alpha: np.ndarray  # (h, w) coverage counts in 0..supersample^2
    mask: int  # a 1x drawing used only to limit occlusion, one bit per pixel (see ``_mask_bits``)
    bbox: list[float]
    area: float


# The templates as Python floats: placement works on a few dozen vertices at a time, where numpy's per-call
# overhead dominates, and the same scalar operations in the same order give the same IEEE results.
_TEMPLATE_POINTS = {name: [(x, y) for x, y in v.tolist()] for name, v in TEMPLATES.items()}


def _rasterize(
    xs: list[float], ys: list[float], size: int, ss: int
) -> tuple[int, int, np.ndarray, list[float], float] | None:
    """Draw a polygon (vertices in image coordinates) at ``ss`` times the resolution on its clipped pixel crop.

    Returns the crop origin, coverage counts per pixel (0..ss^2), the tight box of the hi-res drawing
    in pixels, and the covered area in pixels; None if nothing lands in the image. Box and area come
    from the same hi-res pixels, so 0 < area <= w * h holds exactly.
    """
    x0, y0 = max(0, math.floor(min(xs))), max(0, math.floor(min(ys)))
    x1, y1 = min(size, math.ceil(max(xs))), min(size, math.ceil(max(ys)))
    if x1 <= x0 or y1 <= y0:
        return None
    canvas = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0)
    # Pillow puts hi-res pixel k's centre at coordinate k; ours is at (k + 0.5) / ss, hence the -0.5.
    ImageDraw.Draw(canvas).polygon([((x - x0) * ss - 0.5, (y - y0) * ss - 0.5) for x, y in zip(xs, ys)], fill=1)
    tight = canvas.getbbox()
    if tight is None:
        return None
    left, upper, right, lower = tight
    bbox = [x0 + left / ss, y0 + upper / ss, (right - left) / ss, (lower - upper) / ss]
    # Coverage per pixel, the sum of its ss x ss block: adding strided column slices is several times faster
    # than reducing a short trailing axis, and integer sums do not depend on their order.
    rows = np.asarray(canvas).reshape(y1 - y0, ss, -1).sum(axis=1, dtype=np.int32)
    alpha = sum(rows[:, j::ss] for j in range(ss))
    return x0, y0, alpha, bbox, float(alpha.sum()) / (ss * ss)


def _box_iou(a: list[float], b: list[float]) -> float:
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _mask_bits(canvas: Image.Image) -> int:
    """A mode "L" drawing of 0s and 1s as an int with one bit per pixel, so that the occlusion tests below
    are big-integer ``&``, ``|`` and ``bit_count`` over the whole image (each far cheaper than a numpy call)."""
    return int.from_bytes(np.packbits(np.frombuffer(canvas.tobytes(), dtype=np.uint8)).tobytes(), "big")


def _occlusion_ok(placed: list[_Placed], z: int, mask: int, min_visible: float) -> bool:
    """Whether adding ``mask`` at depth ``z`` keeps every object at least ``min_visible`` unoccluded."""

    def visible(own: int, covers: list[int]) -> bool:
        if not covers:
            return True
        total = own.bit_count()
        return total == 0 or (own & functools.reduce(operator.or_, covers)).bit_count() <= (1 - min_visible) * total

    if not visible(mask, [p.mask for p in placed if p.z > z]):
        return False
    # Only objects underneath the new one and touching it lose visibility.
    below = [o for o in placed if o.z < z and o.mask & mask]
    return all(visible(o.mask, [p.mask for p in placed if p.z > o.z] + [mask]) for o in below)


def _place(
    rng: np.random.Generator,
    spec: SyntheticSpec,
    shape: str,
    radius: float,
    placed: list[_Placed],
    category_id: int,
    z: int,
    colour: tuple[int, int, int],
) -> _Placed | None:
    """Try random rotations and positions until one keeps box IoU and occlusion in bounds; None if none does."""
    size, t = spec.image_size, spec.max_truncation
    scaled = [(x * radius, y * radius) for x, y in _TEMPLATE_POINTS[shape]]
    canvas = Image.new("L", (size, size), 0)  # every attempt's 1x drawing, cleared once read
    draw = ImageDraw.Draw(canvas)
    for _ in range(spec.max_attempts):
        angle = rng.uniform(0, 2 * math.pi)
        c, s = math.cos(angle), math.sin(angle)
        xs, ys = [x * c - y * s for x, y in scaled], [x * s + y * c for x, y in scaled]
        lo_x, lo_y, hi_x, hi_y = min(xs), min(ys), max(xs), max(ys)
        ext_x, ext_y = hi_x - lo_x, hi_y - lo_y
        c_lo_x, c_lo_y = -lo_x - t * ext_x, -lo_y - t * ext_y
        c_hi_x, c_hi_y = size - hi_x + t * ext_x, size - hi_y + t * ext_y
        if c_lo_x > c_hi_x or c_lo_y > c_hi_y:
            continue
        dx, dy = rng.uniform(c_lo_x, c_hi_x), rng.uniform(c_lo_y, c_hi_y)
        # Cheap rejections first: the analytic box, then a 1x drawing for occlusion; hi-res only once accepted.
        # Rounding is monotonic, so the shifted extremes are exactly the extremes of the shifted vertices.
        b0_x, b0_y = min(max(lo_x + dx, 0.0), float(size)), min(max(lo_y + dy, 0.0), float(size))
        b1_x, b1_y = min(max(hi_x + dx, 0.0), float(size)), min(max(hi_y + dy, 0.0), float(size))
        box = [b0_x, b0_y, b1_x - b0_x, b1_y - b0_y]
        if any(_box_iou(box, p.bbox) > spec.max_iou for p in placed):
            continue
        xs, ys = [x + dx for x in xs], [y + dy for y in ys]
        # Mode "L" rasterises exactly as mode "1" (the same 8-bit polygon fill) and is cheaper to read back.
        draw.polygon([(x - 0.5, y - 0.5) for x, y in zip(xs, ys)], fill=1)
        mask = _mask_bits(canvas)
        canvas.paste(0, (0, 0, size, size))
        if not _occlusion_ok(placed, z, mask, spec.min_visible):
            continue
        raster = _rasterize(xs, ys, size, spec.supersample)
        if raster is None:
            continue
        x0, y0, alpha, bbox, area = raster
        if bbox[2] < 4 or bbox[3] < 4:
            continue  # too little of it inside the image to be a fair target
        return _Placed(category_id, z, colour, x0, y0, alpha, mask, bbox, area)
    return None


def _render_image(
    rng: np.random.Generator, spec: SyntheticSpec, plan: _SizePlan
) -> tuple[np.ndarray, list[_Placed], int]:
    """One image (H, W, 3 uint8), its objects in drawing order, and how many sampled objects were dropped."""
    size, ss = spec.image_size, spec.supersample
    q = ss * ss
    img = np.asarray(_background(rng, spec), dtype=np.int32).copy()
    n = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    wanted = []
    for _ in range(n):
        cat = int(rng.integers(0, len(COLOURS) * len(SHAPES)))
        hue = COLOURS[cat // len(SHAPES)][1]
        shape = SHAPES[cat % len(SHAPES)]
        probs, intervals = plan[shape]
        lo, hi = intervals[int(rng.choice(3, p=probs))]
        # Uniform in linear size (sqrt of area) within the range.
        side = rng.uniform(math.sqrt(lo), math.sqrt(hi))
        area = side * side
        hue += rng.uniform(-spec.hue_jitter, spec.hue_jitter)
        colour = _hsv_to_rgb(hue, rng.uniform(*spec.object_saturation), rng.uniform(*spec.object_value))
        wanted.append((cat + 1, shape, area, colour))
    z_order = rng.permutation(n).tolist()
    placed: list[_Placed] = []
    # Largest first: a big object placed late would almost always collide; z-order stays random.
    for k in sorted(range(n), key=lambda k: -wanted[k][2]):
        cat, shape, area, colour = wanted[k]
        # A crowded image shrinks a late object rather than dropping it, so the object count stays as drawn.
        while True:
            obj = _place(rng, spec, shape, math.sqrt(area / UNIT_AREAS[shape]), placed, cat, z_order[k], colour)
            if obj is not None:
                placed.append(obj)
                break
            if area * SHRINK < spec.min_area:
                break
            area *= SHRINK
    placed.sort(key=lambda p: p.z)
    for p in placed:
        h, w = p.alpha.shape
        region = img[p.y0 : p.y0 + h, p.x0 : p.x0 + w]
        # One channel at a time: broadcasting against a 3-vector runs numpy's slow length-3 inner loops.
        for channel, value in enumerate(p.colour):
            plane = region[:, :, channel]
            plane[...] = (plane * (q - p.alpha) + value * p.alpha + q // 2) // q
    if spec.noise:
        lo, hi = -spec.noise, spec.noise + 1
        img += rng.integers(lo, hi, img.shape) + rng.integers(lo, hi, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), placed, n - len(placed)


_CHUNK = 100  # images per job of a worker process


def _file_name(image_id: int) -> str:
    return f"{image_id:012d}.png"


def _render_chunk(context: tuple, indices: range) -> list[tuple[list[tuple[int, list[float], float]], int]]:
    """Images ``indices`` of a split written into its folder; per image its objects (category id, bbox, area)
    and its number of dropped objects. Image i draws from its own generator, so any split of the work into
    chunks and processes writes the same bytes."""
    folder, seed, split, spec, plan = context
    out = []
    for i in indices:
        pixels, objects, n_dropped = _render_image(np.random.default_rng([seed, SPLIT_CODES[split], i]), spec, plan)
        # Fixed options and no text chunks: the bytes depend only on the pixels (and Pillow's zlib).
        Image.fromarray(pixels, "RGB").save(folder / _file_name(i + 1), format="PNG", compress_level=1)
        out.append(([(o.category_id, o.bbox, o.area) for o in objects], n_dropped))
    return out


def _write_split(
    out: Path, split: str, n: int, seed: int, spec: SyntheticSpec, plan: _SizePlan, progress: bool, workers: int
) -> dict[str, Any]:
    """Render one split into ``OUT/.tmp_<split>`` (in ``workers`` processes), swap it in, then write its JSON;
    return its summary.

    The JSON is the completion marker: it is removed before the image folder is swapped and written
    last, so an interruption at any point never leaves a split whose JSON and images disagree.
    """
    tmp = out / f".tmp_{split}"
    if tmp.exists():
        shutil.rmtree(tmp)  # left over from an interrupted run
    tmp.mkdir(parents=True)
    cats = categories()
    images, annotations, dropped = [], [], 0
    per_class = {c["name"]: 0 for c in cats}
    per_area = {r: 0 for r in AREA_RANGES}
    context = (tmp, seed, split, spec, plan)
    chunks = [range(k, min(n, k + _CHUNK)) for k in range(0, n, _CHUNK)]
    if workers > 1 and len(chunks) > 1:
        rendered = run_jobs(workers, given, context, _render_chunk, chunks, desc=f"synthetic {split}",
                            unit=f"{_CHUNK} img", progress=progress)
    else:
        rendered = [_render_chunk(context, c) for c in tqdm(chunks, desc=f"synthetic {split}",
                                                            unit=f"{_CHUNK} img", disable=not progress)]
    for i, (objects, n_dropped) in enumerate(item for chunk in rendered for item in chunk):
        image_id = i + 1
        images.append({"id": image_id, "file_name": _file_name(image_id), "width": spec.image_size,
                       "height": spec.image_size})
        dropped += n_dropped
        for category_id, bbox, area in objects:
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id}
            annotations.append({**ann, "bbox": bbox, "area": area, "iscrowd": 0})
            per_class[cats[category_id - 1]["name"]] += 1
            per_area[area_range(area)] += 1
    coco = {
        "info": {
            "description": "detrq synthetic shapes: 5 shapes x 2 colours on textured, noisy backgrounds",
            "generator": GENERATOR_VERSION,
            "seed": seed,
            "split": split,
            "spec": asdict(spec),
        },
        "images": images,
        "annotations": annotations,
        "categories": cats,
    }
    ann_path = out / "annotations" / f"instances_{split}.json"
    ann_path.unlink(missing_ok=True)
    final = out / split
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    write_json_atomic(ann_path, coco)
    counts = {"images": n, "annotations": len(annotations), "dropped_objects": dropped}
    return {**counts, "per_class": per_class, "per_area": per_area}


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def make_dataset(
    out: str | Path,
    n_train: int = 8000,
    n_val: int = 500,
    seed: int = 0,
    spec: SyntheticSpec = SyntheticSpec(),
    progress: bool = True,
    workers: int = 1,
) -> dict[str, Any]:
    """Write the synthetic dataset in COCO layout under ``out`` and return a summary of what was written.

    The same (seed, spec) gives byte-identical files. An existing split under ``out`` is replaced only
    once its new images are complete. The summary has, per split, the numbers of images, annotations and
    dropped objects (sampled but not placeable within the overlap limits), and counts per class and per
    COCO area range. ``workers`` processes render the images side by side: the files are the same bytes.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DetrqError(f"synthetic dataset output {out} exists and is not a directory; pass a directory path")
    if not all(_is_int(n) and n >= 1 for n in (n_train, n_val)):
        raise DetrqError(f"n_train and n_val must be positive integers, got {n_train!r} and {n_val!r}")
    if not (_is_int(seed) and seed >= 0):
        raise DetrqError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(spec, SyntheticSpec):
        raise DetrqError(f"spec must be a SyntheticSpec, got {type(spec).__name__}")
    plan = _size_plan(spec)
    splits = {s: _write_split(out, s, n, seed, spec, plan, progress, workers)
              for s, n in (("train", n_train), ("val", n_val))}
    return {"out": str(out), "seed": seed, "generator": GENERATOR_VERSION, "splits": splits}
