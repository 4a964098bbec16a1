"""Tests of detrq.evaluation.bootstrap: the weighted COCO AP against pycocotools (unit weights, and duplicated images
under new ids), the vectorised scoring of many resamples against a plain per-resample loop (bit for bit), the paired
bootstrap's CIs and determinism, and the detections file format.

Worlds are random COCO ground truth built in memory, with images without ground truth, crowd boxes, a
category with ground truth but no detections, one with detections but no ground truth, and an image with
more than 100 detections of one category (pycocotools keeps the top 100).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detrq.evaluation.bootstrap import (ImageEval, image_eval, load_detections, paired_bootstrap, resample_weights,
                                        save_detections, weighted_ap, weighted_aps)
from detrq.io.errors import DetrqError

torch.set_num_threads(1)

CATS = [1, 3, 4, 8, 11]
NO_DETS_CAT, NO_GT_CAT = 4, 11  # ground truth but never detected; detected but no ground truth


def make_coco(images: list[dict], annotations: list[dict]) -> COCO:
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": c, "name": f"c{c}"} for c in CATS]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def make_world(seed: int, n_images: int = 30, *, tie_scores: bool = False,
               noise: float = 4.0) -> tuple[COCO, list[int], list[dict[str, Any]]]:
    """Random ground truth and detections; image ids are neither consecutive nor in order in the file."""
    rng = np.random.default_rng(seed)
    ids = [int(i) for i in rng.choice(np.arange(1, 10 * n_images), size=n_images, replace=False)]
    images = [{"id": i, "width": 160, "height": 160, "file_name": f"{i}.png"} for i in ids]
    gt_cats = [c for c in CATS if c != NO_GT_CAT]
    annotations, dets = [], []
    for k, img in enumerate(ids):
        n_gt = 0 if k % 5 == 0 else int(rng.integers(1, 6))
        for _ in range(n_gt):
            x, y = rng.uniform(0, 100, 2)
            w, h = rng.uniform(5, 50, 2)
            cat = int(rng.choice(gt_cats))
            annotations.append({"id": len(annotations) + 1, "image_id": img, "category_id": cat,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(rng.random() < 0.08)})
            if cat != NO_DETS_CAT and rng.random() < 0.8:
                box = [x + rng.normal(0, noise), y + rng.normal(0, noise), w * rng.uniform(0.8, 1.2),
                       h * rng.uniform(0.8, 1.2)]
                dets.append({"image_id": img, "category_id": cat, "bbox": box, "score": float(rng.random())})
        for _ in range(int(rng.integers(0, 6))):  # false positives, some of the no-ground-truth category
            cat = int(rng.choice([1, 3, 8, NO_GT_CAT]))
            box = [*rng.uniform(0, 120, 2), *rng.uniform(5, 40, 2)]
            dets.append({"image_id": img, "category_id": cat, "bbox": box, "score": float(rng.random() * 0.7)})
    crowded = ids[1]
    for _ in range(130):  # > maxDets 100 of one category in one image
        box = [*rng.uniform(0, 120, 2), *rng.uniform(5, 40, 2)]
        dets.append({"image_id": crowded, "category_id": 1, "bbox": box, "score": float(rng.random())})
    if tie_scores:
        for d in dets:
            d["score"] = round(d["score"], 1)
    return make_coco(images, annotations), ids, dets


def pycoco_ap(coco_gt: COCO, dets: list[dict[str, Any]], image_ids: list[int]) -> float:
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco_gt, coco_gt.loadRes([dict(d) for d in dets]), iouType="bbox")
        ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


def duplicated(coco_gt: COCO, dets: list[dict[str, Any]], image_ids: np.ndarray,
               weights: np.ndarray) -> tuple[COCO, list[int], list[dict[str, Any]]]:
    """The dataset in which image ``image_ids[k]`` appears ``weights[k]`` times, under consecutive new ids."""
    images, annotations, new_dets, new_ids = [], [], [], []
    for img, m in zip(image_ids.tolist(), weights.tolist()):
        for _ in range(m):
            new = len(new_ids) + 1
            new_ids.append(new)
            images.append({**coco_gt.imgs[img], "id": new})
            for a in coco_gt.imgToAnns[img]:
                annotations.append({**a, "id": len(annotations) + 1, "image_id": new, "bbox": list(a["bbox"])})
            new_dets += [{**d, "image_id": new} for d in dets if d["image_id"] == img]
    return make_coco(images, annotations), new_ids, new_dets


@pytest.mark.parametrize("seed,tie_scores", [(0, False), (1, False), (2, True), (3, True)])
def test_unit_weights_equal_pycocotools(seed: int, tie_scores: bool) -> None:
    coco_gt, ids, dets = make_world(seed, tie_scores=tie_scores)
    ev = image_eval(coco_gt, dets, ids)
    assert list(ev.image_ids) == sorted(ids)
    assert weighted_ap(ev) == pytest.approx(pycoco_ap(coco_gt, dets, ids), abs=1e-12)
    # A subset of the images (some without ground truth): zero weights equal evaluating the subset.
    subset = sorted(ids)[::3]
    w = np.isin(ev.image_ids, subset).astype(np.int64)
    assert weighted_ap(ev, w) == pytest.approx(pycoco_ap(coco_gt, dets, subset), abs=1e-12)


def test_edge_cases_equal_pycocotools() -> None:
    coco_gt, ids, dets = make_world(4)
    # Only the no-ground-truth category detected: every category with ground truth scores 0.
    only_fp = [d for d in dets if d["category_id"] == NO_GT_CAT]
    assert weighted_ap(image_eval(coco_gt, only_fp, ids)) == pytest.approx(pycoco_ap(coco_gt, only_fp, ids), abs=1e-12)
    # No detections at all.
    assert weighted_ap(image_eval(coco_gt, [], ids)) == 0.0
    # Images without ground truth only: AP is undefined (pycocotools gives -1).
    no_gt = [i for i in ids if not coco_gt.imgToAnns[i]]
    assert np.isnan(weighted_ap(image_eval(coco_gt, dets, no_gt)))
    with pytest.raises(DetrqError, match="duplicates"):
        image_eval(coco_gt, dets, [ids[0], ids[0]])


@pytest.mark.parametrize("seed", [5, 6])
def test_weights_equal_pycocotools_on_duplicated_images(seed: int) -> None:
    # Scores are continuous, so no two detections tie except an image's copies of the same detection: then the
    # duplicated dataset's ranking has those copies adjacent, which is what the weighted sums compute, and the
    # two agree to rounding. (With scores tied across images pycocotools' order depends on the image numbering.)
    coco_gt, ids, dets = make_world(seed, n_images=24)
    ev = image_eval(coco_gt, dets, ids)
    rng = np.random.default_rng(seed)
    twos = np.ones(len(ids), dtype=np.int64)
    twos[rng.choice(len(ids), 8, replace=False)] = 2
    for w in (twos, resample_weights(len(ids), 1, seed)[0]):
        assert w.max() >= 2
        dup_gt, dup_ids, dup_dets = duplicated(coco_gt, dets, ev.image_ids, w)
        assert weighted_ap(ev, w) == pytest.approx(pycoco_ap(dup_gt, dup_dets, dup_ids), abs=1e-12)


def loop_ap(ev: ImageEval, w: np.ndarray) -> float:
    """pycocotools' ``accumulate`` arithmetic for one weight vector, written plainly: cumulative sums over all ranked
    detections, one ``searchsorted`` per IoU threshold, the mean of the stacked precisions. ``weighted_aps`` must
    give the same floats, bit for bit."""
    w = np.asarray(w, dtype=np.float64)
    precisions = []
    for cat in ev.categories:
        npig = float(cat.gt_count @ w)
        if npig == 0:
            continue
        q = np.zeros((len(ev.iou_thrs), len(ev.rec_thrs)))
        if cat.scores.size:
            wd = w[cat.image_index]
            tp = np.cumsum(cat.tp * wd, axis=1)
            fp = np.cumsum(cat.fp * wd, axis=1)
            rc = tp / npig
            pr = tp / (fp + tp + np.spacing(1))
            pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
            for t in range(len(ev.iou_thrs)):
                inds = np.searchsorted(rc[t], ev.rec_thrs, side="left")
                ok = inds < pr.shape[1]
                q[t, ok] = pr[t, inds[ok]]
        precisions.append(q)
    return float(np.mean(np.stack(precisions, axis=2))) if precisions else float("nan")


@pytest.mark.parametrize("seed,tie_scores", [(5, False), (2, True)])
def test_weighted_aps_equal_loop_for_any_chunk(seed: int, tie_scores: bool) -> None:
    coco_gt, ids, dets = make_world(seed, n_images=24, tie_scores=tie_scores)
    ev = image_eval(coco_gt, dets, ids)
    assert any((~(c.tp | c.fp)).any() for c in ev.categories)  # crowd-matched (ignored) detections are covered
    n = len(ids)
    rng = np.random.default_rng(seed)
    gt = np.stack([c.gt_count for c in ev.categories], axis=1)  # (N, K) ground truth that counts
    absent = (gt[:, 0] == 0).astype(np.int64) * rng.integers(1, 4, n)  # category 0's images weigh 0
    weights = np.vstack([resample_weights(n, 30, seed), np.ones(n, np.int64), (np.arange(n) % 3 == 0),
                         absent, (gt.sum(axis=1) == 0)])  # last row: only images without ground truth
    expected = np.array([loop_ap(ev, w) for w in weights])
    assert np.isnan(expected[-1]) and not np.isnan(expected[:-1]).any()
    for chunk in (1, 4, 7, 100):
        assert np.array_equal(weighted_aps(ev, weights, chunk=chunk), expected, equal_nan=True)
    assert np.array_equal([weighted_ap(ev, w) for w in weights], expected, equal_nan=True)
    assert weighted_aps(ev, np.zeros((0, n))).shape == (0,)
    for bad in (-weights[:2], weights[:2] + 0.5):
        with pytest.raises(DetrqError, match="non-negative integers"):
            weighted_aps(ev, bad)
    with pytest.raises(DetrqError, match="shape"):
        weighted_aps(ev, weights[:, 1:])


def test_absent_category_dropped_as_pycocotools() -> None:
    # A resample that draws none of a category's ground truth: pycocotools leaves that category's precision at -1
    # and leaves it out of the mean; so does weighted_aps, whichever categories of the row are absent.
    coco_gt, ids, dets = make_world(11, n_images=24)
    ev = image_eval(coco_gt, dets, ids)
    rng = np.random.default_rng(11)
    gt = np.stack([c.gt_count for c in ev.categories], axis=1)
    rows = []
    for k in range(len(ev.categories)):
        if gt[:, k].any():
            rows.append((gt[:, k] == 0) * rng.integers(1, 3, len(ids)))
    weights = np.stack(rows)
    aps = weighted_aps(ev, weights, chunk=2)
    for w, ap in zip(weights, aps):
        assert (gt.T @ w == 0).any()
        assert ap == loop_ap(ev, w)
        dup_gt, dup_ids, dup_dets = duplicated(coco_gt, dets, ev.image_ids, w)
        assert ap == pytest.approx(pycoco_ap(dup_gt, dup_dets, dup_ids), abs=1e-12)


def test_paired_bootstrap() -> None:
    coco_gt, ids, good = make_world(7, n_images=40, noise=1.0)
    rng = np.random.default_rng(0)
    bad = [{**d, "bbox": [v + rng.normal(0, 6.0) for v in d["bbox"]]} for d in good]
    sets = {"good": good, "same": [dict(d) for d in good], "bad": bad}
    pairs = [("good", "same"), ("good", "bad"), ("bad", "good")]
    res = paired_bootstrap(coco_gt, ids, sets, pairs, n_boot=200, seed=3, progress=False)

    same = res["good|same"]
    assert same["delta"] == 0 and same["low"] == 0 and same["high"] == 0 and same["se"] == 0
    assert same["p_le_0"] == 1.0

    better = res["good|bad"]
    ap_good, ap_bad = pycoco_ap(coco_gt, good, ids), pycoco_ap(coco_gt, bad, ids)
    assert better["delta"] == pytest.approx(ap_good - ap_bad, abs=1e-12)
    assert 0 < better["low"] < better["delta"] < better["high"] and better["p_le_0"] == 0.0
    assert res["bad|good"]["low"] == pytest.approx(-better["high"]) and res["bad|good"]["p_le_0"] == 1.0
    assert {k: better[k] for k in ("n_boot", "seed", "level", "n_images")} == {"n_boot": 200, "seed": 3,
                                                                               "level": 0.95, "n_images": 40}
    labels = res["labels"]
    assert labels["good"]["ap"] == pytest.approx(ap_good, abs=1e-12)
    assert labels["good"]["low"] < ap_good < labels["good"]["high"]

    again = paired_bootstrap(coco_gt, ids, sets, pairs, n_boot=200, seed=3, progress=False)
    assert again == res
    # Labels scored side by side in two worker processes: the same numbers, to the last bit.
    assert paired_bootstrap(coco_gt, ids, sets, pairs, n_boot=200, seed=3, progress=False, workers=2) == res
    other = paired_bootstrap(coco_gt, ids, sets, pairs[1:2], n_boot=200, seed=4, progress=False)
    assert other["good|bad"]["delta"] == better["delta"] and other["good|bad"]["low"] != better["low"]

    with pytest.raises(DetrqError, match="'nope', which has no detections"):
        paired_bootstrap(coco_gt, ids, sets, [("good", "nope")], n_boot=2, progress=False)


def test_detections_file_round_trip(tmp_path: Path) -> None:
    _, _, dets = make_world(8, n_images=10)
    dets[0]["score"] = 0.1 + 0.2  # not representable in float32
    path = save_detections(tmp_path / "sub" / "dets.npz", dets)
    back = load_detections(path)
    assert back == dets
    assert all(type(d["image_id"]) is int and type(d["score"]) is float for d in back)
    assert load_detections(save_detections(tmp_path / "empty.npz", [])) == []
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["dets.npz"]  # no temp file left

    with pytest.raises(DetrqError, match="detections file not found"):
        load_detections(tmp_path / "missing.npz")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DetrqError, match=r"corrupt detections file .*corrupt\.npz"):
        load_detections(corrupt)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, image_id=np.zeros(3, np.int64))
    with pytest.raises(DetrqError, match="corrupt detections file"):
        load_detections(wrong)
    with pytest.raises(DetrqError, match="cannot save detections"):
        save_detections(tmp_path / "bad.npz", [{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3], "score": 0.5}])
    assert not (tmp_path / "bad.npz").exists()
