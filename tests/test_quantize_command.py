"""``python -m detrq quantize`` end to end: on the mini preset and on a tiny model saved by transformers, with small
image counts; the outputs, the report, the caches on a rerun, and one-line errors that leave earlier results whole."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detrq.cli import main
from detrq.data.synthetic import make_dataset
from detrq.io.paths import PROJECT_ROOT
from detrq.models.detr import DETR, PRESETS
from detrq.models.loading import config_from_dict
from detrq.quant.bitmaps import quantizable_layers
from detrq.quant.packing import load_packed

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)
SMALL = ["--num-images", "4", "--calib-images", "4", "--n-boot", "20", "--quiet"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize")
    make_dataset(root / "data", 12, 6, seed=1, progress=False)
    torch.manual_seed(0)
    model = DETR(PRESETS["mini"])
    torch.save({"model": model.state_dict()}, root / "mini.pth")
    return root


def quantize(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["quantize", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_mini_end_to_end_then_cached(world, capsys):
    out = world / "q"
    code, stdout, err = quantize(capsys, "--checkpoint", str(world / "mini.pth"), "--coco", str(world / "data"),
                                 "--out", str(out), *SMALL)
    assert code == 0, err
    assert "AP " in stdout and "MB packed" in stdout
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").read_text().startswith("# Mixed-precision DETR: 4 average bits")
    assert report["recipe"]["metric"] == "loss-fisher" and report["recipe"]["quantizer"] == "gptq"
    assert report["data"]["eval_split"] == "val" and report["data"]["calib_split"] == "train"
    assert report["allocation"]["avg_bits"] <= 4.0 + 1e-9
    # Every quantizable layer has its bits, and the regions add up to them.
    model = DETR(config_from_dict(report["checkpoint"]["architecture"], "report"))
    layers = quantizable_layers(model)
    assert {x["name"] for x in report["layers"]} == set(layers)
    assert sum(r["weights"] for r in report["regions"].values()) == sum(p.numel() for p in layers.values())
    assert report["size"]["ideal_bytes"] < report["size"]["float_bytes"] / 6
    assert abs(report["size"]["packed_file_bytes"] / report["size"]["ideal_bytes"] - 1) < 0.02
    d = report["ap"]["delta"]
    assert d["low"] <= d["delta"] <= d["high"] and d["n_boot"] == 20
    assert set(report["seconds"]) >= {"validate", "sensitivities", "allocation", "evaluate_float",
                                      "evaluate_quantized", "bootstrap", "pack", "total"}
    # The packed checkpoint loads (strictly) into the architecture it names, with the bit map's layers as codes.
    state, meta = load_packed(out / "detr_packed.pth")
    packed = DETR(config_from_dict(meta["architecture"], "meta"))
    packed.load_state_dict(state, strict=True)
    assert meta["checkpoint_sha256"] == report["checkpoint"]["sha256"]

    code, _, err = quantize(capsys, "--checkpoint", str(world / "mini.pth"), "--coco", str(world / "data"),
                            "--out", str(out), *SMALL)
    again = json.loads((out / "report.json").read_text())
    assert code == 0, err
    assert all(again["cached"][k] for k in ("sensitivities", "allocation", "evaluate_float", "evaluate_quantized"))
    assert again["ap"] == report["ap"] and again["allocation"] == report["allocation"]


def test_bad_input_is_one_line_and_keeps_earlier_results(world, capsys):
    out = world / "q_bad"
    code, _, err = quantize(capsys, "--checkpoint", str(world / "mini.pth"), "--coco", str(world / "data"),
                            "--out", str(out), "--quantizer", "eq6", *SMALL)
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    for args, message in ((["--avg-bits", "2"], "outside the bit range"),
                          (["--bits", "4-6", "--avg-bits", "4", "--split", "nope"], "annotation file not found"),
                          (["--metric", "modelopt", "--num-images", "99"], "class_balanced_subset"),
                          (["--calib-split", "val"], "must not be the evaluation split")):
        code, _, err = quantize(capsys, "--checkpoint", str(world / "mini.pth"), "--coco", str(world / "data"),
                                "--out", str(out), "--quantizer", "eq6", *SMALL, *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not [p for p in out.iterdir() if p.name.startswith(".quantize.")]  # no staging left behind
    code, _, err = quantize(capsys, "--checkpoint", str(world / "mini.pth"), "--out", str(out))
    assert code == 2 and "--checkpoint needs --coco" in err


def test_modelopt_metric_runs_as_a_scheme(world, capsys):
    out = world / "q_modelopt"
    code, _, err = quantize(capsys, "--checkpoint", str(world / "mini.pth"), "--coco", str(world / "data"),
                            "--out", str(out), "--metric", "modelopt", "--quantizer", "per-channel", *SMALL)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["scheme"] == "modelopt" and "ModelOpt" in report["recipe"]["scheme_label"]
    traces = json.loads((out / "cache" / "traces" / "traces_modelopt.json").read_text())
    assert traces["quantizer"] == "per-channel" and traces["bits"] == [3, 4, 5, 6, 7, 8]


def _hf_tiny(tmp_path: Path, names: dict[int, str]) -> Path:
    """A tiny DETR saved by transformers itself (ResNet-18 trunk, no_timm), with the synthetic set's classes."""
    transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")
    resnet = transformers.ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
                                       out_features=["stage4"])
    config = transformers.DetrConfig(use_timm_backbone=False, backbone_config=resnet, use_pretrained_backbone=False,
                                     id2label={i: n for i, n in names.items()}, d_model=32, encoder_layers=1,
                                     decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                                     encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=6)
    torch.manual_seed(0)
    path = tmp_path / "hf"
    transformers.DetrForObjectDetection(config).save_pretrained(path)
    return path


