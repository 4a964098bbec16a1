"""Fast, exact replacement for pycocotools' bbox ``COCOeval.evaluate`` (the per-image matching).

``FastCOCOeval`` is a ``COCOeval`` whose ``evaluate`` builds the same ``evalImgs`` as pycocotools (checked
against 2.0.11: same order, same dtMatches, gtMatches, dtIgnore, gtIgnore, dtScores, dtIds and gtIds values and
dtypes), so the inherited ``accumulate`` and ``summarize`` give the same ``eval`` and ``stats``. Instead of one
Python call of ``computeIoU`` and ``evaluateImg`` per (image, category, area range), it

* groups detections and ground truth per (image, category) with stable numpy sorts (ties in score keep the
  annotation order, as pycocotools' mergesort does) and keeps the ``maxDets[-1]`` best detections of each group;
* computes IoU with ``pycocotools.mask.iou`` once per image (each entry is computed independently, so the
  entries equal those of pycocotools' per-category calls);
* runs the greedy matching for all (image, category, area range, IoU threshold) problems at once, one
  detection rank at a time. pycocotools' loop over the ground truth (non-ignored first) picks, among the
  non-ignored ground truth still available with IoU >= min(t, 1 - 1e-10), the last one of highest IoU, and only
  if there is none, the same among the ignored ones; that rule is what is vectorized here.

Only bbox evaluation with ``useCats`` is handled; other settings, and IoU matrices holding NaN (where
pycocotools' comparison-based loop has no closed form), fall back to pycocotools. Unlike pycocotools, the fast
path leaves ``ious``, ``_gts`` and ``_dts`` empty, does not write the "ignore" and "_ignore" keys into the
ground-truth annotations, prints nothing, and the arrays in ``evalImgs`` are read-only views of shared buffers.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import gc
from collections.abc import Iterator
from operator import itemgetter
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params


class FastCOCOeval(COCOeval):
    """``COCOeval`` with a vectorized ``evaluate`` for bbox evaluation (identical ``evalImgs``) and ``accumulate``
    (identical ``eval``)."""

    def evaluate(self) -> None:
        p = self.params
        if p.useSegm is not None:
            p.iouType = "segm" if p.useSegm == 1 else "bbox"
        if p.iouType != "bbox" or not p.useCats:
            super().evaluate()
            return
        p.imgIds = list(np.unique(p.imgIds))
        p.catIds = list(np.unique(p.catIds))
        p.maxDets = sorted(p.maxDets)
        with _gc_paused():
            eval_imgs = evaluate_bbox(self.cocoGt, self.cocoDt, p)
        if eval_imgs is None:
            super().evaluate()
            return
        self.evalImgs = eval_imgs
        self.eval = {}
        self._paramsEval = copy.deepcopy(p)

    def accumulate(self, p: Params | None = None) -> None:
        """pycocotools' ``accumulate`` with its per-IoU-threshold Python loops as array operations: the same
        ``eval`` (precision, recall, scores), value for value. The precision envelope is a reversed running
        maximum, and a maximum rounds nothing; the cumulative sums and divisions are pycocotools' own, element
        for element."""
        if not self.evalImgs:
            super().accumulate(p)  # pycocotools' message and state for an evaluation that never ran
            return
        p = self.params if p is None else p
        p.catIds = p.catIds if p.useCats == 1 else [-1]
        n_thr, n_rec, n_area, n_max = len(p.iouThrs), len(p.recThrs), len(p.areaRng), len(p.maxDets)
        n_cat = len(p.catIds) if p.useCats else 1
        precision = -np.ones((n_thr, n_rec, n_cat, n_area, n_max))  # -1 for the precision of absent categories
        recall = -np.ones((n_thr, n_cat, n_area, n_max))
        scores = -np.ones((n_thr, n_rec, n_cat, n_area, n_max))
        pe = self._paramsEval
        set_k, set_a = set(pe.catIds if pe.useCats else [-1]), set(map(tuple, pe.areaRng))
        set_m, set_i = set(pe.maxDets), set(pe.imgIds)
        k_list = [n for n, k in enumerate(p.catIds) if k in set_k]
        m_list = [m for m in p.maxDets if m in set_m]
        a_list = [n for n, a in enumerate(map(tuple, p.areaRng)) if a in set_a]
        i_list = [n for n, i in enumerate(p.imgIds) if i in set_i]
        n_img0, n_area0 = len(pe.imgIds), len(pe.areaRng)
        for k, k0 in enumerate(k_list):
            for a, a0 in enumerate(a_list):
                start = k0 * n_area0 * n_img0 + a0 * n_img0
                evals = [e for e in (self.evalImgs[start + i] for i in i_list) if e is not None]
                for m, max_det in enumerate(m_list):
                    if not evals:
                        continue
                    dt_scores = np.concatenate([e["dtScores"][0:max_det] for e in evals])
                    order = np.argsort(-dt_scores, kind="mergesort")  # pycocotools' (Matlab's) order
                    sorted_scores = dt_scores[order]
                    dtm = np.concatenate([e["dtMatches"][:, 0:max_det] for e in evals], axis=1)[:, order]
                    dt_ig = np.concatenate([e["dtIgnore"][:, 0:max_det] for e in evals], axis=1)[:, order]
                    npig = np.count_nonzero(np.concatenate([e["gtIgnore"] for e in evals]) == 0)
                    if npig == 0:
                        continue
                    tp = np.cumsum(np.logical_and(dtm, np.logical_not(dt_ig)), axis=1).astype(dtype=float)
                    fp = np.cumsum(np.logical_and(np.logical_not(dtm), np.logical_not(dt_ig)), axis=1).astype(
                        dtype=float)
                    n_det = tp.shape[1]
                    if n_det == 0:  # ground truth without detections: nothing recalled
                        precision[:, :, k, a, m], scores[:, :, k, a, m], recall[:, k, a, m] = 0.0, 0.0, 0.0
                        continue
                    rc = tp / npig
                    pr = np.maximum.accumulate((tp / (fp + tp + np.spacing(1)))[:, ::-1], axis=1)[:, ::-1]
                    recall[:, k, a, m] = rc[:, -1]
                    for t in range(n_thr):
                        at = np.searchsorted(rc[t], p.recThrs, side="left")
                        reached = at < n_det  # recall levels never reached keep precision and score 0
                        last = np.minimum(at, n_det - 1)
                        precision[t, :, k, a, m] = np.where(reached, pr[t, last], 0.0)
                        scores[t, :, k, a, m] = np.where(reached, sorted_scores[last], 0.0)
        self.eval = {"params": p, "counts": [n_thr, n_rec, n_cat, n_area, n_max],
                     "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
                     "precision": precision, "recall": recall, "scores": scores}


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    # evalImgs is tens of thousands of new dicts and lists (no cycles); collections triggered by them would
    # rescan every annotation dict, doubling the run time.
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _columns(anns: list[dict[str, Any]], *keys: str) -> list[tuple[Any, ...]]:
    """The values of each of ``keys`` over ``anns``, in order."""
    return list(zip(*map(itemgetter(*keys), anns))) if anns else [()] * len(keys)


def _objects(values: tuple[Any, ...]) -> np.ndarray:
    """``values`` as a 1-d object array (the same Python objects, whatever their type)."""
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def _readonly(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def evaluate_bbox(coco_gt: COCO, coco_dt: COCO, p: Params) -> list[dict[str, Any] | None] | None:
    """pycocotools' ``evalImgs`` for bbox evaluation with ``useCats`` under normalized params ``p`` (imgIds and
    catIds sorted and unique, maxDets sorted, as ``COCOeval.evaluate`` makes them): ordered [category][area
    range][image], None where an (image, category) has neither detections nor ground truth. Returns None where
    an IoU is NaN (the caller then runs pycocotools)."""
    img_ids, cat_ids, area_rngs = p.imgIds, p.catIds, p.areaRng
    n_img, n_cat, n_area = len(img_ids), len(cat_ids), len(area_rngs)
    n_groups = n_img * n_cat
    max_det = p.maxDets[-1]
    thr = np.minimum(np.asarray(p.iouThrs, dtype=np.float64), 1 - 1e-10)
    img_pos = {i: n for n, i in enumerate(img_ids)}
    cat_pos = {c: n for n, c in enumerate(cat_ids)}

    def group_keys(image_id: tuple[Any, ...], category_id: tuple[Any, ...]) -> np.ndarray:
        images = np.fromiter(map(img_pos.__getitem__, image_id), dtype=np.int64, count=len(image_id))
        categories = np.fromiter(map(cat_pos.__getitem__, category_id), dtype=np.int64, count=len(category_id))
        return images * n_cat + categories

    # Ground truth grouped per (image, category) key, in annotation order within a group (as COCOeval._prepare).
    gts = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=img_ids, catIds=cat_ids))
    image_id, category_id, ann_id, iscrowd, area, bbox = _columns(
        gts, "image_id", "category_id", "id", "iscrowd", "area", "bbox")
    g_key = group_keys(image_id, category_id)
    g_order = np.argsort(g_key, kind="stable")
    g_key = g_key[g_order]
    g_id_list = _objects(ann_id)[g_order].tolist()
    g_id = np.array(g_id_list, dtype=np.float64)
    iscrowd = _objects(iscrowd)[g_order]
    g_crowd_list = [int(c) for c in iscrowd]  # as COCOeval.computeIoU passes it to mask.iou
    g_crowd = np.array(g_crowd_list, dtype=bool)
    g_flag = np.array([bool(c) for c in iscrowd], dtype=bool)  # COCOeval._prepare's "ignore"
    g_area = np.array(area, dtype=np.float64)[g_order]
    g_box = np.array(bbox, dtype=np.float64).reshape(-1, 4)[g_order]
    g_count = np.bincount(g_key, minlength=n_groups)
    g_start = np.cumsum(g_count) - g_count
    # Ignore flag of each ground truth per area range: crowd or area outside the range.
    g_ign = np.stack([g_flag | (g_area < lo) | (g_area > hi) for lo, hi in area_rngs]).reshape(n_area, len(g_key))

    # Detections grouped per key, highest score first (stable: ties keep annotation order), maxDets[-1] kept.
    dts = coco_dt.loadAnns(coco_dt.getAnnIds(imgIds=img_ids, catIds=cat_ids))
    image_id, category_id, ann_id, score, area, bbox = _columns(
        dts, "image_id", "category_id", "id", "score", "area", "bbox")
    d_key = group_keys(image_id, category_id)
    by_score = np.argsort(-np.array(score, dtype=np.float64), kind="stable")
    d_order = by_score[np.argsort(d_key[by_score], kind="stable")]
    d_key = d_key[d_order]
    all_count = np.bincount(d_key, minlength=n_groups)
    rank = np.arange(len(d_key)) - (np.cumsum(all_count) - all_count)[d_key]
    keep = rank < max_det
    d_order, d_key, rank = d_order[keep], d_key[keep], rank[keep]
    d_id_list = _objects(ann_id)[d_order].tolist()
    d_score_list = _objects(score)[d_order].tolist()
    d_id = np.array(d_id_list, dtype=np.float64)
    d_area = np.array(area, dtype=np.float64)[d_order]
    d_box = np.array(bbox, dtype=np.float64).reshape(-1, 4)[d_order]
    d_count = np.bincount(d_key, minlength=n_groups)
    d_start = np.cumsum(d_count) - d_count

    # IoU of every kept detection with every ground truth of its image; flat[d_base[r] + s] is the IoU of
    # detection r with ground truth s (s indexes the grouped ground truth, within the detection's image).
    img_d_count = d_count.reshape(n_img, n_cat).sum(1)
    img_g_count = g_count.reshape(n_img, n_cat).sum(1)
    img_d_start = np.cumsum(img_d_count) - img_d_count
    img_g_start = np.cumsum(img_g_count) - img_g_count
    d_base = np.zeros(len(d_key), dtype=np.int64)
    parts = []
    offset = 0
    for i in np.flatnonzero((img_d_count > 0) & (img_g_count > 0)).tolist():
        ds, nd = int(img_d_start[i]), int(img_d_count[i])
        gs, ng = int(img_g_start[i]), int(img_g_count[i])
        parts.append(np.asarray(mask_utils.iou(d_box[ds:ds + nd], g_box[gs:gs + ng], g_crowd_list[gs:gs + ng]),
                                dtype=np.float64).ravel())
        d_base[ds:ds + nd] = offset + np.arange(nd) * ng - gs
        offset += nd * ng
    flat = np.concatenate(parts) if parts else np.zeros(0)
    if np.isnan(flat).any():
        return None

    # Greedy matching, all problems at once, one detection rank at a time. Only detections with an IoU of at
    # least the lowest threshold with some ground truth of their group can match anything.
    gt_matches = np.zeros((n_area, len(thr), len(g_key)))
    dt_matches = np.zeros((n_area, len(thr), len(d_key)))
    dt_ignore = np.zeros((n_area, len(thr), len(d_key)), dtype=bool)
    rows = np.flatnonzero(g_count[d_key] > 0)  # detections of groups with ground truth
    widths = g_count[d_key[rows]]
    entry_start = np.cumsum(widths) - widths
    entry = np.repeat(d_base[rows] + g_start[d_key[rows]] - entry_start, widths) + np.arange(widths.sum())
    if rows.size:
        rows = rows[np.maximum.reduceat(flat[entry], entry_start) >= thr.min()]
    rows = rows[np.argsort(rank[rows], kind="stable")]
    steps = np.split(rows, np.flatnonzero(np.diff(rank[rows])) + 1) if rows.size else []
    for rs in steps:
        key = d_key[rs]
        width = int(g_count[key].max())
        j = np.arange(width)
        valid = j < g_count[key][:, None]
        g_idx = np.where(valid, g_start[key][:, None] + j, 0)
        iou = np.where(valid, flat[np.where(valid, d_base[rs][:, None] + g_idx, 0)], -np.inf)
        ign = g_ign[:, g_idx][:, None]  # (area, 1, row, gt)
        cand = (iou >= thr[:, None, None]) & ((gt_matches[:, :, g_idx] <= 0) | g_crowd[g_idx])
        regular = cand & ~ign
        sel = np.where(regular.any(-1, keepdims=True), regular, cand)
        vals = np.where(sel, iou, -np.inf)
        hit = sel & (vals == vals.max(-1, keepdims=True))
        pos = width - 1 - np.argmax(hit[..., ::-1], axis=-1)
        a_i, t_i, n_i = np.nonzero(sel.any(-1))
        g_sel = g_idx[n_i, pos[a_i, t_i, n_i]]
        r_sel = rs[n_i]
        gt_matches[a_i, t_i, g_sel] = d_id[r_sel]
        dt_matches[a_i, t_i, r_sel] = g_id[g_sel]
        dt_ignore[a_i, t_i, r_sel] = g_ign[a_i, g_sel]
    # Unmatched detections outside the area range are ignored.
    d_out = np.stack([(d_area < lo) | (d_area > hi) for lo, hi in area_rngs]).reshape(n_area, 1, len(d_key))
    dt_ignore |= (dt_matches == 0) & d_out
    _readonly(dt_matches)
    _readonly(dt_ignore)

    # Ground truth in pycocotools' per-area order: non-ignored first, annotation order otherwise.
    gt_perm = [np.argsort(g_key * 2 + g_ign[a], kind="stable") for a in range(n_area)]
    gt_matches_sorted = [_readonly(gt_matches[a][:, perm]) for a, perm in enumerate(gt_perm)]
    gt_ignore_sorted = [_readonly(g_ign[a][perm].astype(np.int64)) for a, perm in enumerate(gt_perm)]
    gt_ids_sorted = [[g_id_list[i] for i in perm.tolist()] for perm in gt_perm]
    no_gt_ignore = _readonly(np.array([]))

    d_count_l, d_start_l = d_count.tolist(), d_start.tolist()
    g_count_l, g_start_l = g_count.tolist(), g_start.tolist()
    eval_imgs: list[dict[str, Any] | None] = []
    for k, cat_id in enumerate(cat_ids):
        for a, area_rng in enumerate(area_rngs):
            dtm, dtig = dt_matches[a], dt_ignore[a]
            gtm, gtig, gt_ids = gt_matches_sorted[a], gt_ignore_sorted[a], gt_ids_sorted[a]
            for i, img_id in enumerate(img_ids):
                key = i * n_cat + k
                nd, ng = d_count_l[key], g_count_l[key]
                if nd == 0 and ng == 0:
                    eval_imgs.append(None)
                    continue
                ds, de = d_start_l[key], d_start_l[key] + nd
                gs, ge = g_start_l[key], g_start_l[key] + ng
                eval_imgs.append({
                    "image_id": img_id,
                    "category_id": cat_id,
                    "aRng": area_rng,
                    "maxDet": max_det,
                    "dtIds": d_id_list[ds:de],
                    "gtIds": gt_ids[gs:ge],
                    "dtMatches": dtm[:, ds:de],
                    "gtMatches": gtm[:, gs:ge],
                    "dtScores": d_score_list[ds:de],
                    "gtIgnore": gtig[gs:ge] if ng else no_gt_ignore,
                    "dtIgnore": dtig[:, ds:de],
                })
    return eval_imgs
