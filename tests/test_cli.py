"""The command line end to end on a tiny generated dataset: outputs, caching, and one-line errors on bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detrq.io.paths import PROJECT_ROOT
from worlds import tiny_world

torch.set_num_threads(1)


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "detrq", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                            "PYTHONPATH": str(PROJECT_ROOT)})  # this checkout's detrq


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_world(root, 12, 6, data_seed=1, preset="mini")
    return root


def assert_one_line_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert pattern in lines[0]


def test_evaluate_traces_allocate_evaluate(world):
    common = ["--checkpoint", "mini.pth", "--coco", "data", "--quiet"]
    ev = run("evaluate", *common, "--bits", "6", "--out", "res/eval.json", cwd=world)
    assert ev.returncode == 0, ev.stderr
    first = json.loads((world / "res/eval.json").read_text())
    assert first["protocol"]["num_images"] == 6 and set(first["bit_map"].values()) == {6}
    assert "AP " in ev.stdout
    again = run("evaluate", *common, "--bits", "6", "--out", "res/eval.json", cwd=world)
    assert again.returncode == 0 and json.loads((world / "res/eval.json").read_text()) == first  # cache reused

    tr = run("traces", *common, "--metric", "out-float", "--num-images", "4", "--batch-size", "2",
             "--max-probes", "4", "--min-probes", "2", "--out", "res/traces.json", cwd=world)
    assert tr.returncode == 0, tr.stderr
    traces = json.loads((world / "res/traces.json").read_text())
    assert len(traces["image_ids"]) == 4 and traces["metric"] == "out-float"
    assert all({"trace", "avg_trace", "stderr", "n_probes", "numel"} <= set(v) for v in traces["layers"].values())

    al = run("allocate", "--traces", "res/traces.json", "--checkpoint", "mini.pth", "--avg-bits", "5",
             "--out", "res/bitmap.json", cwd=world)
    assert al.returncode == 0, al.stderr
    bitmap = json.loads((world / "res/bitmap.json").read_text())
    assert bitmap["avg_bits"] <= 5 + 1e-9 and set(bitmap["bit_map"].values()) <= {3, 4, 5, 6}

    ev2 = run("evaluate", *common, "--bit-map", "res/bitmap.json", "--out", "res/eval_map.json", cwd=world)
    assert ev2.returncode == 0, ev2.stderr
    assert json.loads((world / "res/eval_map.json").read_text())["bit_map"] == bitmap["bit_map"]

    fo = run("traces", *common, "--metric", "out-first-order", "--estimator", "ggn", "--num-images", "4",
             "--batch-size", "2", "--max-probes", "2", "--min-probes", "2", "--jacobian-probes", "2",
             "--out", "res/traces_fo.json", cwd=world)
    assert fo.returncode == 0, fo.stderr
    first_order = json.loads((world / "res/traces_fo.json").read_text())
    assert first_order["estimator"] == "ggn" and first_order["l1_scale"] == pytest.approx(1 / (4 * 20))
    assert all(set(v) == {"kl", "jacobian"} for v in first_order["layers"].values())
    al_fo = run("allocate", "--traces", "res/traces_fo.json", "--checkpoint", "mini.pth", "--avg-bits", "4",
                "--negative-traces", "clip", "--out", "res/bitmap_fo.json", cwd=world)
    assert al_fo.returncode == 0, al_fo.stderr
    assert json.loads((world / "res/bitmap_fo.json").read_text())["negative_traces"] == "clip"
    bad = run("traces", *common, "--metric", "loss", "--estimator", "ggn", "--num-images", "2", "--batch-size", "2",
              "--max-probes", "2", "--min-probes", "2", "--out", "res/traces_bad.json", cwd=world)
    assert_one_line_error(bad, "no generalized Gauss-Newton form")

    infeasible = run("allocate", "--traces", "res/traces.json", "--checkpoint", "mini.pth", "--avg-bits", "2.5",
                     "--out", "res/bitmap.json", cwd=world)
    assert_one_line_error(infeasible, "smallest feasible average is 3.0000")
    assert json.loads((world / "res/bitmap.json").read_text()) == bitmap  # the earlier result survives


def test_bad_inputs_give_one_line_errors_and_keep_earlier_results(world, tmp_path):
    out = tmp_path / "keep.json"
    out.write_text('{"earlier": true}')
    base = ["evaluate", "--quiet", "--out", str(out)]
    assert_one_line_error(run(*base, "--checkpoint", "missing.pth", "--coco", "data", cwd=world),
                          "checkpoint not found")

    sd = torch.load(world / "mini.pth", weights_only=True)["model"]
    sd["input_proj.weight_renamed"] = sd.pop("input_proj.weight")
    torch.save({"model": sd}, tmp_path / "renamed.pth")
    assert_one_line_error(run(*base, "--checkpoint", str(tmp_path / "renamed.pth"), "--coco", "data", cwd=world),
                          "missing keys ['input_proj.weight']")

    bad = tmp_path / "bad"
    (bad / "annotations").mkdir(parents=True)
    (bad / "val").mkdir()
    (bad / "annotations" / "instances_val.json").write_text('{"images": [')
    assert_one_line_error(run(*base, "--checkpoint", "mini.pth", "--coco", str(bad), cwd=world), "corrupt JSON")

    noimg = tmp_path / "noimg"
    (noimg / "annotations").mkdir(parents=True)
    (noimg / "annotations" / "instances_val.json").write_text(
        (world / "data" / "annotations" / "instances_val.json").read_text())
    assert_one_line_error(run(*base, "--checkpoint", "mini.pth", "--coco", str(noimg), cwd=world),
                          "image directory not found")

    (tmp_path / "bitmap.json").write_text('{"bit_map": {"class_embed.weight": 4}}')
    assert_one_line_error(run(*base, "--checkpoint", "mini.pth", "--coco", "data", "--bit-map",
                              str(tmp_path / "bitmap.json"), cwd=world), "not a quantizable layer")
    assert out.read_text() == '{"earlier": true}'
    assert not list(tmp_path.glob(".keep.json.*"))  # no temp file left behind
