"""The ONNX INT8 path on Ultralytics' own YOLOv8n, exported as its ONNX export does (legacy exporter, opset 17,
``[batch, 4 + classes, anchors]`` output), and ``detrq.int8.yolo.YOLOv8`` checked against it weight for weight.

Ultralytics (AGPL-3.0) is a test-only dependency that detrq never imports: without it these tests skip.
Random weights with BN recalibrated, tiny images, CPU, 1 thread.
"""

import importlib
import importlib.util
import io
import os
import warnings

import pytest
import torch
from PIL import Image

from detrq.data.synthetic import make_dataset
from detrq.int8.calibration import Preprocess, coco_images, load_batch
from detrq.int8.onnx_workflow import OnnxRunConfig, run_onnx_int8
from detrq.int8.stock import recalibrate_all_bn
from detrq.int8.yolo import YOLOv8

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ultralytics") is None,
                                reason="ultralytics is not installed (test-only, AGPL-3.0)")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """``ultralytics.nn.tasks``, imported only while these tests run: on import Ultralytics writes a settings file
    (sent to a temporary folder here), may reach for the network (kept offline) and replaces ``PIL.Image.open``
    for the whole process (put back afterwards, so that later tests see PIL's own)."""
    os.environ.setdefault("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("ultralytics")))
    os.environ.setdefault("YOLO_OFFLINE", "1")
    pil_open = Image.open
    try:
        yield importlib.import_module("ultralytics.nn.tasks")
    finally:
        Image.open = pil_open


def ultralytics_yolov8n(tasks, num_classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return tasks.DetectionModel("yolov8n.yaml", nc=num_classes, verbose=False).eval()


def test_detrq_yolov8_computes_what_ultralytics_yolov8n_computes(tasks):
    theirs, ours = ultralytics_yolov8n(tasks, 10), YOLOv8(10).eval()
    # same modules in the same order: the state dicts pair up entry by entry
    pairs = list(zip(theirs.state_dict().items(), ours.state_dict().items()))
    assert len(pairs) == len(ours.state_dict()) == len(theirs.state_dict())
    assert all(a.shape == b.shape for (_, a), (_, b) in pairs)
    ours.load_state_dict({k: v for (_, v), (k, _) in pairs})
    x = torch.rand(2, 3, 160, 128)
    with torch.no_grad():
        y_theirs, y_ours = theirs(x), ours(x)
    y_theirs = y_theirs[0] if isinstance(y_theirs, (tuple, list)) else y_theirs
    assert y_ours.shape == y_theirs.shape == (2, 14, 420)
    assert torch.allclose(y_ours, y_theirs, atol=1e-5)


def test_an_ultralytics_onnx_export_is_quantized_decoded_and_scored(tasks, tmp_path):
    data = tmp_path / "data"
    make_dataset(data, 12, 4, seed=3, progress=False)
    model = ultralytics_yolov8n(tasks, 10)
    batch, _ = load_batch(coco_images(data, "train", 4).paths, Preprocess(96, 96))
    recalibrate_all_bn(model, [torch.from_numpy(batch)])
    head = model.model[-1]
    head.export, head.format = True, "onnx"  # as Ultralytics' exporter sets it: one output, the decoded boxes
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.from_numpy(batch[:1]),), buf, dynamo=False, opset_version=17,
                          input_names=["images"], output_names=["output0"],
                          dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}})
    path = tmp_path / "yolov8n.onnx"
    path.write_bytes(buf.getvalue())
    r = run_onnx_int8(OnnxRunConfig(onnx=str(path), coco=str(data), out=str(tmp_path / "r.json"), calib_images=4,
                                    eval_images=4, latency_images=1, latency_repeats=5, profile_runs=1,
                                    batch_sizes=(1,)), reuse=False)
    assert r["decoded"] and r["AP_float"] is not None
    assert r["size_reduction"] >= 0.70
    assert r["activations"]["median_sqnr_db"] > 20
    assert "Conv" not in r["profile"]["int8_split"]["float_ops"]
