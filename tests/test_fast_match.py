"""``fast_match.FastCOCOeval`` against stock pycocotools: the same ``evalImgs`` (every key, value, dtype and order),
``eval`` and ``stats``, bit for bit, on detection sets built to hit every rule of pycocotools' greedy matching
(crowd ground truth, ties in IoU and in score, areas on the range bounds, maxDets cuts, empty sets, subsets)."""

import contextlib
import io
from typing import Any

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detrq.evaluation.evaluate import load_results, restrict_to_ap
from detrq.evaluation.fast_match import FastCOCOeval

KEYS = ("image_id", "category_id", "aRng", "maxDet", "dtIds", "gtIds", "dtMatches", "gtMatches", "dtScores",
        "gtIgnore", "dtIgnore")


def _world(seed: int, n_images: int = 40, n_cats: int = 4) -> tuple[COCO, list[dict[str, Any]]]:
    """Ground truth with crowd boxes, duplicated boxes and areas exactly on 32^2 and 96^2, and detections that
    copy or shift them with tied scores, plus false positives, tiny boxes and one image over 100 detections."""
    rng = np.random.default_rng(seed)
    images = [{"id": i, "width": 300, "height": 300} for i in range(1, n_images + 1)]
    anns = []
    for image in images:
        for _ in range(int(rng.integers(0, 7))):
            w, h = rng.uniform(3, 140, 2)
            box = [float(rng.uniform(0, 300 - w)), float(rng.uniform(0, 300 - h)), float(w), float(h)]
            area = float(rng.choice([w * h, w * h, w * h, 32.0 ** 2, 96.0 ** 2]))
            ann = {"image_id": image["id"], "category_id": int(rng.integers(1, n_cats + 1)), "bbox": box,
                   "area": area, "iscrowd": int(rng.random() < 0.15)}
            anns.append(ann)
            if rng.random() < 0.15:  # the same box twice: ties in IoU between ground truths
                anns.append(dict(ann, iscrowd=int(rng.random() < 0.3)))
    for k, ann in enumerate(anns):
        ann["id"] = k + 1
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns,
                  "categories": [{"id": c, "name": f"c{c}"} for c in range(1, n_cats + 1)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    dets = []
    for ann in anns:
        x, y, w, h = ann["bbox"]
        for _ in range(int(rng.integers(0, 4))):
            shift = float(rng.choice([0.0, 0.0, 1.0, 3.0, 8.0, 30.0]))
            dets.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                         "bbox": [x + shift, y, w, h], "score": float(rng.choice([0.25, 0.5, 0.9]))})
    for image in images:
        for _ in range(int(rng.integers(0, 5))):
            w, h = rng.uniform(0.5, 120, 2)
            dets.append({"image_id": image["id"], "category_id": int(rng.integers(1, n_cats + 1)),
                         "bbox": [float(rng.uniform(0, 250)), float(rng.uniform(0, 250)), float(w), float(h)],
                         "score": round(float(rng.random()), 2)})
    crowded = anns[0]
    dets += [{"image_id": crowded["image_id"], "category_id": crowded["category_id"],
              "bbox": [crowded["bbox"][0] + k % 5, crowded["bbox"][1], crowded["bbox"][2], crowded["bbox"][3]],
              "score": round(float(rng.random()), 1)} for k in range(130)]  # past maxDets 100, with ties
    return gt, [dets[i] for i in rng.permutation(len(dets))]


def _run(cls: type[COCOeval], gt: COCO, dets: list[dict[str, Any]], ids: list[int], ap_only: bool) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        ev = cls(gt, load_results(gt, dets), iouType="bbox")
        ev.params.imgIds = ids
        if ap_only:
            restrict_to_ap(ev)
        ev.evaluate()
        ev.accumulate()
        if not ap_only:  # summarize reads the area ranges and maxDets that restrict_to_ap removes
            ev.summarize()
    return ev


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _differences(stock: COCOeval, fast: COCOeval) -> list[str]:
    if len(stock.evalImgs) != len(fast.evalImgs):
        return ["evalImgs length"]
    out = []
    for n, (s, f) in enumerate(zip(stock.evalImgs, fast.evalImgs)):
        if s is None or f is None:
            out += [] if s is f else [f"evalImgs[{n}] None"]
        elif set(s) != set(KEYS) or set(f) != set(KEYS):
            out.append(f"evalImgs[{n}] keys")
        else:
            out += [f"evalImgs[{n}][{k}]" for k in KEYS if not _same(s[k], f[k])]
    out += [f"eval[{k}]" for k in ("precision", "recall", "scores") if not _same(stock.eval[k], fast.eval[k])]
    out += [] if list(getattr(stock, "stats", [])) == list(getattr(fast, "stats", [])) else ["stats"]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ap_only", [False, True])
def test_the_same_evalimgs_eval_and_stats_as_pycocotools(seed, ap_only):
    gt, dets = _world(seed)
    ids = sorted(gt.getImgIds())
    cases = {"all images": (dets, ids), "odd images": (dets, ids[1::2]), "one image": (dets, ids[3:4]),
             "no detections": ([], ids)}
    for name, (d, i) in cases.items():
        stock, fast = _run(COCOeval, gt, d, i, ap_only), _run(FastCOCOeval, gt, d, i, ap_only)
        assert _differences(stock, fast) == [], name
    # The world reaches the rules that a simpler matching would get wrong: matches to ignored (crowd or
    # out-of-range) ground truth, and a detection list cut at maxDets.
    stock = _run(COCOeval, gt, dets, ids, ap_only)
    assert sum(int(np.count_nonzero(e["dtIgnore"] & (e["dtMatches"] > 0))) for e in stock.evalImgs if e) > 0
    assert max(len(e["dtIds"]) for e in stock.evalImgs if e) == 100


def test_the_comparison_sees_one_changed_match():
    gt, dets = _world(0)
    ids = sorted(gt.getImgIds())
    stock, fast = _run(COCOeval, gt, dets, ids, True), _run(FastCOCOeval, gt, dets, ids, True)
    first = next(n for n, e in enumerate(fast.evalImgs) if e is not None and e["dtIds"])
    fast.evalImgs[first] = dict(fast.evalImgs[first], dtMatches=fast.evalImgs[first]["dtMatches"] + 1)
    assert _differences(stock, fast) == [f"evalImgs[{first}][dtMatches]"]
