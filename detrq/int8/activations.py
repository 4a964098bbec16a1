"""Layer-by-layer float-vs-int8 activations: every conv layer fed the same (float) input.

``compare_layers`` runs the float model once with hooks that record each conv layer's input and output, then
feeds each int8 layer the float layer's input (quantized with the int8 layer's own input scale and zero point,
read from the quantized tensor that layer receives in a real int8 run), so a layer's difference is its own
error, not the error accumulated upstream. ``activation_diff`` turns a pair of outputs into the maps and numbers
the plots show. Layers are matched by name: FX keeps the conv's module name for the fused conv(-bn)(-relu)
module, and ``fused_float_reference`` gives the float model with the same fusions, so both sides compute the
same function (conv + folded BN + ReLU). Any pair of models with same-named Conv2d layers works too.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from detrq.int8.plan import fold_frozen_batchnorm
from detrq.io.errors import DetrqError


@dataclass
class LayerDiff:
    """Float vs int8 output of one layer for one input image ([H, W] maps are channel averages)."""

    name: str
    float_map: Tensor  # mean over channels of the float output
    int8_map: Tensor  # mean over channels of the int8 output
    abs_diff_map: Tensor  # mean over channels of |float - int8|
    rel_diff_map: Tensor  # abs_diff_map / mean over channels of |float|, in percent
    sqnr_db: float  # 10 log10(sum float^2 / sum (float - int8)^2); inf when identical
    float_values: Tensor  # flattened outputs (a strided sample of at most max_values), for the hexbin
    int8_values: Tensor


def activation_diff(name: str, f: Tensor, q: Tensor, eps: float = 1e-6, max_values: int = 20000) -> LayerDiff:
    """Compare one layer's float output ``f`` and int8 output ``q`` ([C, H, W] or [1, C, H, W]).

    The relative map divides by the float magnitude plus ``eps`` times its maximum, so that pixels where the
    float activation is ~0 (e.g. after a ReLU) do not blow up to meaningless percentages. Only a strided sample
    of ``max_values`` values is kept for the hexbin: a ResNet-50 at 800 px has about 10^8 conv outputs.
    """
    f, q = f.detach().float().squeeze(0), q.detach().float().squeeze(0)
    if f.shape != q.shape or f.dim() != 3:
        raise DetrqError(f"layer {name}: float and int8 outputs must both be [C, H, W], got {tuple(f.shape)} "
                         f"and {tuple(q.shape)}")
    err = f - q
    abs_map = err.abs().mean(0)
    mag = f.abs().mean(0)
    noise = float(err.pow(2).sum())
    sqnr = math.inf if noise == 0 else 10 * math.log10(float(f.pow(2).sum()) / noise)
    step = max(1, f.numel() // max_values)
    return LayerDiff(name, f.mean(0), q.mean(0), abs_map, 100 * abs_map / (mag + eps * float(mag.max()) + 1e-12),
                     sqnr, f.flatten()[::step].clone(), q.flatten()[::step].clone())


def fused_float_reference(model: nn.Module) -> nn.Module:
    """A float copy of ``model`` with FX's x86 fusions (conv-bn folded, conv-relu fused) and the same names as
    the FX-quantized model, so the two compute the same function layer by layer."""
    from torch.ao.quantization.quantize_fx import fuse_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fuse_fx(fold_frozen_batchnorm(copy.deepcopy(model)).eval())


def _conv_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv layers by name: Conv2d, FX's fused float conv(-relu) and quantized convs (which are not Conv2d)."""
    from torch.ao.nn.intrinsic import _FusedModule
    from torch.ao.nn.quantized.modules.conv import _ConvNd as QuantizedConv

    def is_conv(m: nn.Module) -> bool:
        return isinstance(m, (nn.Conv2d, QuantizedConv)) or (isinstance(m, _FusedModule)
                                                              and isinstance(m[0], nn.Conv2d))

    return {n: m for n, m in model.named_modules() if is_conv(m)}


def _record(model: nn.Module, names: Sequence[str], x: Tensor, outputs: bool) -> dict[str, tuple]:
    """Run ``model(x)`` and keep each named layer's first input (and output if asked)."""
    seen: dict[str, tuple] = {}

    def hook(name):
        def fn(_m, args, out):
            seen.setdefault(name, (args[0].detach(), out.detach() if outputs else None))
        return fn

    hooks = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def compare_layers(float_model: nn.Module, int8_model: nn.Module, x: Tensor) -> list[LayerDiff]:
    """Per conv layer (in execution order), the int8 layer's output on the float layer's input vs the float output.

    ``x`` is one input batch of size 1. Layers are the conv layers present under the same name in both models.
    """
    if x.shape[0] != 1:
        raise DetrqError(f"compare_layers takes one image (batch 1), got a batch of {x.shape[0]}")
    float_layers, int8_layers = _conv_layers(float_model), _conv_layers(int8_model)
    names = [n for n in float_layers if n in int8_layers]
    if not names:
        raise DetrqError("the float and int8 models share no conv layer names; pass an FX-quantized model and "
                         "fused_float_reference(float model)")
    floats = _record(float_model, names, x, outputs=True)
    int8_inputs = _record(int8_model, names, x, outputs=False)
    order = [n for n in floats]  # dict insertion order = execution order
    diffs = []
    with torch.no_grad():
        for name in order:
            f_in, f_out = floats[name]
            q_in = int8_inputs[name][0]
            if q_in.is_quantized:
                f_in = torch.quantize_per_tensor(f_in, q_in.q_scale(), q_in.q_zero_point(), q_in.dtype)
            q_out = int8_layers[name](f_in)
            diffs.append(activation_diff(name, f_out, q_out.dequantize() if q_out.is_quantized else q_out))
    return diffs
