"""INT8 of ONNX detectors (``python -m detrq int8 --onnx``): a YOLOv8-architecture model (decoded, with AP),
torchvision's RetinaNet and SSDlite exported as raw heads (raw-output agreement; SSDlite with a fixed batch), all
with random weights and recalibrated BN and exported inside the tests; the decoder against ground truth; the
deterministic export and quantization; and every kind of bad input as one line that keeps earlier results.
Tiny images and few images throughout (CPU, 1 thread)."""

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image

from detrq.cli import main
from detrq.data.synthetic import make_dataset
from detrq.evaluation.evaluate import coco_metrics
from detrq.int8 import onnx_workflow
from detrq.int8.calibration import Placement, Preprocess, coco_images, load_batch, prepare
from detrq.int8.detect import coco_detections
from detrq.int8.onnx_quantize import decoding_tail, needs_reduce_range, quantize_onnx
from detrq.int8.onnx_stock import export_stock
from detrq.int8.onnx_layers import layer_diffs
from detrq.int8.onnx_workflow import OnnxRunConfig, run_onnx_int8
from detrq.int8.yolo import YOLOv8
from detrq.int8.yolo_decode import decode_yolo, yolo_classes
from detrq.io.errors import DetrqError
from detrq.io.results import INT8_ISA_FLAGS, cpu_int8_isa

