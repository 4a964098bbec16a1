"""INT8 PTQ workflow: every backend on a tiny CNN, FX on a tiny Faster R-CNN, the activation-difference maths on
hand-made model pairs, ONNX round trip, detection agreement, and the errors for unsupported input. CPU, 1 thread."""

import math
import re
import subprocess
import sys

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock
from torchvision.ops.misc import FrozenBatchNorm2d

from detrq.int8.activations import activation_diff, compare_layers
from detrq.int8.data import to_torchvision
from detrq.int8.detect import detection_agreement, paired_scores
from detrq.int8.detector import FrcnnConfig, build_frcnn
from detrq.int8.measure import paired_latency, serialized_size
from detrq.int8.onnx_export import to_ort
from detrq.int8.plan import fold_frozen_batchnorm, quantization_plan
from detrq.int8.quantize import quantize_int8
from detrq.io.errors import DetrqError
from detrq.io.paths import PROJECT_ROOT

torch.set_num_threads(1)


def tiny_cnn() -> nn.Module:
    """A classifier with a torchvision BasicBlock (its shared ReLU is what pt2e needs untied)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        BasicBlock(32, 32), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    ).eval()


def calib(n: int = 8, size: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return list(torch.rand(n, 3, size, size, generator=g))


@pytest.mark.parametrize("backend", ["fx", "pt2e", "onnxruntime"])
def test_each_backend_quantizes_a_cnn_classifier(backend):
    model = tiny_cnn()
    q = quantize_int8(model, calib(), backend, batch_size=4)
    q.eval()  # must work on every backend (exported pt2e modules refuse it unless allowed)
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert out.shape == ref.shape
    assert float((out - ref).norm() / ref.norm()) < 0.1
    assert serialized_size(q) < 0.5 * serialized_size(model)
    assert isinstance(model[0], nn.Conv2d), "the float model is left untouched"


def tiny_detector() -> nn.Module:
    torch.manual_seed(0)
    cfg = FrcnnConfig(stem=8, stages=(8, 16, 32, 64), fpn_channels=16, representation=64, image_size=64)
    return build_frcnn(cfg).eval()


def test_fx_quantizes_a_tiny_faster_rcnn():
    model = tiny_detector()
    parts = ("backbone", "box_head")
    assert quantization_plan(model, parts).targets == ("backbone", "roi_heads.box_head")
    q = quantize_int8(model, calib(4, 64), "fx", parts=parts, batch_size=2)
    with torch.no_grad():
        out = q(calib(2, 64))
    assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"}
    assert out[0]["boxes"].shape[-1] == 4
    assert type(q.rpn) is type(model.rpn) and q.roi_heads.box_predictor.cls_score.weight.dtype == torch.float32
    assert q.rpn.head.level.conv[0][0].weight.dtype == torch.float32, "parts left out stay float"
    assert serialized_size(q) < 0.5 * serialized_size(model)


def test_fx_quantizes_a_stock_torchvision_detector():
    """MobileNetV3-FPN Faster R-CNN: hardswish, squeeze-excitation and a different FPN than the embedded model."""
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    torch.manual_seed(0)
    model = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=3, min_size=64,
                                                  max_size=64).eval()
    q = quantize_int8(model, calib(2, 64), "fx")
    with torch.no_grad():
        assert set(q(calib(1, 64))[0]) == {"boxes", "scores", "labels"}
    assert serialized_size(q) < 0.5 * serialized_size(model)


def test_frozen_batchnorm_is_folded_without_changing_the_output():
    torch.manual_seed(0)
    frozen = FrozenBatchNorm2d(4)
    for key in ("weight", "bias", "running_mean"):
        getattr(frozen, key).copy_(torch.randn(4))
    frozen.running_var.copy_(torch.rand(4) + 0.5)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), frozen, nn.ReLU()).eval()
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
        folded = fold_frozen_batchnorm(model)
        assert isinstance(folded[1], nn.BatchNorm2d)
        assert torch.allclose(folded(x), ref, atol=1e-6)


def test_unsupported_model_and_empty_calibration_raise():
    with pytest.raises(DetrqError, match="no CNN backbone"):
        quantize_int8(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), [torch.rand(4)])
    with pytest.raises(DetrqError, match="calibration set is empty"):
        quantize_int8(tiny_cnn(), [])
    with pytest.raises(DetrqError, match="for the pt2e backend"):
        quantize_int8(tiny_cnn(), calib(), "fx", compile=True)
    with pytest.raises(DetrqError, match="unknown backend"):
        quantize_int8(tiny_cnn(), calib(), "tensorrt")


def test_activation_diff_known_values():
    f = torch.ones(2, 3, 4)
    d = activation_diff("x", f, 1.1 * f)
    assert torch.allclose(d.abs_diff_map, torch.full((3, 4), 0.1))
    assert torch.allclose(d.rel_diff_map, torch.full((3, 4), 10.0), rtol=1e-4)
    assert d.sqnr_db == pytest.approx(20.0, abs=1e-4)  # signal 1, noise 0.01 per element
    assert activation_diff("same", f, f).sqnr_db == math.inf


def test_compare_layers_on_a_conv_and_its_perturbed_twin():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 1))
    twin = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 1))
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        twin[0].bias += 0.5  # known perturbation of the first layer only
    x = torch.rand(1, 1, 6, 6)
    first, second = compare_layers(model, twin, x)
    assert (first.name, second.name) == ("0", "1")
    assert torch.allclose(first.abs_diff_map, torch.full((6, 6), 0.5), atol=1e-6)
    with torch.no_grad():
        y = model[0](x)
    assert first.sqnr_db == pytest.approx(10 * math.log10(float(y.pow(2).sum()) / (y.numel() * 0.25)), rel=1e-5)
    # the second layer is fed the float layer's input, so the upstream perturbation does not reach it
    assert second.sqnr_db == math.inf


def test_onnx_round_trip_of_a_tiny_cnn():
    model = tiny_cnn()
    ort_model = to_ort(model, (torch.rand(2, 3, 16, 16),))
    x = torch.rand(5, 3, 16, 16)  # another batch size: the batch dimension is dynamic
    with torch.no_grad():
        assert torch.allclose(ort_model(x), model(x), atol=1e-4)
    assert serialized_size(ort_model) >= ort_model.onnx_model.numel()


def test_to_torchvision_boxes_and_image():
    image = torch.zeros(3, 10, 20)  # ImageNet-normalised zeros are the mean colour
    target = {"boxes": torch.tensor([[0.5, 0.5, 0.5, 0.2]]), "size": torch.tensor([10, 20])}
    img, t = to_torchvision(image, target)
    assert torch.allclose(t["boxes"], torch.tensor([[5.0, 4.0, 15.0, 6.0]]))
    assert torch.allclose(img[:, 0, 0], torch.tensor([0.485, 0.456, 0.406]))


def test_detection_agreement_and_paired_scores():
    f = {"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), "scores": torch.tensor([0.9, 0.8]),
         "labels": torch.tensor([1, 2])}
    q = {"boxes": torch.tensor([[1.0, 0, 11, 10]]), "scores": torch.tensor([0.72]), "labels": torch.tensor([1])}
    same = detection_agreement([f], [f])
    assert same["mismatch"]["mean"] == 0 and same["box_rel_error"]["mean"] == 0
    r = detection_agreement([f], [q])
    assert r["mismatch"]["mean"] == pytest.approx(1 - 2 * 1 / 3)
    assert r["box_rel_error"]["mean"] == pytest.approx(2 / 40)  # |dx0| + |dx1| over the perimeter
    assert r["score_rel_error"]["mean"] == pytest.approx(0.2)
    fs, qs = paired_scores([f], [q])
    assert fs.tolist() == pytest.approx([0.9, 0.8]) and qs.tolist() == pytest.approx([0.72, 0.0])


def test_paired_latency_needs_five_repeats():
    with pytest.raises(DetrqError, match="at least 5"):
        paired_latency(lambda: None, lambda: None, repeats=3)
    r = paired_latency(lambda: None, lambda: None, repeats=5)
    assert r["repeats"] == 5 and r["ratio"] > 0 and r["ratio_iqr"][0] <= r["ratio"] <= r["ratio_iqr"][1]


def test_frcnn_training_resumes_to_identical_weights(tmp_path, monkeypatch):
    from detrq.data.synthetic import make_dataset
    from detrq.int8 import train as frcnn_train

    make_dataset(tmp_path / "data", 16, 4, seed=5, progress=False)
    model_cfg = FrcnnConfig(stem=8, stages=(8, 16, 32, 64), fpn_channels=16, representation=64, image_size=64)

    def config(name):
        return frcnn_train.FrcnnTrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / name), iters=4,
                                            batch_size=2, save_every=2, eval_every=100, warmup_iters=1)

    whole = frcnn_train.train_frcnn(config("a.pth"), model_cfg, progress=False)
    assert whole["iterations"] == 4 and len(whole["sha256"]) == 64

    real = frcnn_train._lr_factor

    def interrupt_at_3(it, cfg):
        if it == 3:
            raise KeyboardInterrupt
        return real(it, cfg)

    monkeypatch.setattr(frcnn_train, "_lr_factor", interrupt_at_3)
    with pytest.raises(KeyboardInterrupt):
        frcnn_train.train_frcnn(config("b.pth"), model_cfg, progress=False)
    monkeypatch.setattr(frcnn_train, "_lr_factor", real)
    frcnn_train.train_frcnn(config("b.pth"), model_cfg, progress=False)
    # weights, not file hashes: torch.save names the archive's records after the file
    a, b = (torch.load(tmp_path / n, weights_only=True)["model"] for n in ("a.pth", "b.pth"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_onnx_report_finds_every_quantized_part_of_a_detector():
    """onnxruntime with every part, the RPN head included: the report compares each part at the paths the
    quantized model has (the per-level RPN head stand-in), not the float model's."""
    from detrq.int8.onnx_export import onnx_report

    model = tiny_detector()
    q = quantize_int8(model, calib(4, 64), "onnxruntime", batch_size=2)
    report = onnx_report(model, q, calib(1, 64), repeats=5)
    assert {"backbone", "rpn.head.level", "roi_heads.box_head", "roi_heads.box_predictor"} <= set(report)
    assert all(r["onnx_bytes"]["int8_qdq"] < r["onnx_bytes"]["float"] for r in report.values())


@pytest.mark.skipif(not (PROJECT_ROOT / "data/synthetic/annotations/instances_val.json").is_file(),
                    reason="needs the synthetic set (./reproduce.sh generates it)")
def test_an_int8_run_says_each_phase_as_it_starts(tmp_path):
    cmd = [sys.executable, "-m", "detrq", "int8", "--calib-images", "4", "--eval-images", "4", "--latency-images", "1",
           "--batch-sizes", "1", "--out", str(tmp_path / "int8.json")]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    phases = re.findall(r"^int8 narrow fx: (\S+) .*\[(\d+) s\]$", proc.stderr, re.M)
    assert [p for p, _ in phases] == ["calibrating", "AP,", "paired", "peak", "peak", "done:"]
    assert [int(t) for _, t in phases] == sorted(int(t) for _, t in phases)
    again = subprocess.run([*cmd, "--quiet"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "int8 narrow fx:" not in again.stderr  # --quiet: no phase lines

