"""Paired bootstrap confidence intervals for COCO AP differences between detection sets, over images.

Role in the pipeline: ``evaluate`` returns each bit map's raw detections; ``save_detections`` /
``load_detections`` keep them as a compact, exact ``.npz``; ``paired_bootstrap`` turns several labelled
detection sets on the same val images into ΔAP estimates with percentile CIs for Table 1's claims.

How it is fast: pycocotools' per-image matching (``COCOeval.evaluate``) does not depend on which images a
resample draws, only its accumulation does. So each detection set is matched ONCE (``image_eval``), and the
resamples are scored together by ``weighted_aps``: pycocotools' ``accumulate`` interpolation with image k
counted ``weights[k]`` times, vectorised over resamples and bit for bit what it gives for each alone.
Resampling ``params.imgIds`` with duplicates would be wrong: COCOeval calls ``np.unique`` on it and silently
drops them.
"""

from __future__ import annotations

import contextlib
import io
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from tqdm import tqdm

from detrq.evaluation.evaluate import load_results, restrict_to_ap
from detrq.evaluation.fast_match import FastCOCOeval
from detrq.io.errors import DetrqError
from detrq.io.results import atomic_output
from detrq.parallel.pool import given, run_jobs

# Arrays of a detections file, with the dtype each is stored in (float64: exact for Python floats).
_DETECTION_ARRAYS = {"image_id": np.int64, "category_id": np.int64, "bbox": np.float64, "score": np.float64}
_FORMAT = "detrq-detections-1"
# pycocotools' default bbox setting used throughout: area range "all" (index 0), maxDets 100.
_MAX_DETS = 100


# --- Detections on disk ------------------------------------------------------------------------------------

