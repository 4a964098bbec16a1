"""Seeded fuzzing of the input checks: random harmful mutations of a COCO annotation file (and its images) and of
a traces file. No traceback may escape, and no mutated input may be accepted without an error or a warning; what
is accepted with a warning must then load and evaluate."""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from test_bad_inputs import subset_coco, traces_file

from detrq import cli
from detrq.data.coco import CocoDetection, EvalTransform
from detrq.evaluation.evaluate import coco_metrics
from detrq.io.errors import DetrqError
from detrq.io.results import read_json
from detrq.models.detr import build_detr
from detrq.quant.bitmaps import quantizable_layers
from detrq.sensitivity.trace_checks import check_traces

torch.set_num_threads(1)
COCO_CASES = 300
TRACES_CASES = 200

JUNK = [None, "1", "", 1.5, True, -1, 0, math.nan, math.inf, [], {}, [1, 2], 10**12]
IMAGE_JUNK = {
    "id": [None, "1", 1.5, True, "dup"],
    "file_name": [None, 5, "", "missing.png", "other"],
    "width": [0, -1, "128", 128.5, None, True, 64, 256],
    "height": [0, -1, "128", 128.5, None, False, 100, 129],
}
ANN_JUNK = {
    "id": [None, "x", 1.5, "dup"],
    "image_id": [None, "1", 999, 1.5],
    "category_id": [None, "1", 999, 0, 11],
    "bbox": ["x", None, [1, 2, 3], [1, 2, 3, "4"], [math.nan, 0, 5, 5], [0, 0, math.inf, 5], [0, 0, -1, 5],
             [0, 0, 0, 5], [1000, 1000, 5, 5], [-50, -50, 60, 60], [120, 0, 20, 20], [True, 0, 5, 5]],
    "area": [None, "x", -1, math.nan, math.inf],
    "iscrowd": [2, "0", None, -1, 0.5],
}
BBOX_ITEM_JUNK = ["1", None, math.nan, math.inf, -math.inf, True, [], 10**9, -10**9]


def _mutate_coco(data: dict, root: Path, rng: random.Random) -> str:
    """One harmful mutation, in place (the JSON) or on disk (an image); returns its name."""
    images, anns, cats = data["images"], data["annotations"], data["categories"]
    kind = rng.choice(["top", "image", "ann", "bbox_item", "cat", "drop_image", "unannotated", "dup_image",
                       "dup_ann", "image_file", "delete_field"])
    if kind == "top":
        data[rng.choice(["images", "annotations", "categories"])] = rng.choice([None, {}, "x", 3])
    elif kind == "image":
        im, field = rng.choice(images), rng.choice(list(IMAGE_JUNK))
        value = rng.choice(IMAGE_JUNK[field])
        others = [i for i in images if i is not im]
        im[field] = ({"dup": others[0]["id"], "other": others[0]["file_name"]}.get(value, value)
                     if isinstance(value, str) and others else value)
    elif kind == "ann":
        a, field = rng.choice(anns), rng.choice(list(ANN_JUNK))
        value = copy.deepcopy(rng.choice(ANN_JUNK[field]))
        a[field] = next(x["id"] for x in anns if x is not a) if value == "dup" else value
    elif kind == "bbox_item":
        a = rng.choice(anns)
        a["bbox"][rng.randrange(4)] = rng.choice(BBOX_ITEM_JUNK)
    elif kind == "cat":
        c = rng.choice(cats)
        c["id"] = rng.choice([None, "1", 1.5, next(x["id"] for x in cats if x is not c)])
    elif kind == "drop_image":
        images.remove(rng.choice([im for im in images if any(a["image_id"] == im["id"] for a in anns)]))
    elif kind == "unannotated":
        iid = rng.choice(images)["id"]
        data["annotations"] = [a for a in anns if a["image_id"] != iid]
    elif kind == "dup_image":
        images.append(copy.deepcopy(rng.choice(images)))
    elif kind == "dup_ann":
        anns.append(copy.deepcopy(rng.choice(anns)))
    elif kind == "image_file":
        path = root / "val" / rng.choice(images)["file_name"]
        if path.is_file():
            how = rng.choice(["truncate", "garbage", "delete"])
            if how == "delete":
                path.unlink()
            else:
                raw = path.read_bytes()
                path.write_bytes(raw[: rng.randrange(8, len(raw) - 16)] if how == "truncate"
                                 else raw[:8] + rng.randbytes(len(raw) - 8))
        else:
            images[0]["file_name"] = "missing.png"
    else:  # a required field of an entry, deleted
        entries, fields = rng.choice([(images, ["id", "file_name", "width", "height"]),
                                      (anns, ["id", "image_id", "category_id", "bbox", "area"]),
                                      (cats, ["id"])])
        rng.choice(entries).pop(rng.choice(fields), None)
    return kind