torch.set_num_threads(1)
SMALL = {"calib_images": 4, "eval_images": 4, "latency_images": 1, "latency_repeats": 5, "profile_runs": 1,
         "batch_sizes": (1, 2)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx_data") / "data"
    make_dataset(root, 16, 6, seed=5, progress=False)
    return root


@pytest.fixture(scope="module")
def yolo(data, tmp_path_factory):
    return export_stock("yolov8n", tmp_path_factory.mktemp("yolo") / "yolo.onnx", data, image_size=96, bn_images=4)


@pytest.fixture(scope="module")
def yolo_run(yolo, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("yolo_run")
    cfg = OnnxRunConfig(onnx=str(yolo), coco=str(data), figures=str(out / "figures"), out=str(out / "r.json"),
                        int8_out=str(out / "yolo_int8.onnx"), **SMALL)
    return cfg, run_onnx_int8(cfg, reuse=False)


def test_yolo_architecture_matches_yolov8n():
    assert sum(p.numel() for p in YOLOv8(80).parameters()) == 3_157_200  # YOLOv8n's published parameter count
    with torch.no_grad():
        y = YOLOv8(80).eval()(torch.rand(1, 3, 640, 640))
    assert y.shape == (1, 84, 8400) and yolo_classes(y.shape) == 80


def test_yolo_onnx_is_quantized_measured_decoded_and_scored(yolo_run):
    cfg, r = yolo_run
    assert r["backend"] == "onnx" and r["model"] == "yolo" and r["image_size"] == 96
    assert r["size_reduction"] >= 0.70  # the target for the YOLO-family model
    assert r["quantized_parts"] == ["64 of 64 Conv/Gemm/MatMul layers"]
    assert {"Sigmoid", "Concat"} <= set(r["float_parts"])  # the decoding tail after the last convs stays float
    assert r["decoded"] and r["AP_float"] is not None and r["AP_int8"] is not None  # 10 classes = 10 categories
    assert r["detection_error"]["num_images"] == 4
    assert r["raw_agreement"]["output0"]["sqnr_db"] > 15
    lat = r["latency"]
    assert lat["ratio_iqr"][0] <= lat["ratio"] <= lat["ratio_iqr"][1] and lat["batch"] == 1
    assert set(r["peak_memory_mb"]["float"]) == {"1", "2"} and r["dynamic_batch"] and r["peak_memory_note"] is None
    split = r["profile"]["int8_split"]
    assert split["int8_kernels_share"] > 0.3
    assert split["int8_kernels_share"] + split["conversions_share"] + split["float_ops_share"] == pytest.approx(1)
    acts = r["activations"]
    assert len(acts["sqnr_db"]) == 64 and acts["median_sqnr_db"] > 20  # each int8 conv fed the float input
    assert set(acts["sqnr_db_end_to_end"]) == set(acts["sqnr_db"])
    assert len(acts["figures"]) == 4 and all((Path(cfg.figures) / f).is_file() for f in acts["figures"])
    env = r["environment"]
    assert env["cpu"] and set(env["cpu_int8_isa"]) <= set(INT8_ISA_FLAGS)
    assert onnx.load(cfg.int8_out).graph.node  # the int8 model is written and loads
    assert json.loads(open(cfg.out).read())["cache_key"] == r["cache_key"]


def test_the_cli_runs_an_onnx_model_and_prints_one_summary_line(yolo, data, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["int8", "--onnx", str(yolo), "--images", str(data / "val"), "--calib-images", "2",
                 "--eval-images", "2", "--latency-images", "1", "--batch-sizes", "1", "--out", str(out),
                 "--int8-out", str(tmp_path / "q.onnx"), "--quiet"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("yolo (ONNX): size ") and "no AP: no COCO ground truth" in line
    r = json.loads(out.read_text())
    assert r["decoded"] and r["calibration"]["order"] == "sorted by file name"


def test_a_second_run_with_the_same_inputs_reuses_the_results(yolo_run):
    cfg, r = yolo_run
    assert run_onnx_int8(cfg) == json.loads(open(cfg.out).read())


class Recomputed(Exception):
    pass


def _recompute(*args, **kwargs):
    raise Recomputed


def test_cached_results_without_the_onnx_files_are_reused_unless_the_model_is_required(yolo_run, tmp_path,
                                                                                       monkeypatch):
    """A fresh clone has the committed results file and figures but not the gitignored .onnx files: the notebook
    (require_model=False) reuses them; the CLI (the default) recomputes, since its user wants the int8 file."""
    cfg, _ = yolo_run
    out = tmp_path / "r.json"
    out.write_text(Path(cfg.out).read_text())
    clone = dataclasses.replace(cfg, out=str(out), int8_out=str(tmp_path / "absent_int8.onnx"))
    monkeypatch.setattr(onnx_workflow, "image_sets", _recompute)  # the first step after the cache check
    assert run_onnx_int8(clone, require_model=False) == json.loads(out.read_text())
    assert not (tmp_path / "absent_int8.onnx").exists()
    with pytest.raises(Recomputed):
        run_onnx_int8(clone)
    with pytest.raises(Recomputed):  # the figures are still required where asked for
        run_onnx_int8(dataclasses.replace(clone, figures=str(tmp_path / "no_figures")), require_model=False)
    # no float model either: the model is the one the results file records
    bare = dataclasses.replace(clone, onnx=str(tmp_path / "yolo.onnx"))
    assert run_onnx_int8(bare, require_model=False) == json.loads(out.read_text())
    with pytest.raises(DetrqError, match="ONNX file not found"):
        run_onnx_int8(bare)
    with pytest.raises(Recomputed):  # other settings: no hit
        run_onnx_int8(dataclasses.replace(clone, calib_images=3), require_model=False)


def test_notebook_stock_run_exports_only_on_a_miss(yolo, yolo_run, tmp_path, monkeypatch):
    import shutil

    from detrq.int8 import onnx_stock

    cfg, _ = yolo_run
    out = tmp_path / "r.json"
    out.write_text(Path(cfg.out).read_text())
    exported = []

    def export(name, path, data):
        exported.append(name)
        shutil.copy(yolo, path)
        return path

    monkeypatch.setattr(onnx_stock, "export_stock", export)
    monkeypatch.setattr(onnx_workflow, "image_sets", _recompute)
    bare = dataclasses.replace(cfg, onnx=str(tmp_path / "yolov8n.onnx"), out=str(out),
                               int8_out=str(tmp_path / "yolov8n_int8.onnx"))
    assert onnx_workflow.run_stock_onnx_int8("yolov8n", bare) == json.loads(out.read_text()) and not exported
    with pytest.raises(Recomputed):
        onnx_workflow.run_stock_onnx_int8("yolov8n", dataclasses.replace(bare, calib_images=3))
    assert exported == ["yolov8n"] and (tmp_path / "yolov8n.onnx").is_file()


def test_notebook_onnx_models_stay_out_of_the_committed_results(tmp_path):
    from detrq.io.paths import PROJECT_ROOT

    assert onnx_workflow.stock_onnx_dir("runs/int8/results") == PROJECT_ROOT.resolve() / "runs/int8/onnx_models"
    assert onnx_workflow.stock_onnx_dir("results") == PROJECT_ROOT / "runs/onnx_models"
    assert onnx_workflow.stock_onnx_dir(tmp_path / "results") == tmp_path.resolve() / "onnx_models"


def test_export_and_quantization_are_deterministic(yolo, data, tmp_path):
    again = export_stock("yolov8n", tmp_path / "again.onnx", data, image_size=96, bn_images=4)
    assert again.read_bytes() == yolo.read_bytes()
    model = onnx.load(str(yolo))
    batch, _ = load_batch(coco_images(data, "train", 2).paths, Preprocess(96, 96))
    for reduce_range in (False, True):
        first, _ = quantize_onnx(model, [batch], "images", reduce_range=reduce_range)
        second, _ = quantize_onnx(model, [batch], "images", reduce_range=reduce_range)
        assert first == second


def test_weights_use_seven_bits_only_where_the_cpu_would_saturate():
    assert needs_reduce_range(["avx2"]) and needs_reduce_range(["avx2", "avx512f", "avx512bw"])
    assert not needs_reduce_range(["avx2", "avx512f", "avx512bw", "avx512_vnni"])
    assert not needs_reduce_range(["avx2", "avx_vnni"]) and not needs_reduce_range(["asimddp", "i8mm"])


def test_retinanet_raw_head_gets_raw_output_agreement(data, tmp_path):
    path = export_stock("retinanet_resnet50_fpn", tmp_path / "retinanet.onnx", data, image_size=64, bn_images=2)
    r = run_onnx_int8(OnnxRunConfig(onnx=str(path), coco=str(data), out=str(tmp_path / "r.json"),
                                    **{**SMALL, "calib_images": 2, "eval_images": 2}), reuse=False)
    assert not r["decoded"] and r["AP_float"] is None and "raw-output agreement only" in r["AP_note"]
    assert set(r["raw_agreement"]) == {"bbox_regression", "cls_logits"}
    # the random head's box deltas are ~0.01 (torchvision's init), so int8 steps weigh more there than on logits
    assert r["raw_agreement"]["cls_logits"]["sqnr_db"] > 20
    assert r["size_reduction"] > 0.7
    # the exporter's Identity nodes on shared/equal biases are folded, so every conv runs as an int8 kernel
    assert "Conv" not in r["profile"]["int8_split"]["float_ops"]
    # ResNet's ReLUs are folded into the int8 convs; their float side is compared after the ReLU. Deep layers score
    # low here: 2 calibration images of 64 px leave their ranges short of what the evaluation image reaches.
    acts = r["activations"]
    first = next(iter(acts["sqnr_db"]))
    assert first.endswith("conv1/Conv") and acts["sqnr_db"][first] > 25
    assert acts["median_sqnr_db"] >= np.median(list(acts["sqnr_db_end_to_end"].values()))


def test_ssdlite_with_a_fixed_batch_measures_batch_one_and_says_so(data, tmp_path):
    path = export_stock("ssdlite320_mobilenet_v3_large", tmp_path / "ssdlite.onnx", data, bn_images=2)
    r = run_onnx_int8(OnnxRunConfig(onnx=str(path), coco=str(data), out=str(tmp_path / "r.json"),
                                    **{**SMALL, "calib_images": 2, "eval_images": 2}), reuse=False)
    assert r["input"]["batch"] == 1 and not r["dynamic_batch"]
    assert set(r["peak_memory_mb"]["int8"]) == {"1"} and "fixed at 1" in r["peak_memory_note"]
    assert r["image_size"] == 320 and not r["decoded"]


def test_decoder_recovers_ground_truth_through_the_letterbox(data):
    images = coco_images(data, "val", 4)
    pp = Preprocess(96, 160)  # not square: the letterbox pads along one axis only
    cats = sorted(images.coco.getCatIds())
    outputs, placements = [], []
    for path, image_id in zip(images.paths, images.ids):
        _, placement = prepare(Image.open(path), pp)
        anns = images.coco.imgToAnns[image_id]
        x, y, w, h = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4).T
        cx = (x + w / 2) * placement.scale_x + placement.pad_x
        cy = (y + h / 2) * placement.scale_y + placement.pad_y
        pred = np.zeros((4 + len(cats), 50), np.float32)
        pred[:4, :len(anns)] = [cx, cy, w * placement.scale_x, h * placement.scale_y]
        pred[4 + np.array([cats.index(a["category_id"]) for a in anns]), np.arange(len(anns))] = 0.9
        outputs.append(pred)
        placements.append(placement)
    dets = decode_yolo(np.stack(outputs), placements, cats)
    metrics = coco_metrics(images.coco, coco_detections(images, dets), images.ids)
    assert metrics["AP"] == pytest.approx(1.0)


def test_placement_maps_boxes_back():
    p = Placement(0.5, 0.5, 0.0, 16.0)
    assert p.to_original(np.array([[10.0, 26.0, 20.0, 36.0]])).tolist() == [[20.0, 20.0, 40.0, 40.0]]
    assert yolo_classes((1, 84, 8400)) == 80 and yolo_classes((1, 8400, 84)) is None and yolo_classes((1, 4)) is None


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter's notice
def test_tail_after_the_last_conv_stays_float_and_relu_pairs_compare():
    class WithTail(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3))

        def forward(self, x):
            y = self.convs(x).flatten(2)
            return torch.cat([y * 100, y.sigmoid()], 1)

    buf = io.BytesIO()
    torch.manual_seed(0)
    torch.onnx.export(WithTail().eval(), (torch.rand(1, 3, 16, 16),), buf, dynamo=False, input_names=["images"],
                      dynamic_axes={"images": {0: "batch"}})
    model = onnx.load_from_string(buf.getvalue())
    tail = {n.op_type for n in model.graph.node if n.name in decoding_tail(model)}
    assert {"Sigmoid", "Concat", "Mul"} <= tail and "Conv" not in tail
    x = np.random.default_rng(0).random((4, 3, 16, 16), dtype=np.float32)
    # As the workflow quantizes on this CPU.
    saturating = needs_reduce_range(cpu_int8_isa())
    int8, _ = quantize_onnx(model, [x], "images", reduce_range=saturating)
    diffs, end_to_end = layer_diffs(model, onnx.load_from_string(int8), x[:1], 1)
    assert len(diffs) == 2 and all(d.sqnr_db > 25 for d in diffs)
    if saturating:  # AVX2 without VNNI: full 8-bit weights clip the first conv's int16 pair sums
        full, _ = quantize_onnx(model, [x], "images", reduce_range=False)
        assert layer_diffs(model, onnx.load_from_string(full), x[:1], 1)[0][0].sqnr_db < 25
    assert diffs[0].float_map.min() >= 0  # compared after the ReLU the quantizer folded into the first conv


def test_exported_parts_carry_no_source_paths():
    """The dynamo exporter's stack traces held the checkout's and the venv's paths: a clone elsewhere had another
    int8 size (3,495,453 against 3,493,469 bytes). Stripped, the bytes depend on the graph and weights only."""
    import sys

    from detrq.int8.onnx_export import export_onnx

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    data = export_onnx(module, (torch.rand(1, 3, 8, 8),))
    model = onnx.load_from_string(data)
    assert all(not n.metadata_props and not n.doc_string for n in model.graph.node)
    assert sys.prefix.encode() not in data and str(Path(__file__).resolve().parent.parent).encode() not in data


def test_cpu_int8_instruction_sets_are_known_flags():
    assert set(cpu_int8_isa()) <= set(INT8_ISA_FLAGS)


# Bad input: one line, exit status 2, no traceback, earlier results kept.

def _image_model(path, op="Relu", domain="", shape=(None, 3, 32, 32)):
    node = helper.make_node(op, ["images"], ["out"], domain=domain)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


def _bad(tmp_path, capsys, args, expected):
    out = tmp_path / "results.json"
    out.write_text('{"earlier": true}')
    assert main(["int8", "--out", str(out), "--calib-images", "2", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert out.read_text() == '{"earlier": true}'


def test_bad_onnx_inputs_get_one_line(tmp_path, capsys, data, yolo):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 20)
    _bad(tmp_path, capsys, ["--onnx", str(text), "--coco", str(data)], "is not an ONNX model")
    table = _image_model(tmp_path / "table.onnx", shape=(None, 10))
    _bad(tmp_path, capsys, ["--onnx", str(table), "--coco", str(data)], "is not an image tensor")
    custom = _image_model(tmp_path / "custom.onnx", op="MagicDetect", domain="com.example")
    _bad(tmp_path, capsys, ["--onnx", str(custom), "--coco", str(data)], "onnxruntime cannot")
    _bad(tmp_path, capsys, ["--onnx", str(yolo), "--coco", str(data), "--resize", "none"],
         "is 128x128 px but the model's input is 96x96")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "labels.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    _bad(tmp_path, capsys, ["--onnx", str(yolo), "--images", str(empty)], "the calibration set is empty")
    (empty / "broken.jpg").write_text("not a jpeg")
    _bad(tmp_path, capsys, ["--onnx", str(yolo), "--images", str(empty)], "is not a readable image")
    _bad(tmp_path, capsys, ["--onnx", str(yolo), "--coco", str(data), "--input-size", "64"], "does not fit input")
    _bad(tmp_path, capsys, ["--coco", str(data)], "is for --onnx models")


def test_library_callers_get_detrq_errors(tmp_path):
    with pytest.raises(DetrqError, match="ONNX file not found"):
        run_onnx_int8(OnnxRunConfig(onnx=str(tmp_path / "missing.onnx"), images=str(tmp_path)))