def save_detections(path: str | os.PathLike, detections: Sequence[dict[str, Any]]) -> Path:
    """Write COCO detections ({"image_id", "category_id", "bbox" xywh, "score"}) to ``path`` as a compressed
    ``.npz`` (ids int64, bbox and score float64, so the round trip is exact), atomically."""
    n = len(detections)
    try:
        arrays = {
            "image_id": np.array([d["image_id"] for d in detections], dtype=np.int64).reshape(n),
            "category_id": np.array([d["category_id"] for d in detections], dtype=np.int64).reshape(n),
            "bbox": np.array([d["bbox"] for d in detections], dtype=np.float64).reshape(n, 4),
            "score": np.array([d["score"] for d in detections], dtype=np.float64).reshape(n),
        }
    except (KeyError, TypeError, ValueError) as e:
        raise DetrqError(f"cannot save detections to {path}: each needs image_id, category_id, a 4-number bbox "
                         f"and score ({type(e).__name__}: {e})") from None
    with atomic_output(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez adds no ".npz" suffix
        np.savez_compressed(f, format=np.array(_FORMAT), **arrays)
    return Path(path)


def load_detections(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a ``save_detections`` file back as a list of detection dicts (Python ints and floats)."""
    path = Path(path)
    if not path.is_file():
        raise DetrqError(f"detections file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["format"]) != _FORMAT:
                raise ValueError(f"format {str(z['format'])!r}, expected {_FORMAT!r}")
            arrays = {k: z[k] for k in _DETECTION_ARRAYS}
        n = len(arrays["score"])
        for k, dtype in _DETECTION_ARRAYS.items():
            shape = (n, 4) if k == "bbox" else (n,)
            if arrays[k].dtype != dtype or arrays[k].shape != shape:
                raise ValueError(f"array {k!r} is {arrays[k].dtype} {arrays[k].shape}, expected {shape}")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise DetrqError(f"corrupt detections file {path} ({type(e).__name__}: {e}); "
                         f"delete it and rerun the evaluation that wrote it") from None
    return [{"image_id": i, "category_id": c, "bbox": b, "score": s} for i, c, b, s in
            zip(arrays["image_id"].tolist(), arrays["category_id"].tolist(), arrays["bbox"].tolist(),
                arrays["score"].tolist())]


# --- Per-image evaluation, once per detection set ----------------------------------------------------------

@dataclass(frozen=True)
class CategoryEval:
    """One category's detections over all images, in pycocotools' accumulation order.

    That order is: images by ascending id, each image's top-100 detections by descending score, then one
    stable (mergesort) sort by descending score. ``tp``/``fp`` are (T, D) booleans per IoU threshold, already
    excluding ignored detections; ``gt_count[k]`` is image k's number of non-ignored ground-truth boxes.
    """

    cat_id: int
    image_index: np.ndarray  # (D,) int64: index into ImageEval.image_ids of each sorted detection
    scores: np.ndarray  # (D,) float64, descending
    tp: np.ndarray  # (T, D) bool
    fp: np.ndarray  # (T, D) bool
    gt_count: np.ndarray  # (N,) int64


@dataclass(frozen=True)
class ImageEval:
    """pycocotools' per-image bbox evaluation of one detection set (area "all", maxDets 100), kept as arrays.

    ``weighted_ap(self, weights)`` needs ``weights[k]`` for image ``image_ids[k]`` (ids ascending), and
    ``weighted_aps`` one such row per resample.
    """

    image_ids: np.ndarray  # (N,) int64, ascending
    iou_thrs: np.ndarray  # (T,)
    rec_thrs: np.ndarray  # (R,)
    categories: tuple[CategoryEval, ...]


def image_eval(coco_gt: COCO, detections: Sequence[dict[str, Any]], image_ids: Sequence[int]) -> ImageEval:
    """Run pycocotools' ``COCOeval.evaluate`` (bbox; area "all", 100 detections: ``restrict_to_ap``; its exact
    vectorised form ``fast_match.FastCOCOeval``) once on
    ``image_ids`` and keep what accumulation needs."""
    ids = [int(i) for i in image_ids]
    if len(set(ids)) != len(ids):
        raise DetrqError("image_ids has duplicates; pass each image once (weights express multiplicity)")
    if not ids:
        raise DetrqError("image_ids is empty: nothing to evaluate")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco_dt = load_results(coco_gt, detections)
        ev = FastCOCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.imgIds = ids
        restrict_to_ap(ev)
        ev.evaluate()
    p = ev.params
    if p.maxDets[-1] != _MAX_DETS:
        raise DetrqError(f"unexpected pycocotools maxDets {p.maxDets}")
    n_img, n_area = len(p.imgIds), len(p.areaRng)
    image_ids_sorted = np.asarray(p.imgIds, dtype=np.int64)  # evaluate() made them sorted and unique
    n_thr = len(p.iouThrs)
    categories = []
    for k, cat_id in enumerate(p.catIds):
        # evalImgs is ordered [category][area range][image]; area range 0 is "all".
        block = ev.evalImgs[k * n_area * n_img:k * n_area * n_img + n_img]
        scores, index, dtm, dtig = [], [], [], []
        gt_count = np.zeros(n_img, dtype=np.int64)
        for i, e in enumerate(block):
            if e is None:
                continue
            d = len(e["dtScores"][:_MAX_DETS])
            scores.append(np.asarray(e["dtScores"][:_MAX_DETS], dtype=np.float64))
            index.append(np.full(d, i, dtype=np.int64))
            dtm.append(np.asarray(e["dtMatches"][:, :_MAX_DETS]).reshape(n_thr, d))
            dtig.append(np.asarray(e["dtIgnore"][:, :_MAX_DETS]).reshape(n_thr, d))
            gt_count[i] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
        if scores:
            s = np.concatenate(scores)
            order = np.argsort(-s, kind="mergesort")  # as pycocotools' accumulate
            matched = np.concatenate(dtm, axis=1)[:, order] != 0
            ignored = np.concatenate(dtig, axis=1)[:, order] != 0
            cat = CategoryEval(int(cat_id), np.concatenate(index)[order], s[order], matched & ~ignored,
                               ~matched & ~ignored, gt_count)
        else:
            cat = CategoryEval(int(cat_id), np.zeros(0, np.int64), np.zeros(0), np.zeros((n_thr, 0), bool),
                               np.zeros((n_thr, 0), bool), gt_count)
        categories.append(cat)
    return ImageEval(image_ids_sorted, np.asarray(p.iouThrs, dtype=np.float64),
                     np.asarray(p.recThrs, dtype=np.float64), tuple(categories))


# Resamples that ``weighted_aps`` scores at once. It bounds the memory, mostly the interpolated precisions, rows x
# IoU thresholds x recall points x categories floats (8 MB for 10 categories); the APs do not depend on it.
_CHUNK = 100


def weighted_ap(ev: ImageEval, weights: np.ndarray | None = None) -> float:
    """COCO AP (mean over IoU thresholds, recall points and categories with ground truth) with image k counted
    ``weights[k]`` times (non-negative integers; None: all 1, which equals pycocotools' ``stats[0]``).

    This is pycocotools' ``accumulate`` for area "all", maxDets 100, with tp/fp cumulative sums and the
    ground-truth count weighted. It equals pycocotools on a dataset where image k appears ``weights[k]`` times
    under consecutive new ids (see ``paired_bootstrap``). Returns NaN when no weighted image has ground truth.
    It is ``weighted_aps`` with one row.
    """
    n_img = len(ev.image_ids)
    w = np.ones(n_img) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n_img,):
        raise DetrqError(f"weights must have shape ({n_img},), got {w.shape}")
    return float(weighted_aps(ev, w[None])[0])


def weighted_aps(ev: ImageEval, weights: np.ndarray, *, chunk: int = _CHUNK) -> np.ndarray:
    """``weighted_ap`` of each row of the (B, N) ``weights`` (row b counts image k ``weights[b, k]`` times), as a
    (B,) float64 array: the bootstrap's resamples of one detection set, scored ``chunk`` rows at a time.

    Per category the arrays are (rows, IoU thresholds, kept detections), the kept ones being those that can
    decide a precision: a true positive or ignored at some threshold. Each AP is the float that pycocotools'
    ``accumulate`` arithmetic, run on that row alone (cumulative sums over all ranked detections, one
    ``searchsorted`` per threshold, ``np.mean`` of the stacked precisions), gives, bit for bit, whatever
    ``chunk``:

    * tp, fp and ground-truth counts are sums of integer weights, exact in float64 in any order. So fp + tp up
      to a kept detection is the weight of the ranks up to it less that of the ignored ones, and precision
      tp / (fp + tp + eps) is the same division of the same numbers.
    * Past a detection that is a false positive at threshold t, tp stays and fp grows, so precision does not
      rise (division rounds monotonically): the envelope, the maximum precision from a rank on, is reached at a
      kept detection, and before the first kept one precision is 0. Recall first reaches a level above 0 at a
      true positive, which is kept; level 0 is reached at rank 0, whose envelope (0 without true positives) is
      that of the first kept detection. So the interpolated precisions read the same envelope values.
    * Recall tp / npig takes the values v / npig for integers v <= npig (a true positive matches a counted
      ground-truth box, each at most once): the number of recall thresholds <= it is found once per value and
      row, by the same division, and looked up by tp. pycocotools' ``searchsorted(rc, rec_thrs, "left")``
      counts the detections with rc < rec_thrs[r] (rc is sorted), which are those with fewer than r + 1
      thresholds <= rc: a histogram of that number, summed up to r.
    * Each row's AP is ``np.mean`` of a C-contiguous (T, R, categories with ground truth) array, the layout of
      ``np.stack`` over those categories on axis 2: the same additions in the same order.

    A category none of whose ground truth has weight does not count in that row, as in pycocotools; a row where
    none has gives NaN.
    """
    n_img = len(ev.image_ids)
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] != n_img:
        raise DetrqError(f"weights must have shape (B, {n_img}), got {w.shape}")
    if not np.all((w >= 0) & (w == np.floor(w))):  # the exactness above rests on integer sums
        raise DetrqError("weights must be non-negative integers (image multiplicities)")
    if chunk < 1:
        raise DetrqError(f"chunk must be at least 1, got {chunk}")
    categories = [_KeptDetections.of(cat) for cat in ev.categories]
    aps = np.empty(len(w))
    for start in range(0, len(w), chunk):
        aps[start:start + chunk] = _chunk_aps(ev, categories, w[start:start + chunk])
    return aps


@dataclass(frozen=True)
class _KeptDetections:
    """What ``weighted_aps`` needs of one category: its kept detections (true positives or ignored at some IoU
    threshold) and, for the weight of all ranks up to each, every ranked detection's image."""

    image_index: np.ndarray  # (D,) int64, as CategoryEval's
    kept: np.ndarray  # (S,) int64: ranks of the kept detections, ascending
    run_starts: np.ndarray  # (S,) int64: where the run of ranks ending at each kept detection starts
    tp: np.ndarray  # (T, S) bool
    ignored: np.ndarray | None  # (T, S) bool; None when no detection is ignored (crowd-matched)
    gt_count: np.ndarray  # (N,) float64

    @staticmethod
    def of(cat: CategoryEval) -> _KeptDetections:
        ignored = ~(cat.tp | cat.fp)
        kept = np.flatnonzero(cat.tp.any(axis=0) | ignored.any(axis=0))
        return _KeptDetections(cat.image_index, kept, np.concatenate([[0], kept + 1])[:-1], cat.tp[:, kept],
                               ignored[:, kept] if ignored.any() else None, cat.gt_count.astype(np.float64))


def _chunk_aps(ev: ImageEval, categories: list[_KeptDetections], w: np.ndarray) -> np.ndarray:
    """``weighted_aps`` of the rows of ``w`` (float64), all at once."""
    n_rows, n_thr, n_rec = len(w), len(ev.iou_thrs), len(ev.rec_thrs)
    q = np.zeros((n_rows, n_thr, n_rec, len(categories)))  # interpolated precision, 0 where recall never reaches
    counts = np.zeros((n_rows, len(categories)), dtype=bool)  # the category has ground truth in the row
    for k, cat in enumerate(categories):
        npig = w @ cat.gt_count
        rows = np.flatnonzero(npig > 0)  # pycocotools leaves -1 for a category without ground truth: not counted
        counts[rows, k] = True
        n, n_kept = rows.size, cat.kept.size
        if not n or not n_kept:
            continue
        wd = w.take(cat.image_index, axis=1)  # (n, D): each ranked detection's weight
        if n < n_rows:
            wd, npig = wd[rows], npig[rows]
        w_kept = wd[:, None, cat.kept]  # (n, 1, S)
        tp = np.cumsum(cat.tp * w_kept, axis=2)  # (n, T, S), integer-valued
        # The weight of all ranks up to each kept detection: the runs of ranks that end at one, summed, cumulated.
        seen = np.cumsum(np.add.reduceat(wd[:, :cat.kept[-1] + 1], cat.run_starts, axis=1), axis=1)[:, None]
        if cat.ignored is not None:
            seen = seen - np.cumsum(cat.ignored * w_kept, axis=2)  # now fp + tp
        pr = tp / (seen + np.spacing(1))
        env = np.zeros((n, n_thr, n_kept + 1))  # the extra last column: 0 for recall levels never reached
        env[..., :n_kept] = np.maximum.accumulate(pr[..., ::-1], axis=2)[..., ::-1]  # precision envelope
        # reached = #{r : rec_thrs[r] <= tp / npig}, per row for each integer tp <= npig, then per detection.
        lut = np.searchsorted(ev.rec_thrs, np.arange(int(npig.max()) + 1) / npig[:, None], side="right")
        reached = _take_rows(lut, tp.astype(np.intp).reshape(n, -1)).reshape(n * n_thr, n_kept)
        # inds[r] = #{rc < rec_thrs[r]} = #{reached <= r}: one bincount over all (row, threshold) pairs.
        offsets = np.arange(n * n_thr)[:, None] * (n_rec + 1)
        hist = np.bincount((reached + offsets).ravel(), minlength=n * n_thr * (n_rec + 1))
        inds = np.cumsum(hist.reshape(n * n_thr, n_rec + 1)[:, :n_rec], axis=1)
        q[rows, :, :, k] = _take_rows(env.reshape(n * n_thr, -1), inds).reshape(n, n_thr, n_rec)
    aps = np.full(n_rows, np.nan)  # NaN: no category has ground truth in the row
    for i in range(n_rows):
        if counts[i].any():
            # compress gives a C-contiguous (T, R, K') copy, as np.stack would; q[i][..., mask] is laid out
            # category-major, and np.mean would add in another order.
            aps[i] = np.mean(q[i].compress(counts[i], axis=2))
    return aps


def _take_rows(table: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``np.take_along_axis(table, index, axis=1)`` for 2-D arrays as one flat ``take``, several times faster.
    Every index must be below ``table.shape[1]``: a larger one would read the next row."""
    return table.ravel().take(index + table.shape[1] * np.arange(len(table))[:, None])


# --- The paired bootstrap --------------------------------------------------------------------------------

def resample_weights(n_images: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_images) int64 multiplicities: each row draws ``n_images`` images with replacement."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_images, size=(n_boot, n_images))
    offsets = np.arange(n_boot, dtype=np.int64)[:, None] * n_images  # one bincount for all rows
    return np.bincount((draws + offsets).ravel(), minlength=n_boot * n_images).reshape(n_boot, n_images)


def paired_bootstrap(
    coco_gt: COCO,
    image_ids: Sequence[int],
    detections: dict[str, list[dict[str, Any]]],
    pairs: list[tuple[str, str]],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    progress: bool = True,
    workers: int = 1,
) -> dict[str, dict[str, Any]]:
    """Paired bootstrap CIs of ΔAP = AP(a) − AP(b) for each ``(a, b)`` in ``pairs``, over ``image_ids``.

    ``detections`` maps a label (e.g. a bit map's name) to its detection list on the same images. Each set is
    matched once; then ``n_boot`` resamples of the images with replacement (``np.random.default_rng(seed)``)
    are drawn, the SAME resamples for every label, which is what makes the comparison paired. The statistic
    is the COCO AP (area all, maxDets 100, fraction units) of the resampled image multiset: an image drawn m
    times counts m times, in ground truth and detections alike; a category none of whose ground truth was
    drawn does not count in that resample, as in pycocotools. Equivalently, pycocotools on a dataset where
    the m copies of each image get consecutive new ids; with scores tied across images, pycocotools' own
    order depends on the numbering, and here the m copies of a detection enter the ranking as one block.

    Returns ``{"a|b": {"delta", "low", "high", "se", "p_le_0", "n_boot", "seed", "level", "n_images"},
    ..., "labels": {label: {"ap", "low", "high", "se", ...}}}``: "delta"/"ap" on the full image set, "low"/
    "high" the percentile CI at ``level``, "se" the std of the bootstrap values, "p_le_0" the fraction of
    bootstrap deltas <= 0.

    ``workers`` > 1 scores the labels side by side in that many processes (``parallel.pool``): the same numbers,
    each label's resamples being computed exactly as in one process.
    """
    if not 0 < level < 1:
        raise DetrqError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise DetrqError(f"n_boot must be at least 1, got {n_boot}")
    for label in detections:
        if "|" in label:
            raise DetrqError(f"label {label!r} contains '|', which separates the labels of a pair")
    for a, b in pairs:
        for label in (a, b):
            if label not in detections:
                raise DetrqError(f"pair ({a!r}, {b!r}) names {label!r}, which has no detections; "
                                 f"labels: {sorted(detections)}")
    n_img = len(image_ids)
    context = (coco_gt, list(image_ids), resample_weights(n_img, n_boot, seed))
    labels = list(detections)
    if workers > 1:
        scored = run_jobs(workers, given, context, _label_values, [detections[k] for k in labels],
                          desc="bootstrap", unit="label", progress=progress)
    else:
        scored = [_label_values(context, detections[k])
                  for k in tqdm(labels, desc="bootstrap", unit="label", disable=not progress)]
    full = {label: ap for label, (ap, _) in zip(labels, scored)}
    boot = {label: values for label, (_, values) in zip(labels, scored)}
    if any(np.isnan(v).any() for v in boot.values()):
        raise DetrqError(f"some resamples of the {n_img} images hold no ground truth: too few images with "
                         f"ground truth to bootstrap")
    tail = 100 * (1 - level) / 2
    common = {"n_boot": n_boot, "seed": seed, "level": level, "n_images": n_img}

    def summary(values: np.ndarray) -> dict[str, float]:
        low, high = np.percentile(values, [tail, 100 - tail])
        return {"low": float(low), "high": float(high), "se": float(np.std(values, ddof=1) if n_boot > 1 else 0.0)}

    out: dict[str, dict[str, Any]] = {}
    for a, b in pairs:
        deltas = boot[a] - boot[b]
        out[f"{a}|{b}"] = {"delta": full[a] - full[b], **summary(deltas),
                           "p_le_0": float(np.mean(deltas <= 0)), **common}
    out["labels"] = {label: {"ap": full[label], **summary(boot[label]), **common} for label in labels}
    return out


def _label_values(context: tuple[COCO, list[int], np.ndarray], detections: Sequence[dict[str, Any]]
                  ) -> tuple[float, np.ndarray]:
    """One label's AP on all images and on each resample (the rows of the weights in ``context``)."""
    coco_gt, image_ids, weights = context
    ev = image_eval(coco_gt, detections, image_ids)
    full = weighted_ap(ev)
    if np.isnan(full):
        raise DetrqError("no ground truth in image_ids: AP is undefined, nothing to bootstrap")
    return full, weighted_aps(ev, weights)