def test_tiny_model_from_hugging_face(world, tmp_path, capsys):
    categories = json.loads((world / "data" / "annotations" / "instances_val.json").read_text())["categories"]
    names = {0: "N/A", **{c["id"]: c["name"] for c in categories}}
    hf = _hf_tiny(tmp_path, names)
    assert main(["convert", "--from-hf", str(hf), "--out", str(tmp_path / "tiny.pth")]) == 0
    # Round-to-nearest keeps this quick: GPTQ on ResNet-18's 4608-column layers takes seconds per bit width.
    common = ["--coco", str(world / "data"), "--min-size", "64", "--max-size", "64", "--quantizer", "eq6", *SMALL]
    for checkpoint, out in ((tmp_path / "tiny.pth", tmp_path / "q_pth"), (hf, tmp_path / "q_dir")):
        code, _, err = quantize(capsys, "--checkpoint", str(checkpoint), "--out", str(out), *common)
        assert code == 0, err
        report = json.loads((out / "report.json").read_text())
        assert report["checkpoint"]["architecture"]["backbone"] == "resnet18"
        assert report["checkpoint"]["hf_backbone"] == "no_timm"
    # The converted file and the directory are the same model: the same bit map.
    a, b = (json.loads((tmp_path / d / "report.json").read_text())["allocation"] for d in ("q_pth", "q_dir"))
    assert a["bit_map"] == b["bit_map"]
    # Classes named otherwise than the data's categories: one line that says so.
    swapped = _hf_tiny(tmp_path / "swapped", {**names, 1: names[2], 2: names[1]})
    capsys.readouterr()  # transformers' own progress lines
    code, _, err = quantize(capsys, "--checkpoint", str(swapped), "--out", str(tmp_path / "q_bad"), *common)
    assert code == 2 and err.count("\n") == 1 and "label mismatch: category 1 is 'red_circle'" in err, err


def test_help_names_the_default_recipe_and_why():
    proc = subprocess.run([sys.executable, "-m", "detrq", "quantize", "--help"], capture_output=True, text=True,
                          timeout=300, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROJECT_ROOT),
                                            "COLUMNS": "400"})  # no wrapping inside a word
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "default: loss-fisher" in text and "default: gptq" in text and "default: 3-8" in text
    assert "highest 4-bit mAP of Table 2" in text
