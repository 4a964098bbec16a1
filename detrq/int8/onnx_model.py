"""A user's ONNX model as detrq runs it: loading and checking the file, its image input, onnxruntime sessions,
intermediate outputs and onnxruntime's per-operator profile.

The model is the user's file; detrq never re-exports it. Every way the file can be unfit (not ONNX, an input that
is not an image tensor, a graph onnxruntime cannot load or run) is one ``DetrqError`` line naming the problem.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from detrq.io.errors import DetrqError

_FLOAT_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}


@dataclass(frozen=True)
class ImageInput:
    """The model's one image input as the graph declares it; None where a dimension is dynamic."""

    name: str
    layout: str  # "NCHW" or "NHWC"
    batch: int | None
    height: int | None
    width: int | None
    dtype: str  # numpy dtype name of the input ("float32" or "float16")

    @property
    def dynamic_batch(self) -> bool:
        return self.batch is None


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """The ONNX model in ``path``, checked to be one (a protobuf with a graph of nodes)."""
    path = Path(path)
    if not path.is_file():
        raise DetrqError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf raises its own DecodeError, and onnx others, for a file that is not ONNX
        raise DetrqError(f"{path} is not an ONNX model ({type(e).__name__}); pass a .onnx file") from None
    if model.ir_version == 0 or not model.graph.node:
        raise DetrqError(f"{path} is not an ONNX model (no graph in it); pass a .onnx file")
    return model


def _dims(value: onnx.ValueInfoProto) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in value.type.tensor_type.shape.dim]


def image_input(model: onnx.ModelProto, layout: str | None = None) -> ImageInput:
    """The graph's image input: exactly one input (besides initializers) of floats, [N, 3, H, W] or
    [N, H, W, 3]; ``layout`` forces "NCHW" or "NHWC" where both would fit."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise DetrqError(f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); detrq "
                         "quantizes detectors with one image input")
    value = inputs[0]
    dims, elem = _dims(value), value.type.tensor_type.elem_type
    shape = "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
    if elem not in _FLOAT_TYPES or len(dims) != 4:
        raise DetrqError(f"input {value.name!r} ({onnx.TensorProto.DataType.Name(elem).lower()} {shape}) is not "
                         "an image tensor: detrq needs float [N, 3, H, W] or [N, H, W, 3]")
    fits = [lay for lay, c in (("NCHW", dims[1]), ("NHWC", dims[3])) if c in (3, None)]
    if layout is not None:
        if layout not in ("NCHW", "NHWC"):
            raise DetrqError(f"unknown layout {layout!r}; use NCHW or NHWC")
        if layout not in fits:
            raise DetrqError(f"input {value.name!r} {shape} is not {layout} with 3 channels")
        fits = [layout]
    if not fits:
        raise DetrqError(f"input {value.name!r} {shape} is not an image tensor: no dimension of 3 channels at "
                         "position 1 (NCHW) or 3 (NHWC)")
    chosen = fits[0] if len(fits) == 1 or dims[1] == 3 else "NHWC"
    h, w = (dims[2], dims[3]) if chosen == "NCHW" else (dims[1], dims[2])
    return ImageInput(value.name, chosen, dims[0], h, w, np.dtype(_FLOAT_TYPES[elem]).name)


def session(model: onnx.ModelProto | bytes | str | Path, threads: int = 1, profile_dir: str | None = None):
    """A CPU onnxruntime session with ``threads`` intra-op threads (one inter-op thread: comparable with the
    PyTorch backends); ``profile_dir`` turns on onnxruntime's per-operator profiling into that folder."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: ORT warns about unused initializers and the like otherwise
    if profile_dir is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(profile_dir) / "ort_profile")
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    src = str(src) if isinstance(src, Path) else src
    try:
        return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/NotImplemented types
        raise DetrqError(f"onnxruntime cannot load the model: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def run(sess, feed: dict[str, np.ndarray], names: list[str] | None = None) -> list[np.ndarray]:
    """``sess.run`` with onnxruntime's failures turned into one line."""
    try:
        return sess.run(names, feed)
    except Exception as e:
        raise DetrqError(f"onnxruntime cannot run the model: {_first_line(e)}") from None


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also returns the (float) tensors ``names``: onnxruntime's intermediate outputs."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {o.name for o in out.graph.output}
    out.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                            for n in names if n not in present)
    return out


def profile_ops(model: onnx.ModelProto, feed: dict[str, np.ndarray], threads: int, runs: int = 3) -> dict[str, Any]:
    """onnxruntime's profile of ``runs`` runs after one warm-up: time per operator type (ms per run, summed
    over nodes) and each type's share of the operator total, largest first."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = session(model, threads, profile_dir=tmp)
        run(sess, feed)
        for _ in range(runs):
            run(sess, feed)
        trace = Path(sess.end_profiling())
        events = json.loads(trace.read_text())
    per_op: dict[str, float] = defaultdict(float)
    for e in events:
        args = e.get("args", {})
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and "op_name" in args:
            per_op[args["op_name"]] += e["dur"]
    # the warm-up run's kernels are in the trace too: the total covers runs + 1 runs
    ms = {op: us / 1000 / (runs + 1) for op, us in sorted(per_op.items(), key=lambda kv: -kv[1])}
    total = sum(ms.values()) or 1.0
    return {"ms_per_run": ms, "share": {op: v / total for op, v in ms.items()}, "runs": runs}


class OrtImageModel(nn.Module):
    """An ONNX image model run by onnxruntime, called with a torch batch [N, 3, H, W] of [0, 1] pixels (the
    peak-memory child's input); ``scale``/``mean``/``std``/``layout`` turn it into the model's input."""

    def __init__(self, path: str, layout: str, scale: float, mean: list[float], std: list[float], dtype: str,
                 threads: int = 1) -> None:
        super().__init__()
        self.sess = session(Path(path), threads)
        self.name = self.sess.get_inputs()[0].name
        self.layout, self.scale, self.dtype = layout, scale, dtype
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def forward(self, x: Tensor) -> list[np.ndarray]:
        a = x.numpy().transpose(0, 2, 3, 1) * 255 * self.scale
        a = (a - self.mean) / self.std
        if self.layout == "NCHW":
            a = a.transpose(0, 3, 1, 2)
        return run(self.sess, {self.name: np.ascontiguousarray(a, dtype=self.dtype)})


def memory_model(path: str, layout: str, scale: float, mean: list[float], std: list[float], dtype: str,
                 threads: int = 1) -> OrtImageModel:
    """The factory that ``measure.peak_memory``'s fresh processes call (JSON-able arguments)."""
    torch.set_num_threads(threads)
    return OrtImageModel(path, layout, scale, mean, std, dtype, threads)
