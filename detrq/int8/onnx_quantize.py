"""Static INT8 of a user's ONNX model with onnxruntime's ``quantize_static``: QDQ format, per-channel int8
weights, uint8 activations calibrated with MinMax over the calibration batches.

Where the weights use 7 bits (``reduce_range``): x86 CPUs with AVX2 but no VNNI dot products multiply uint8 by int8
in pairs summed into int16 with saturation, so full-range weights against full-range activations clip. On such a
CPU (``needs_reduce_range``) the weights are quantized to 7 bits, as onnxruntime's documentation advises and as
PyTorch's fbgemm qconfig does; with VNNI (or on ARM) they use all 8. The results record which (``reduce_range``).

What stays float (``decoding_tail``): every node from which no Conv, ConvTranspose, Gemm or MatMul can be reached,
i.e. the decoding after the last learned layer (reshapes, concatenations, sigmoid, box decoding, NMS). Quantizing
it saves no compute and can destroy outputs: a YOLO export concatenates boxes in pixels (0..640) with class
scores (0..1) into one tensor, where one uint8 scale would leave the scores a single step. This is the ONNX twin
of the PyTorch plan, where anchors, box decoding and NMS stay float.
"""

from __future__ import annotations

import logging
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from detrq.io.errors import DetrqError

LEARNED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# The int8 dot-product instructions that sum u8 x s8 products in int32 (no int16 saturation).
DOT_PRODUCT_ISA = ("avx512_vnni", "avx_vnni", "amx_int8")


def needs_reduce_range(isa: Sequence[str]) -> bool:
    """Whether weights should be quantized to 7 bits on a CPU with int8 instruction sets ``isa``
    (``io.results.cpu_int8_isa``): AVX2 without any of ``DOT_PRODUCT_ISA`` (see the module docstring)."""
    return "avx2" in isa and not any(f in isa for f in DOT_PRODUCT_ISA)


def static_qdq(src: Path, dst: Path, reader: Any, *, reduce_range: bool, nodes_to_exclude: Sequence[str] = ()
               ) -> None:
    """onnxruntime's ``quantize_static`` of the file ``src`` into ``dst``: QDQ, per-channel int8 weights (7-bit
    with ``reduce_range``), uint8 activations, MinMax over the batches of the ``CalibrationDataReader`` ``reader``;
    ``nodes_to_exclude`` stay float. Its failures are one ``DetrqError``."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # quantize_static's pre-processing hint, on every call
    try:
        quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=list(nodes_to_exclude))
    except Exception as e:  # onnxruntime's own failures while calibrating or rewriting the graph
        raise DetrqError(f"onnxruntime could not quantize the model: {str(e).strip().splitlines()[0][:300]}"
                         ) from None
    finally:
        root.setLevel(level)


def prepared(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` that ``quantize_static`` handles fully: every node named (nodes are excluded by name),
    and Identity nodes of initializers folded away. PyTorch's exporter routes weights that are equal or shared
    (all-zero FPN biases, RetinaNet's head applied per level) through such Identities; a conv whose bias comes from
    one keeps a float bias, and onnxruntime then cannot fuse it into an int8 QLinearConv and runs it in float."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    weights = {t.name for t in out.graph.initializer}
    graph_outputs = {o.name for o in out.graph.output}
    alias = {n.output[0]: n.input[0] for n in out.graph.node
             if n.op_type == "Identity" and n.input[0] in weights and n.output[0] not in graph_outputs}
    kept = [n for n in out.graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for node in kept:
        for i, t in enumerate(node.input):
            if t in alias:
                node.input[i] = alias[t]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    taken = {n.name for n in out.graph.node}
    for i, node in enumerate(out.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
    return out


def decoding_tail(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes from which no learned layer (``LEARNED_OPS``) is reachable, in graph order."""
    consumers: dict[str, list[int]] = defaultdict(list)
    nodes = list(model.graph.node)
    for i, node in enumerate(nodes):
        for t in node.input:
            consumers[t].append(i)
    reaches = [False] * len(nodes)
    for i in reversed(range(len(nodes))):  # ONNX graphs are topologically sorted
        node = nodes[i]
        reaches[i] = node.op_type in LEARNED_OPS or any(reaches[j] for t in node.output for j in consumers[t])
    return [n.name for n, r in zip(nodes, reaches) if not r]


def quantize_onnx(model: onnx.ModelProto, calibration: list[np.ndarray], input_name: str, *,
                  reduce_range: bool) -> tuple[bytes, dict]:
    """The int8 QDQ model as bytes, and what was quantized: ``{"float_nodes": tail node names, "float_ops": their
    op types with counts}``. Deterministic: the same model, batches and ``reduce_range`` give the same bytes."""
    from onnxruntime.quantization import CalibrationDataReader

    if not calibration:
        raise DetrqError("the calibration set is empty; pass at least one image")
    model = prepared(model)
    tail = decoding_tail(model)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            item = next(self.items, None)
            return None if item is None else {input_name: item}

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, str(src))
        static_qdq(src, dst, Reader(), reduce_range=reduce_range, nodes_to_exclude=tail)
        data = dst.read_bytes()
    ops: dict[str, int] = defaultdict(int)
    kinds = {n.name: n.op_type for n in model.graph.node}
    for name in tail:
        ops[kinds[name]] += 1
    return data, {"float_nodes": tail, "float_ops": dict(sorted(ops.items()))}


def quantized_fraction(int8: onnx.ModelProto) -> dict[str, Any]:
    """How many of the learned layers (``LEARNED_OPS``) of the int8 graph take a dequantized int8 weight."""
    produced_by = {o: n for n in int8.graph.node for o in n.output}
    learned = [n for n in int8.graph.node if n.op_type in LEARNED_OPS]
    quantized = [n.name for n in learned if len(n.input) > 1
                 and getattr(produced_by.get(n.input[1]), "op_type", None) == "DequantizeLinear"]
    return {"learned_layers": len(learned), "int8_weights": len(quantized)}
