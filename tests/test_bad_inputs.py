"""Bad input, one kind per case: a user's own COCO data, checkpoints, traces, bit maps and parameter files.

Each case mutates a copy of 4 synthetic val images (never data/synthetic itself) or one project file, runs the
command line in-process, and asserts the exit status, the one ``error:`` line (or the ``warning:`` line of a
soft problem) and that the earlier results in the results folder are byte-identical afterwards.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detrq import cli
from detrq.data.coco import CocoDetection, EvalTransform
from detrq.io.errors import DetrqError
from detrq.io.paths import PROJECT_ROOT
from detrq.models.detr import build_detr
from detrq.quant.bitmaps import quantizable_layers
from detrq.sensitivity.estimates import TraceEstimate

torch.set_num_threads(1)
SOURCE = PROJECT_ROOT / "data" / "synthetic"
CHECKPOINT = PROJECT_ROOT / "checkpoints" / "detr_mini.pth"
N_IMAGES = 4


def subset_coco(dest: Path, n: int = N_IMAGES, split: str = "val") -> Path:
    """A COCO root at ``dest`` with the first ``n`` images of the synthetic ``split`` and their annotations."""
    data = json.loads((SOURCE / "annotations" / f"instances_{split}.json").read_text())
    images = sorted(data["images"], key=lambda im: im["id"])[:n]
    ids = {im["id"] for im in images}
    (dest / "annotations").mkdir(parents=True)
    (dest / split).mkdir()
    for im in images:
        shutil.copy(SOURCE / split / im["file_name"], dest / split / im["file_name"])
    data = {**data, "images": images, "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}
    (dest / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return dest


def traces_file(layers: dict, metric: str = "out-float", seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    entries = {n: TraceEstimate.from_samples([float(x) for x in rng.uniform(0.5, 1.5, 4)], w.numel()).to_dict()
               for n, w in layers.items()}
    return {"cache_key": "earlier", "metric": metric, "estimator": "hutchinson", "layers": entries}


@pytest.fixture(scope="module")
def layers():
    return quantizable_layers(build_detr("mini"))


@pytest.fixture
def world(tmp_path, layers):
    """A fresh copy of the 4-image data set and a results folder holding earlier results."""
    subset_coco(tmp_path / "coco")
    results = tmp_path / "results"
    results.mkdir()
    (results / "eval.json").write_text('{"earlier": "evaluation"}\n')
    (results / "traces.json").write_text(json.dumps(traces_file(layers)))
    (results / "bitmap.json").write_text(json.dumps({"bit_map": {n: 6 for n in layers}}))
    return tmp_path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != ".lock"}


def annotations(root: Path) -> tuple[Path, dict]:
    path = root / "coco" / "annotations" / "instances_val.json"
    return path, json.loads(path.read_text())


def edit_annotations(fn):
    def mutate(root: Path) -> None:
        path, data = annotations(root)
        fn(data)
        path.write_text(json.dumps(data))
    return mutate


def first_image(root: Path) -> Path:
    _, data = annotations(root)
    return root / "coco" / "val" / data["images"][0]["file_name"]


def _truncate_png(root: Path) -> None:
    path = first_image(root)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _resize_image(root: Path) -> None:
    path = first_image(root)
    Image.open(path).convert("RGB").resize((64, 64)).save(path)


def _malicious(root: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (Path.write_text, (root / "PWNED", "code ran"))
    (root / "model.pth").write_bytes(pickle.dumps(Payload()))


def _safetensors_file(root: Path) -> None:
    from safetensors.torch import save_file

    save_file(torch.load(CHECKPOINT, weights_only=True)["model"], root / "model.safetensors")


def _wrong_architecture(root: Path) -> None:
    torch.save({"model": build_detr("tiny").state_dict()}, root / "model.pth")


def _traces(fn):
    def mutate(root: Path) -> None:
        path = root / "results" / "traces.json"
        data = json.loads(path.read_text())
        fn(data)
        (root / "in_traces.json").write_text(json.dumps(data))
    return mutate


def _first_layer(data: dict) -> dict:
    return next(iter(data["layers"].values()))


EVAL = ["evaluate", "--quiet", "--checkpoint", "{ckpt}", "--coco", "{root}/coco", "--out", "{root}/results/eval.json"]
ALLOCATE = ["allocate", "--traces", "{root}/in_traces.json", "--checkpoint", "{ckpt}", "--avg-bits", "5",
            "--out", "{root}/results/bitmap.json"]
NOTEBOOKS = ["notebooks", "--params", "{root}/params.yaml", "--set", "results_dir={root}/results"]

# (id, mutation of the world, command, exit status, text the one error line contains)
CASES = [
    # checkpoints
    ("checkpoint-missing", None, EVAL, 2, "checkpoint not found"),
    ("checkpoint-random-bytes", lambda r: (r / "model.pth").write_bytes(np.random.default_rng(0).bytes(4096)),
     EVAL, 2, "neither a zip archive nor a pickle"),
    ("checkpoint-safetensors-file", _safetensors_file,
     [a.replace("{ckpt}", "{root}/model.safetensors") for a in EVAL], 2, "bare safetensors file"),
    ("checkpoint-malicious-pickle", _malicious, EVAL, 2, "not a plain-tensor checkpoint"),
    ("checkpoint-wrong-architecture", _wrong_architecture, EVAL, 2, "checkpoint"),
    # the COCO annotation file and images: hard errors
    ("annotations-truncated-json", lambda r: annotations(r)[0].write_text(annotations(r)[0].read_text()[:500]),
     EVAL, 2, "corrupt JSON"),
    ("annotations-not-instances", edit_annotations(lambda d: d.pop("annotations")), EVAL, 2,
     "'annotations' missing or not a list"),
    ("image-file-missing", lambda r: first_image(r).unlink(), EVAL, 2, "image file not found: 1x"),
    ("image-corrupt-png", _truncate_png, EVAL, 2, "cannot be decoded"),
    ("image-size-mismatch", _resize_image, EVAL, 2, "differs from the recorded width/height"),
    ("image-duplicated-entry", edit_annotations(lambda d: d["images"].append(dict(d["images"][0]))), EVAL, 2,
     "image id missing, not an integer, or used twice"),
    ("image-bad-width", edit_annotations(lambda d: d["images"][1].update(width="128")), EVAL, 2,
     "width/height missing or not a positive integer"),
    ("bbox-string", edit_annotations(lambda d: d["annotations"][0].update(bbox=["1", 2, 3, 4])), EVAL, 2,
     "bbox is not a list of 4 finite numbers"),
    ("bbox-negative-width", edit_annotations(lambda d: d["annotations"][0]["bbox"].__setitem__(2, -5.0)), EVAL, 2,
     "bbox width or height is negative"),
    ("bbox-outside-image", edit_annotations(lambda d: d["annotations"][0].update(bbox=[500, 500, 10, 10])), EVAL,
     2, "lies entirely outside its image"),
    ("category-unknown", edit_annotations(lambda d: d["annotations"][0].update(category_id=77)), EVAL, 2,
     "category_id is not in 'categories'"),
    ("category-outside-model", edit_annotations(
        lambda d: (d["categories"].append({"id": 40, "name": "x"}), d["annotations"][0].update(category_id=40))),
     EVAL, 2, "outside the model's classes"),
    ("category-duplicate-id", edit_annotations(lambda d: d["categories"].append(dict(d["categories"][0]))), EVAL,
     2, "category id missing, not an integer, or used twice"),
    ("annotation-duplicate-id", edit_annotations(lambda d: d["annotations"][1].update(id=d["annotations"][0]["id"])),
     EVAL, 2, "annotation id missing, not an integer, or used twice"),
    ("annotation-unknown-image", edit_annotations(lambda d: d["annotations"][0].update(image_id=999)), EVAL, 2,
     "image_id is not an image"),
    ("annotation-no-area", edit_annotations(lambda d: d["annotations"][0].pop("area")), EVAL, 2, "area missing"),
    ("annotation-bad-iscrowd", edit_annotations(lambda d: d["annotations"][0].update(iscrowd=2)), EVAL, 2,
     "iscrowd is not 0 or 1"),
    ("check-data-bbox-string", edit_annotations(lambda d: d["annotations"][0].update(bbox="big")),
     ["check-data", "--coco", "{root}/coco", "--split", "val"], 2, "bbox is not a list of 4 finite numbers"),
    # traces files and the ILP
    ("budget-infeasible", _traces(lambda d: None), [*ALLOCATE[:-4], "--avg-bits", "2.5", *ALLOCATE[-2:]], 2,
     "smallest feasible average"),
    ("bits-range-inverted", _traces(lambda d: None), [*ALLOCATE, "--bits", "6-3"], 2, "must satisfy"),
    ("traces-truncated-json", lambda r: (r / "in_traces.json").write_text((r / "results/traces.json").read_text()[:99]),
     ALLOCATE, 2, "corrupt JSON"),
    ("traces-nan-avg-trace", _traces(lambda d: _first_layer(d).update(avg_trace=math.nan)), ALLOCATE, 2,
     "avg_trace nan"),
    ("traces-inconsistent-avg-trace", _traces(lambda d: _first_layer(d).update(avg_trace=1.0)), ALLOCATE, 2,
     "is not trace / numel"),
    ("traces-trace-not-sample-mean", _traces(lambda d: _first_layer(d).update(
        trace=_first_layer(d)["trace"] * 2, avg_trace=_first_layer(d)["avg_trace"] * 2)),
     ALLOCATE, 2, "is not the mean of its samples"),
    ("traces-unknown-layer", _traces(lambda d: d["layers"].__setitem__("backbone.nope.weight", _first_layer(d))),
     ALLOCATE, 2, "not quantizable layers of this model"),
    ("traces-numel-mismatch", _traces(lambda d: _first_layer(d).update(
        numel=7, avg_trace=_first_layer(d)["trace"] / 7)),
     ALLOCATE, 2, "numel 7 but the model's layer has"),
    ("traces-no-layers", _traces(lambda d: d.pop("layers")), ALLOCATE, 2, "is not a traces file"),
    # bit maps
    ("bitmap-unknown-layer", lambda r: (r / "map.json").write_text('{"bit_map": {"class_embed.weight": 4}}'),
     [*EVAL, "--bit-map", "{root}/map.json"], 2, "not a quantizable layer"),
    ("bitmap-bits-out-of-range", lambda r: (r / "map.json").write_text(
        '{"bit_map": {"transformer.encoder.layers.0.linear1.weight": 1}}'), [*EVAL, "--bit-map", "{root}/map.json"],
     2, "bits must be an integer in"),
    # parameter files
    ("params-missing", None, NOTEBOOKS, 2, "parameter file not found"),
    ("params-corrupt", lambda r: (r / "params.yaml").write_text("checkpoint: [unclosed\n"), NOTEBOOKS, 2,
     "cannot parse"),
    ("params-unknown-key", lambda r: (r / "params.yaml").write_text("no_such_parameter: 3\n"), NOTEBOOKS, 2,
     "'no_such_parameter' is not a parameter of any notebook (known: "),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_ends_in_one_line_and_keeps_earlier_results(case, world, capsys):
    name, mutate, command, status, text = case
    if mutate is not None:
        mutate(world)
    ckpt = world / "model.pth" if name.startswith("checkpoint") else CHECKPOINT
    before = snapshot(world / "results")
    argv = [a.format(root=world, ckpt=ckpt) for a in command]
    assert cli.main(argv) == status
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert text in lines[0], lines[0]
    assert snapshot(world / "results") == before
    assert not (world / "PWNED").exists()  # no code from a pickle ran
    assert not list((world / "results").glob(".*.tmp"))


def test_soft_problem_warns_once_and_is_recorded_in_the_protocol(world, capsys):
    # A box crossing the image border: clipped for the model, evaluated as recorded; the run goes on and says so.
    edit_annotations(lambda d: d["annotations"][0].update(bbox=[100.0, 100.0, 60.0, 20.0], area=1200.0))(world)
    out = world / "results" / "eval_soft.json"
    argv = ["evaluate", "--quiet", "--checkpoint", str(CHECKPOINT), "--coco", str(world / "coco"), "--out", str(out)]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "crosses the image border" in warnings[0] and "1x" in warnings[0], err
    recorded = json.loads(out.read_text())["protocol"]["data_warnings"]
    assert list(recorded) == ["bbox_clipped"] and recorded["bbox_clipped"]["count"] == 1
    assert str(world) not in json.dumps(recorded)  # no absolute paths in results
    assert cli.main(["check-data", "--coco", str(world / "coco"), "--split", "val"]) == 0
    assert "crosses the image border" in capsys.readouterr().err


def test_ctrl_c_during_traces_exits_130_and_keeps_the_earlier_file(world, capsys, monkeypatch):
    import detrq.artifact.pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(detrq.artifact.pipeline, "hessian_batches", interrupted)
    before = snapshot(world / "results")
    argv = ["traces", "--quiet", "--checkpoint", str(CHECKPOINT), "--coco", str(world / "coco"), "--split", "val",
            "--metric", "out-float", "--num-images", "2", "--out", str(world / "results" / "traces.json")]
    assert cli.main(argv) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
    assert snapshot(world / "results") == before


def test_a_bug_in_detrq_prints_the_traceback_and_asks_for_a_report(capsys):
    def broken():
        raise RuntimeError("an internal bug")

    assert cli.guarded(broken) == 1  # what main runs every command through
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: an internal bug" in err
    assert err.strip().splitlines()[-1].startswith("error: this is a bug in detrq")


def test_a_corrupt_image_that_passes_the_header_check_fails_where_it_is_decoded(world):
    # A PNG whose compressed pixel data is garbage with valid chunk CRCs: verify() accepts it, decoding does not.
    import struct
    import zlib

    path = first_image(world)
    raw = path.read_bytes()
    out, pos = bytearray(raw[:8]), 8
    while pos < len(raw):
        length, kind = struct.unpack(">I4s", raw[pos:pos + 8])
        body = raw[pos + 8:pos + 8 + length]
        if kind == b"IDAT":
            body = b"\x78\x9c" + bytes(np.random.default_rng(0).integers(0, 256, len(body) - 2, dtype=np.uint8))
        out += struct.pack(">I4s", len(body), kind) + body + struct.pack(">I", zlib.crc32(kind + body))
        pos += 12 + length
    path.write_bytes(bytes(out))
    dataset = CocoDetection(world / "coco", "val", EvalTransform(128, 128))
    with pytest.raises(DetrqError, match=rf"corrupt image file: .*{path.name} \(image_id 1\)"):
        dataset[0]


def test_a_corrupt_cache_entry_is_recomputed_and_the_run_says_so(tmp_path, capsys):
    from detrq.io.cache import load_cached
    from detrq.sensitivity.trace_checks import check_traces

    path = tmp_path / "traces.json"
    path.write_text('{"cache_key": "k", "layers": ')
    assert load_cached(path, "k") is None
    assert "warning: cached result is corrupt, recomputing it" in capsys.readouterr().err
    path.write_text(json.dumps({"cache_key": "k", "metric": "loss", "layers": {"a": {"trace": "x"}}}))
    assert load_cached(path, "k", check=check_traces) is None
    assert "recomputing it" in capsys.readouterr().err
    path.write_text(json.dumps({"cache_key": "other"}))
    assert load_cached(path, "k", check=check_traces) is None  # a stale key is a plain miss: nothing to say
    assert capsys.readouterr().err == ""


def test_a_system_error_is_one_line_not_a_bug_report(capsys):
    import errno

    def disk_full():
        raise OSError(errno.ENOSPC, "No space left on device", "/results/eval.json")

    assert cli.guarded(disk_full) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["error: No space left on device: /results/eval.json; check the path, its "
                                        "permissions and the free disk space"]
