"""ONNX export and onnxruntime execution of model parts, and the "onnxruntime" int8 backend.

``export_onnx`` writes a module to ONNX (the dynamo exporter, input dimensions dynamic, no provenance metadata)
and ``OrtModule`` runs such a graph in onnxruntime behind an ``nn.Module`` interface that takes and returns torch
tensors in the same structure (a dict of FPN levels stays a dict), so an ORT part can be dropped into a torchvision
detector in place of the PyTorch part. The ONNX bytes are the module's one buffer: its serialized size is the
graph's size.
The int8 backend exports the float part, calibrates on the inputs the part received during calibration and
runs ``onnxruntime.quantization.quantize_static`` (QDQ format, per-channel int8 weights, uint8 activations).
"""

from __future__ import annotations

import io
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from detrq.int8.onnx_quantize import needs_reduce_range, static_qdq
from detrq.int8.plan import Backend
from detrq.io.errors import DetrqError
from detrq.io.results import cpu_int8_isa


def export_onnx(module: nn.Module, example: tuple[Tensor, ...]) -> bytes:
    """``module`` (eval mode) as ONNX bytes, with every input dimension dynamic where the graph
    allows (batch, the RoI count, an FPN level's height and width)."""
    module.eval()
    dynamic = tuple({d: torch.export.Dim.AUTO for d in range(t.dim())} for t in example)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, example, dynamo=True, dynamic_shapes=dynamic, verbose=False,
                                    external_data=False)
    if program is None:
        raise DetrqError(f"ONNX export of {type(module).__name__} produced nothing")
    buf = io.BytesIO()
    program.save(buf)
    return strip_provenance(buf.getvalue())


def strip_provenance(onnx_bytes: bytes) -> bytes:
    """ONNX bytes without the exporter's per-node provenance: the dynamo exporter stores each node's Python
    stack trace (absolute paths of the checkout and the venv, line numbers), so the same model exported from
    another folder or commit had a different size. What is left depends only on the graph and its weights."""
    import onnx

    model = onnx.load_from_string(onnx_bytes)
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for item in [*graph.node, *graph.value_info, *graph.input, *graph.output, *graph.initializer]:
            del item.metadata_props[:]
            item.ClearField("doc_string")
        graphs += [a.g for n in graph.node for a in n.attribute if a.HasField("g")]
        graphs += [g for n in graph.node for a in n.attribute for g in a.graphs]
    return model.SerializeToString()


class OrtModule(nn.Module):
    """An ONNX graph run by onnxruntime on CPU, called like the PyTorch module it was exported from.

    ``out_spec`` is the pytree structure of the original module's output; ORT's flat outputs are put back into
    it. Threads follow ``torch.get_num_threads()`` at session creation, for a like-for-like comparison.
    """

    def __init__(self, onnx_bytes: bytes, out_spec: str) -> None:
        super().__init__()
        self.register_buffer("onnx_model", torch.frombuffer(bytearray(onnx_bytes), dtype=torch.uint8))
        self.out_spec = out_spec
        self._session = None

    def __getstate__(self):
        # An InferenceSession cannot be pickled; it is rebuilt from the ONNX bytes on first use.
        return {**self.__dict__, "_session": None}

    def session(self):
        if self._session is None:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = torch.get_num_threads()
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3  # errors only: ORT warns about every unused initializer otherwise
            self._session = ort.InferenceSession(self.onnx_model.numpy().tobytes(), opts,
                                                 providers=["CPUExecutionProvider"])
        return self._session

    def forward(self, *args: Tensor):
        sess = self.session()
        feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(sess.get_inputs(), args)}
        outputs = [torch.from_numpy(o) for o in sess.run(None, feeds)]
        return pytree.tree_unflatten(outputs, pytree.treespec_loads(self.out_spec))


def to_ort(module: nn.Module, example: tuple[Tensor, ...]) -> OrtModule:
    """The float ``module`` exported to ONNX and wrapped for onnxruntime."""
    with torch.no_grad():
        _, spec = pytree.tree_flatten(module(*example))
    return OrtModule(export_onnx(module, example), pytree.treespec_dumps(spec))


