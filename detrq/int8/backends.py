"""The PyTorch int8 backends behind ``quantize_int8``: FX graph mode (torch.ao) and PT2E (torch.export + torchao).

Both quantize to x86 (fbgemm/oneDNN) int8: per-channel symmetric weights, per-tensor affine activations.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from detrq.int8.plan import Backend


def fx_backend() -> Backend:
    """FX graph mode with ``get_default_qconfig_mapping("x86")``: conv-bn-relu and linear-relu fused, int8
    kernels from fbgemm in eager mode. torch.ao marks FX as deprecated, but it is present and fast."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    mapping = get_default_qconfig_mapping("x86")

    def prepare(module: nn.Module, example: tuple) -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the deprecation notice, once per call
            return prepare_fx(module.eval(), mapping, example_inputs=example)

    def convert(module: nn.Module) -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return convert_fx(module)

    return Backend(prepare, convert)


class _UntiedBasicBlock(BasicBlock):
    """torchvision's BasicBlock with a second ReLU module for the output: the stock block calls ``self.relu``
    twice, and X86InductorQuantizer then sees one module feeding two patterns and mis-annotates the graph."""

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu_out(out + identity)


class _UntiedBottleneck(Bottleneck):
    """torchvision's Bottleneck with separate ReLU modules (see ``_UntiedBasicBlock``)."""

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu_mid(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu_out(out + identity)


def untie_relus(model: nn.Module) -> nn.Module:
    """Give every ReLU use in torchvision ResNet blocks its own module, in place (same function, same weights)."""
    for m in model.modules():
        if type(m) is BasicBlock:
            m.__class__ = _UntiedBasicBlock
            m.relu_out = nn.ReLU(inplace=True)
        elif type(m) is Bottleneck:
            m.__class__ = _UntiedBottleneck
            m.relu_mid, m.relu_out = nn.ReLU(inplace=True), nn.ReLU(inplace=True)
    return model


def _drop_unused_float_weights(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """convert_pt2e folds int8 weights into new constants but leaves the float parameters attached; delete the
    ones no graph node reads any more, so the module holds (and serializes) only the int8 copies."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used and not any(u.startswith(name + ".") for u in used):
            parent, _, leaf = name.rpartition(".")
            owner = gm.get_submodule(parent)
            owner._parameters.pop(leaf, None)
            owner._buffers.pop(leaf, None)
    return gm


def pt2e_backend(compile: bool = False) -> Backend:
    """torch.export (every input dimension dynamic where the graph allows) + ``prepare_pt2e/convert_pt2e`` with ``X86InductorQuantizer``.

    The converted graph holds int8 weights and explicit quantize/dequantize ops; eager execution runs them as
    reference float ops, so it is accurate but slow. With ``compile``, each part goes through ``torch.compile``
    with inductor's ``freezing`` (weights folded as constants), which lowers the q/dq patterns to oneDNN int8
    kernels.
    """
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (X86InductorQuantizer,
                                                                            get_default_x86_inductor_quantization_config)

    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())

    def prepare(module: nn.Module, example: tuple) -> nn.Module:
        untie_relus(module.eval())
        # Every dim dynamic where the graph allows: batch, the box head's RoI count, and the RPN head's
        # per-level height and width (one module runs on every FPN level).
        dynamic = tuple({d: torch.export.Dim.AUTO for d in range(t.dim())} for t in example)
        exported = torch.export.export(module, example, dynamic_shapes=dynamic).module()
        return prepare_pt2e(exported, quantizer)

    def convert(module: nn.Module) -> nn.Module:
        # Exported modules refuse .eval()/.train(); allow them (no-ops here: batch norm is folded) so that the
        # int8 model is used like any other module by the evaluation code.
        converted = allow_exported_model_train_eval(_drop_unused_float_weights(convert_pt2e(module)))
        if not compile:
            return converted
        # oneDNN's int8 conv prepack has no dynamic-shape lowering: conv graphs recompile per input shape (a few
        # batch sizes); conv-free graphs (the box head, whose RoI count changes every call) compile dynamic.
        has_conv = any("conv" in str(n.target) for n in converted.graph.nodes if n.op == "call_function")
        # Set globally, as torchao's recipe does: passed as a per-call option, freezing leaves prepack ops that
        # inductor's fake-tensor pass cannot run.
        torch._inductor.config.freezing = True
        return torch.compile(converted, dynamic=not has_conv)

    return Backend(prepare, convert)