def _canonical(data: dict) -> str:
    """The content of an annotation file regardless of the order of its entries."""
    return json.dumps({k: sorted(json.dumps(e, sort_keys=True) for e in v) if isinstance(v, list) else v
                       for k, v in data.items()}, sort_keys=True)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return subset_coco(tmp_path_factory.mktemp("fuzz") / "coco")


def test_fuzz_coco_annotations_and_images(pristine, tmp_path, capsys):
    rng = random.Random(20240515)
    base = json.loads((pristine / "annotations" / "instances_val.json").read_text())
    seen = {"error": 0, "warning": 0}
    for case in range(COCO_CASES):
        root = tmp_path / f"c{case}"
        shutil.copytree(pristine, root)
        data = copy.deepcopy(base)
        kinds = []
        for _ in range(rng.choice([1, 1, 2, 3])):
            try:
                kinds.append(_mutate_coco(data, root, rng))
            except (AttributeError, TypeError, KeyError, IndexError, StopIteration):
                break  # an earlier mutation broke the structure this one needs: that one is harmful already
        text = json.dumps(data)
        if rng.random() < 0.05:
            text = text[: rng.randrange(1, len(text))]
            kinds.append("truncated")
        if "truncated" not in kinds and "image_file" not in kinds and _canonical(data) == _canonical(base):
            continue  # the mutations undid each other (a duplicate added, then the original dropped)
        (root / "annotations" / "instances_val.json").write_text(text)
        status = cli.main(["check-data", "--coco", str(root), "--split", "val", "--preset", "mini"])
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err, (case, kinds, captured.err)
        assert status in (0, 2), (case, kinds, captured.err)
        errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
        if status == 2:
            assert len(errors) == 1, (case, kinds, captured.err)
            seen["error"] += 1
            continue
        assert "warning: " in captured.err, (case, kinds, "accepted without an error or a warning")
        seen["warning"] += 1
        # What is accepted with a warning loads and evaluates.
        dataset = CocoDetection(root, "val", EvalTransform(128, 128), num_classes=11)
        for i in range(len(dataset)):
            dataset[i]
        gt = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
              for a in dataset.coco.dataset["annotations"]]
        coco_metrics(dataset.coco, gt, dataset.ids)
        capsys.readouterr()
        shutil.rmtree(root)
    assert seen["error"] > COCO_CASES // 2 and seen["warning"] > 10, seen


def _mutate_traces(data: dict, layers: dict, rng: random.Random) -> str:
    names = list(data["layers"])
    kind = rng.choice(["field", "scale", "delete", "rename", "metric", "layers", "samples"])
    entry = data["layers"][rng.choice(names)]
    if kind == "field":
        field = rng.choice(["trace", "avg_trace", "stderr", "n_probes", "numel", "samples"])
        entry[field] = rng.choice([j for j in JUNK if not (field == "stderr" and j == 0)
                                   and not (field == "samples" and j == [])])
    elif kind == "scale":
        field = rng.choice(["trace", "avg_trace", "stderr", "numel", "n_probes"])
        entry[field] = entry[field] * rng.choice([2, 3]) if field in ("numel", "n_probes") \
            else entry[field] * rng.choice([1.01, -1.0, 2.0, 1e6])
    elif kind == "delete":
        entry.pop(rng.choice(["trace", "avg_trace", "stderr", "n_probes", "numel"]))
    elif kind == "rename":
        data["layers"][rng.choice(["nope.weight", "backbone.0.body.conv1.bias", ""])] = data["layers"].pop(names[0])
    elif kind == "metric":
        data.pop("metric") if rng.random() < 0.5 else data.update(metric=rng.choice(["nope", None, 3, "Loss"]))
    elif kind == "layers":
        data["layers"] = rng.choice([None, [], {}, "x"])
    else:
        samples = entry["samples"]
        rng.choice([lambda: samples.append(1.0), samples.pop,
                    lambda: samples.__setitem__(0, samples[0] + 1.0),
                    lambda: samples.__setitem__(0, rng.choice(["x", None, math.nan]))])()
    return kind


def test_fuzz_traces_files(tmp_path):
    layers = quantizable_layers(build_detr("mini"))
    base = traces_file(layers)
    check_traces(copy.deepcopy(base), "pristine", layers)  # the unmutated file passes
    rng = random.Random(7)
    path = tmp_path / "traces.json"
    for case in range(TRACES_CASES):
        data = copy.deepcopy(base)
        kinds = []
        for _ in range(rng.choice([1, 1, 2])):
            try:
                kinds.append(_mutate_traces(data, layers, rng))
            except (AttributeError, TypeError, KeyError, IndexError):
                break  # an earlier mutation broke the structure this one needs: that one is harmful already
        text = json.dumps(data)
        if rng.random() < 0.05:
            text = text[: rng.randrange(1, len(text))]
        path.write_text(text)
        with pytest.raises(DetrqError) as info:
            check_traces(read_json(path), str(path), layers)
        assert "\n" not in str(info.value), (case, kinds)