class _InputRecorder(nn.Module):
    """Runs the float module and keeps every input it gets, for onnxruntime's calibration afterwards."""

    def __init__(self, module: nn.Module, example: tuple[Tensor, ...]) -> None:
        super().__init__()
        self.module = module
        self.example = example
        self.seen: list[tuple[np.ndarray, ...]] = []

    def forward(self, *args: Tensor):
        self.seen.append(tuple(a.detach().cpu().numpy() for a in args))
        return self.module(*args)


def quantize_ort(module: nn.Module, example: tuple[Tensor, ...], calibration: list[tuple[np.ndarray, ...]]
                 ) -> OrtModule:
    """``module`` exported to ONNX and statically quantized by onnxruntime (QDQ, per-channel, MinMax; 7-bit weights
    where the CPU needs them, ``onnx_quantize.needs_reduce_range``)."""
    from onnxruntime.quantization import CalibrationDataReader

    if not calibration:
        raise DetrqError("the calibration set is empty; pass at least one image")
    float_model = to_ort(module, example)
    names = [i.name for i in float_model.session().get_inputs()]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calibration)

        def get_next(self):
            item = next(self.items, None)
            return None if item is None else dict(zip(names, item))

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(float_model.onnx_model.numpy().tobytes())
        static_qdq(src, dst, Reader(), reduce_range=needs_reduce_range(cpu_int8_isa()))
        return OrtModule(dst.read_bytes(), float_model.out_spec)


def ort_backend() -> Backend:
    """The "onnxruntime" backend of ``quantize_int8``."""

    def prepare(module: nn.Module, example: tuple) -> nn.Module:
        return _InputRecorder(module.eval(), example)

    def convert(recorder: nn.Module) -> nn.Module:
        return quantize_ort(recorder.module, recorder.example, recorder.seen)

    return Backend(prepare, convert)


def _sqnr_db(ref: Tensor, x: Tensor) -> float:
    noise = float((ref - x).pow(2).sum())
    return float("inf") if noise == 0 else 10 * float(torch.log10(ref.pow(2).sum() / noise))


def onnx_report(model: nn.Module, qmodel: nn.Module, images: list[Tensor], repeats: int = 7) -> dict:
    """For each part that the onnxruntime backend quantized (``qmodel`` holds ``OrtModule`` parts): its float
    export run in onnxruntime and its int8 QDQ graph, timed as a pair on the inputs the part gets from
    ``images``, and compared with the PyTorch float part (max abs difference, SQNR in dB) and ONNX sizes."""
    from detrq.int8.measure import paired_latency
    from detrq.int8.plan import capture_inputs, traceable_copy

    parts = [name for name, m in qmodel.named_modules() if isinstance(m, OrtModule)]
    if not parts:
        raise DetrqError("onnx_report needs a model quantized with backend 'onnxruntime'")
    # The parts live at the paths of the traceable copy the backend quantized (the RPN head per level).
    model = traceable_copy(model)
    inputs = capture_inputs(model, tuple(parts), images)
    report = {}
    for name in parts:
        torch_part, int8_part = model.get_submodule(name), qmodel.get_submodule(name)
        example = inputs[name]
        float_part = to_ort(torch_part, example)
        with torch.no_grad():
            ref, _ = pytree.tree_flatten(torch_part(*example))
        flat_f, _ = pytree.tree_flatten(float_part(*example))
        flat_q, _ = pytree.tree_flatten(int8_part(*example))
        ref_all, f_all, q_all = (torch.cat([t.flatten() for t in ts]) for ts in (ref, flat_f, flat_q))
        lat = paired_latency(lambda: float_part(*example), lambda: int8_part(*example), repeats=repeats)
        report[name] = {
            "input_shapes": [list(t.shape) for t in example],
            "onnx_bytes": {"float": float_part.onnx_model.numel(), "int8_qdq": int8_part.onnx_model.numel()},
            "ort_latency_s": {"float": lat["float_s"], "int8": lat["int8_s"], "ratio": lat["ratio"]},
            "ort_float_vs_torch_max_abs_diff": float((f_all - ref_all).abs().max()),
            "ort_int8_vs_torch_sqnr_db": _sqnr_db(ref_all, q_all),
            "ort_float_vs_torch_sqnr_db": _sqnr_db(ref_all, f_all),
        }
    return report
