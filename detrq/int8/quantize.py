"""The one entry point of INT8 post-training quantization: ``quantize_int8(model, calib_images, backend)``.

What gets quantized is ``plan.quantization_plan``'s policy (see ``plan.py``).

Backends: "fx" (``torch.ao`` FX graph mode, x86 qconfig; the fastest in eager mode), "pt2e" (``torch.export`` +
torchao ``prepare_pt2e/convert_pt2e`` with ``X86InductorQuantizer``; needs ``torch.compile`` to be fast), and
"onnxruntime" (each part exported to ONNX and quantized with ``quantize_static``, QDQ, per-channel weights).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from detrq.int8.plan import Backend, calibration_batches, capture_inputs, quantization_plan, traceable_copy
from detrq.io.errors import DetrqError

BACKENDS = ("fx", "pt2e", "onnxruntime")


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, module)


def _backend(name: str, compile: bool) -> Backend:
    # Imported on demand: each backend pulls in a different stack (torch.ao, torchao, onnxruntime).
    if name == "fx":
        from detrq.int8.backends import fx_backend

        return fx_backend()
    if name == "pt2e":
        from detrq.int8.backends import pt2e_backend

        return pt2e_backend(compile)
    if name == "onnxruntime":
        from detrq.int8.onnx_export import ort_backend

        return ort_backend()
    raise DetrqError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")


def _check_compile(backend: str, compile: bool) -> None:
    if compile and backend != "pt2e":
        raise DetrqError(f"compile=True is for the pt2e backend (it lowers PT2E's quantize/dequantize ops to int8 "
                         f"kernels); {backend!r} runs int8 kernels already")


def quantize_int8(model: nn.Module, calib_images: Sequence[Tensor] | Tensor, backend: str = "fx", *,
                  parts: Sequence[str] | None = None, batch_size: int = 8, compile: bool = False) -> nn.Module:
    """An int8 copy of ``model`` calibrated on ``calib_images`` ([C, H, W] images, [0, 1] for detectors).

    The float model is left untouched. The copy takes the same inputs and returns the same structure, so the
    same evaluation code scores it. Activations are calibrated with min/max (histogram for fx's default x86
    qconfig) observers over all calibration images, in batches of ``batch_size``. ``compile`` (pt2e only) wraps
    each int8 part in ``torch.compile`` with frozen weights; it compiles on the first call. ``parts``: see
    ``quantization_plan``.
    """
    _check_compile(backend, compile)
    backend_impl = _backend(backend, compile)
    plan = quantization_plan(model, parts)
    batches = calibration_batches(plan, calib_images, batch_size)
    qmodel = traceable_copy(model)
    examples = capture_inputs(qmodel, plan.targets, batches[0])
    prepared = {t: backend_impl.prepare(qmodel.get_submodule(t), examples[t]) for t in plan.targets}
    if plan.targets == ("",):
        qmodel = prepared[""]
    else:
        for t, m in prepared.items():
            _set_submodule(qmodel, t, m)
    with torch.no_grad():
        for batch in batches:
            qmodel(batch)
    if plan.targets == ("",):
        return backend_impl.convert(qmodel)
    for t, m in prepared.items():
        _set_submodule(qmodel, t, backend_impl.convert(m))
    return qmodel
