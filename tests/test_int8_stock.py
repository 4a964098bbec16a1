"""INT8 on every part of a Faster R-CNN (``parts=``), torchvision's stock architectures with random weights and
recalibrated BN, the per-stage breakdown, and the activation figures on a classifier (ResNet-18) as well as a
detector. Tiny images and few calibration images throughout (CPU, 1 thread)."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from detrq.artifact.readme import int8_markdown
from detrq.int8.detector import FrcnnConfig, build_frcnn
from detrq.int8.heads import BoxPredictor, LevelwiseRPNHead, make_heads_traceable
from detrq.int8.measure import serialized_size
from detrq.int8.plan import DETECTOR_PARTS, quantization_plan
from detrq.int8.plots import layer_figures
from detrq.int8.quantize import quantize_int8
from detrq.int8.stages import STAGES, compare_breakdowns, stage_breakdown
from detrq.int8.stock import build_stock
from detrq.io.errors import DetrqError

torch.set_num_threads(1)


def images(n: int, size: int, seed: int = 1) -> list[torch.Tensor]:
    return list(torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)))


@pytest.fixture(scope="module")
def tiny_detector() -> nn.Module:
    torch.manual_seed(0)
    cfg = FrcnnConfig(stem=8, stages=(8, 16, 32, 64), fpn_channels=16, representation=64, image_size=64)
    return build_frcnn(cfg).eval()


def _is_int8(module: nn.Module) -> bool:
    return any("quantized" in type(m).__module__ for m in module.modules())


def test_traceable_heads_compute_what_torchvision_heads_compute(tiny_detector):
    import copy

    twin = make_heads_traceable(copy.deepcopy(tiny_detector))
    assert isinstance(twin.rpn.head, LevelwiseRPNHead) and isinstance(twin.roi_heads.box_predictor, BoxPredictor)
    x = images(2, 64)
    with torch.no_grad():
        ref, out = tiny_detector(x), twin(x)
    for r, o in zip(ref, out):
        assert all(torch.equal(r[k], o[k]) for k in r)


@pytest.mark.parametrize("backend", ["fx", "pt2e", "onnxruntime"])
def test_every_part_quantizes_on_every_backend(tiny_detector, backend):
    q = quantize_int8(tiny_detector, images(4, 64), backend, batch_size=2)
    with torch.no_grad():
        out = q(images(2, 64, seed=3))
    assert len(out) == 2 and out[0]["boxes"].shape[-1] == 4
    assert quantization_plan(tiny_detector).parts == DETECTOR_PARTS
    # every part is replaced by the backend's int8 module (a GraphModule, or an ONNX graph for onnxruntime)
    for path in quantization_plan(tiny_detector).targets:
        assert not isinstance(q.get_submodule(path), (nn.Sequential, LevelwiseRPNHead, BoxPredictor)), path
    if backend == "fx":
        assert _is_int8(q.rpn.head.level) and _is_int8(q.roi_heads.box_predictor)
    assert serialized_size(q) < 0.5 * serialized_size(tiny_detector)  # ONNX graph overhead is large at this size


def test_parts_are_checked(tiny_detector):
    with pytest.raises(DetrqError, match="unknown parts"):
        quantization_plan(tiny_detector, ["backbone", "rpn"])
    with pytest.raises(DetrqError, match="parts is empty"):
        quantization_plan(tiny_detector, [])
    with pytest.raises(DetrqError, match="for detectors"):
        quantization_plan(nn.Sequential(nn.Conv2d(3, 4, 3)), ["backbone"])
    assert quantization_plan(tiny_detector, ["box_predictor", "backbone"]).parts == ("backbone", "box_predictor")


def test_stock_r50_fpn_recalibrated_bn_and_size_bar():
    """Random-init R50-FPN: BN recalibration brings the FPN features to O(1), and quantizing every part gets the
    serialized state dict >= 74% smaller (an architecture property, independent of the weights' values)."""
    calib = images(4, 64)
    model = build_stock("fasterrcnn_resnet50_fpn", 64, seed=0, bn_images=calib)
    with torch.no_grad():
        feats = model.backbone(model.transform(images(1, 64, seed=5))[0].tensors)
    assert all(0.05 < float(f.abs().mean()) < 5 for f in feats.values())
    q = quantize_int8(model, calib[:2], "fx")
    with torch.no_grad():
        assert len(q(images(1, 64, seed=6))[0]["boxes"]) > 0  # box_score_thresh=0 keeps random-weight detections
    assert 1 - serialized_size(q) / serialized_size(model) >= 0.74


def test_stock_models_and_bn_recalibration_errors():
    with pytest.raises(DetrqError, match="unknown stock model"):
        build_stock("fasterrcnn_vgg16", 64, 0, images(1, 64))
    with pytest.raises(DetrqError, match="at least one image"):
        build_stock("fasterrcnn_mobilenet_v3_large_fpn", 64, 0, [])


def test_stage_breakdown_adds_up_and_bounds_the_ratio(tiny_detector):
    ims = images(2, 64)
    q = quantize_int8(tiny_detector, ims, "fx")
    bd_f, bd_q = stage_breakdown(tiny_detector, ims, repeats=1), stage_breakdown(q, ims, repeats=1)
    for bd in (bd_f, bd_q):
        assert set(bd["s_per_image"]) == {s for s, _, _ in STAGES} | {"other"}
        assert sum(bd["s_per_image"].values()) == pytest.approx(bd["total_s_per_image"])
        assert all(v >= 0 for k, v in bd["s_per_image"].items() if k != "other")
        assert bd["rois_per_image"] > 0 and bd["output_mb"]["roi_align"] > 0
    cmp = compare_breakdowns(bd_f, bd_q, DETECTOR_PARTS)
    assert cmp["float_stages"] == ["transform", "rpn", "roi_align", "postprocess", "other"]
    assert 0 < cmp["ratio_floor"] <= cmp["ratio"]
    # the model's own forward is back in place
    assert "forward" not in vars(tiny_detector.backbone) and "postprocess" not in vars(tiny_detector.transform)


def test_activation_figures_on_resnet18_classifier(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=10).eval()
    x = torch.stack(images(4, 32))
    q = quantize_int8(model, x, "fx")
    out = layer_figures(model, q, x[:1], x[0], None, tmp_path, "r18")
    assert len(out["sqnr_db"]) == 20  # every conv, downsample convs included
    assert all(math.isfinite(v) and v > 10 for v in out["sqnr_db"].values())
    assert all((tmp_path / f).stat().st_size > 0 for f in out["figures"])


def test_activation_figures_on_a_detector(tiny_detector, tmp_path):
    from detrq.int8.workflow import activation_figures

    ims = images(2, 64)
    q = quantize_int8(tiny_detector, ims, "fx")
    with torch.no_grad():
        dets_f, dets_q = tiny_detector(ims[:1]), q(ims[:1])
    out = activation_figures(tiny_detector, q, ims[0], dets_f, dets_q, tmp_path, "det")
    assert out["figures"] == [f"det_{k}.png" for k in ("first_layer", "layer_maps", "hexbin", "sqnr")]
    assert any(name.startswith("fpn.") for name in out["sqnr_db"])


def test_memory_factory_builds_a_stock_model_from_plain_json():
    """peak_memory's subprocess rebuilds the run's model from its config as JSON (tuples become lists)."""
    import json

    from detrq.int8.workflow import Int8RunConfig, build_model

    cfg = Int8RunConfig(model="fasterrcnn_mobilenet_v3_large_fpn", image_size=64, calib_images=2,
                        parts=("backbone", "box_head"))
    q = build_model(json.loads(json.dumps(dataclasses.asdict(cfg))), quantized=True)
    assert _is_int8(q.roi_heads.box_head) and not _is_int8(q.roi_heads.box_predictor)
    with pytest.raises(DetrqError, match="unknown model"):
        build_model(dataclasses.asdict(dataclasses.replace(cfg, model="yolo")), quantized=False)


def test_readme_table_has_both_models():
    base = {"backend": "fx", "image_size": 128, "quantized_parts": list(DETECTOR_PARTS), "size_reduction": 0.745,
            "latency_ratio": 0.41, "latency": {"ratio_iqr": [0.4, 0.43]}, "rois": {"float_per_image": 1000},
            "breakdown": {"ratio_floor": 0.2}, "peak_memory_mb": {"float": {"1": 800}, "int8": {"1": 700}}}
    narrow = {**base, "model": "frcnn_narrow", "checkpoint_sha256": "ab", "AP_float": 0.65, "AP_int8": 0.649}
    stock = {**base, "model": "fasterrcnn_resnet50_fpn", "checkpoint_sha256": None, "AP_float": None,
             "AP_int8": None, "image_size": 800}
    table = int8_markdown([narrow, stock])
    assert "| frcnn_narrow | trained | fx | 128 |" in table and "| 65.0 | 64.9 |" in table
    assert "| fasterrcnn_resnet50_fpn | random, BN recalibrated | fx | 800 |" in table and "| - | - |" in table
