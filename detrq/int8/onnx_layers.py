"""Float vs int8, conv layer by conv layer, of an ONNX model and its QDQ int8 twin, from onnxruntime's intermediate
outputs: the data of the layer figures that ``plots`` draws for the PyTorch path too.

Each int8 conv is fed the float layer's input, through a subgraph of the int8 model from that input to the conv's
dequantized output, so a layer's difference is its own error (as ``activations.compare_layers`` isolates a layer in
PyTorch); the SQNR of every layer in the int8 model run end to end, where errors accumulate, comes beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch

from detrq.int8.activations import LayerDiff, activation_diff
from detrq.int8.onnx_model import image_input, run, session, with_outputs
from detrq.io.errors import DetrqError


def sqnr_db(f: np.ndarray, q: np.ndarray) -> float:
    """10 log10(sum f^2 / sum (f - q)^2), in float64; inf when identical."""
    noise = float(((f.astype(np.float64) - q) ** 2).sum())
    return float("inf") if noise == 0 else 10 * float(np.log10((f.astype(np.float64) ** 2).sum() / noise))


@dataclass(frozen=True)
class ConvPair:
    """One 2-D Conv of the float graph and the tensors that compare it with its int8 twin."""

    name: str  # the Conv node's name (the same in both graphs)
    layer_input: str  # the float tensor the conv reads (the int8 graph quantizes it with its own scale)
    float_output: str  # the conv's output as the next layer sees it, in the float graph
    int8_output: str  # the same in the int8 graph: the DequantizeLinear after the conv's QuantizeLinear


def conv_pairs(float_model: onnx.ModelProto, int8_model: onnx.ModelProto) -> list[ConvPair]:
    """Every Conv of the float graph in execution order that has an int8 twin. Where the quantizer folded a Relu
    into the conv, the float side is the Relu's output, as the conv's int8 output already is."""
    float_tensors = {o for n in float_model.graph.node for o in n.output} | {i.name for i in float_model.graph.input}
    int8_nodes = {n.name: n for n in int8_model.graph.node}
    producer = {o: n for n in int8_model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in int8_model.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    pairs = []
    for node in float_model.graph.node:
        q_node = int8_nodes.get(node.name)
        if node.op_type != "Conv" or q_node is None:
            continue
        t = q_t = q_node.output[0]
        for c in consumers.get(t, []):
            dq = [d for d in consumers.get(c.output[0], []) if d.op_type == "DequantizeLinear"]
            if c.op_type == "QuantizeLinear" and dq:
                q_t = dq[0].output[0]
        layer_input = q_node.input[0]
        while layer_input not in float_tensors and layer_input in producer:  # back through DQ(Q(x)) to x
            layer_input = producer[layer_input].input[0]
        f_t = t if t in float_tensors else q_t
        if f_t in float_tensors and layer_input in float_tensors:
            pairs.append(ConvPair(node.name, layer_input, f_t, q_t))
    return pairs


def subgraph(model: onnx.ModelProto, source: str, target: str) -> onnx.ModelProto:
    """The part of ``model`` that computes float tensor ``target`` from float tensor ``source`` (and weights)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    weights = {t.name: t for t in model.graph.initializer}
    keep: set[int] = set()
    stack = [target]
    while stack:
        t = stack.pop()
        if t == source or t in weights or not t:
            continue
        if t not in producer:
            raise DetrqError(f"{target} does not follow from {source} alone in the int8 graph")
        node = producer[t]
        if id(node) not in keep:
            keep.add(id(node))
            stack += list(node.input)
    nodes = [n for n in model.graph.node if id(n) in keep]
    used = [weights[t] for n in nodes for t in n.input if t in weights]
    def value(name: str) -> onnx.ValueInfoProto:
        return onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)

    graph = onnx.helper.make_graph(nodes, "layer", [value(source)], [value(target)],
                                   initializer=list({w.name: w for w in used}.values()))
    return onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def layer_diffs(float_model: onnx.ModelProto, int8_model: onnx.ModelProto, x: np.ndarray, threads: int
                ) -> tuple[list[LayerDiff], dict[str, float]]:
    """Float vs int8 output of every conv layer (4-D outputs) on one image ``x`` (batch 1), from onnxruntime's
    intermediate outputs: each int8 conv fed the float layer's input (a subgraph of the int8 model from that input
    to the conv's dequantized output, as the PyTorch path isolates a layer), and the per-layer SQNR of the int8
    model run end to end, where errors accumulate."""
    pairs = conv_pairs(float_model, int8_model)
    if not pairs:
        raise DetrqError("the model has no Conv layer whose float and int8 outputs can be compared")
    feed = {image_input(float_model).name: x}
    f_names = list(dict.fromkeys([p.float_output for p in pairs] + [p.layer_input for p in pairs]))
    f_vals = dict(zip(f_names, run(session(with_outputs(float_model, f_names), threads), feed, f_names)))
    q_names = [p.int8_output for p in pairs]
    q_vals = dict(zip(q_names, run(session(with_outputs(int8_model, q_names), threads), feed, q_names)))
    diffs, end_to_end = [], {}
    for p in pairs:
        f_out = f_vals[p.float_output]
        if f_out.ndim != 4:
            continue
        end_to_end[p.name] = sqnr_db(f_out[:1], q_vals[p.int8_output][:1])
        layer = subgraph(int8_model, p.layer_input, p.int8_output)
        (q_out,) = run(session(layer, threads), {p.layer_input: f_vals[p.layer_input]})
        diffs.append(activation_diff(p.name, torch.from_numpy(f_out[:1]), torch.from_numpy(q_out[:1])))
    return diffs, end_to_end
