"""GPTQ (Frantar et al., 2022): per-channel weight quantization with error compensation from input Hessians.

The quantizer ``gptq`` of ``quantizers.py`` lives here. It keeps the per-channel round-to-nearest grid
(``channel_scale``: ``max|W|`` of each output channel) and changes only the rounding decisions: columns of the
weight matrix are rounded one after another, and each rounding error is pushed onto the columns not yet rounded
so that the layer's *output* on calibration inputs moves as little as possible. That needs, per layer, the input
Hessian ``H = 2/N sum x x^T`` of the least-squares output error, which ``collect_input_hessians`` gathers from
forward passes of the float model.

* ``gptq_codes``: one weight (matrix view ``C_out x d``) and one ``d x d`` Hessian to ``Codes``;
* ``collect_input_hessians``: the Hessians of Conv2d, Linear and ``nn.MultiheadAttention`` weights of a model;
* ``gptq_layer_codes``: a whole tensor from its Hessian entries (``in_proj_weight`` has one per q/k/v block).

A weight that sees no input activation (``query_embed.weight``, an ``nn.Embedding``) has no Hessian: callers
quantize it with per-channel round-to-nearest (``rtn_codes(w, bits, per_channel=True)``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from detrq.io.errors import DetrqError
from detrq.quant.codes import Codes, QuantizerSettings, channel_scale, check_bits

HessianEntries = list[tuple[slice, Tensor]]


def gptq_codes(w: Tensor, hessian: Tensor, bits: int, *, act_order: bool = False, damp: float = 0.01,
               block_size: int = 128) -> Codes:
    """GPTQ codes of ``w`` on the per-channel grid, given the ``d x d`` input Hessian of its matrix view.

    ``w`` is viewed as ``W = w.reshape(C_out, d)``; for a Conv2d weight that column order is the order of
    ``F.unfold``'s patch entries. ``hessian`` is ``2/N sum x x^T`` over those input vectors ``x``. Inputs that
    are always zero (``H_jj == 0``) get ``H_jj = 1``: their columns are rounded to nearest and receive no
    compensation, and their weights are kept. ``damp`` (a fraction of the mean diagonal) is added to the
    diagonal; ``act_order`` rounds columns by decreasing ``H_jj``; ``block_size`` batches the lazy updates
    (the same math, fewer large matrix products). The fake-quantized weight is ``dequantize(codes)``.
    """
    check_bits(bits, "gptq_codes")
    if w.ndim < 2:
        raise DetrqError(f"gptq_codes: the weight must have at least 2 dims (C_out, ...), got shape {tuple(w.shape)}")
    rows, cols = w.shape[0], math.prod(w.shape[1:])
    if tuple(hessian.shape) != (cols, cols):
        raise DetrqError(f"gptq_codes: a weight of shape {tuple(w.shape)} needs a ({cols}, {cols}) Hessian, "
                         f"got {tuple(hessian.shape)}")
    if not torch.isfinite(hessian).all():
        raise DetrqError("gptq_codes: the Hessian has non-finite entries (NaN or inf activations?)")
    if not damp > 0 or block_size < 1:
        raise DetrqError(f"gptq_codes: damp must be > 0 and block_size >= 1, got {damp}, {block_size}")
    levels = 2 ** (bits - 1) - 1
    scale = channel_scale(w)
    # Rounding happens in float32 with rtn_codes' exact expression, and errors are measured against the float32
    # grid point that dequantize() returns: with no compensation this is RTN bit for bit, and the compensated
    # error is the error of the weight that is actually evaluated.
    inv_step = (levels / scale).reshape(rows)
    step = (scale / levels).reshape(rows)

    weight = w.detach().reshape(rows, cols).to(torch.float64).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float64, copy=True)
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else None
    if perm is not None:
        weight = weight[:, perm]
        h = h[perm][:, perm]
    h.diagonal().add_(damp * h.diagonal().mean())
    try:
        # Upper Cholesky factor of H^-1: row i holds the OBS update for column i given columns < i are fixed.
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError as e:
        raise DetrqError(f"gptq_codes: the dampened Hessian is not positive definite ({e}); raise damp "
                         f"(now {damp})") from None

    q = torch.zeros(rows, cols, dtype=torch.float32, device=w.device)
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        block = weight[:, b0:b1].clone()
        err = torch.zeros_like(block)
        hblock = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = block[:, i]
            code = torch.round(col.to(torch.float32) * inv_step).clamp_(-levels, levels)
            q[:, b0 + i] = code
            err[:, i] = (col - (code * step).to(torch.float64)) / hblock[i, i]
            block[:, i:] -= err[:, i:i + 1] * hblock[i:i + 1, i:]
        # Columns after this block get all of its updates at once (the "lazy batch" of GPTQ).
        weight[:, b1:] -= err @ hinv[b0:b1, b1:]
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return Codes(q.reshape(w.shape).to(torch.int8 if bits <= 8 else torch.int32), scale, bits)


def gptq_layer_codes(w: Tensor, entries: HessianEntries, bits: int, settings: QuantizerSettings) -> Codes:
    """GPTQ codes of a whole tensor from ``collect_input_hessians``' entries for it: each row slice is
    quantized with its own Hessian (``in_proj_weight``'s q, k and v blocks see different inputs). The slices
    must tile the rows ``0..C_out`` in order. Scales stay ``channel_scale(w)`` (they are per row anyway)."""
    check_bits(bits, "gptq_layer_codes")
    start = 0
    parts = []
    for rows, hessian in entries:
        if rows.start != start or rows.stop is None or rows.stop <= start or rows.step not in (None, 1):
            raise DetrqError(f"gptq_layer_codes: row slices must tile 0..{w.shape[0]} in order, got "
                             f"{[e[0] for e in entries]}")
        parts.append(gptq_codes(w[rows], hessian, bits, act_order=settings.act_order, damp=settings.damp,
                                block_size=settings.block_size).q)
        start = rows.stop
    if start != w.shape[0]:
        raise DetrqError(f"gptq_layer_codes: row slices must tile 0..{w.shape[0]} in order, got "
                         f"{[e[0] for e in entries]}")
    return Codes(torch.cat(parts), channel_scale(w), bits)


class _Gram:
    """Running ``sum x x^T`` and count in float64: O(d^2) memory however many inputs pass."""

    def __init__(self, d: int):
        self.d = d
        self.total: Tensor | None = None  # allocated on the first input's device
        self.count = 0

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, self.d).to(torch.float64)
        if self.total is None:
            self.total = x.new_zeros(self.d, self.d)
        self.total.addmm_(x.T, x)
        self.count += x.shape[0]

    def hessian(self) -> Tensor:
        return self.total * (2.0 / self.count)


def _conv_patches(conv: nn.Conv2d, x: Tensor) -> Iterable[Tensor]:
    """The input vectors of ``conv`` (one per output pixel), in ``w.reshape(C_out, -1)`` order, image by image
    so that no more than one image's patches are ever held."""
    # _reversed_padding_repeated_twice is the padding Conv2d itself applies, for every padding_mode and for
    # padding="same"; padding first and unfolding without padding reproduces the conv's patches exactly.
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    for image in x:
        padded = F.pad(image[None], conv._reversed_padding_repeated_twice, mode=mode)
        cols = F.unfold(padded, conv.kernel_size, dilation=conv.dilation, padding=0, stride=conv.stride)
        yield cols[0].T


_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _mha_arguments(mha: nn.MultiheadAttention, args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = _MHA_SIGNATURE.bind(mha, *args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def _attended(key: Tensor, key_padding_mask: Tensor | None, batch_first: bool) -> Tensor:
    """Key/value vectors of positions that the padding mask lets attention see; the others never reach the
    output, so they do not belong in the k/v Hessians."""
    if key_padding_mask is None:
        return key.reshape(-1, key.shape[-1])
    ignored = key_padding_mask if key_padding_mask.dtype == torch.bool else torch.isneginf(key_padding_mask)
    if key.dim() == 3 and not batch_first:
        ignored = ignored.T  # the mask is (B, S), the sequence is (S, B, E)
    return key[~ignored]


class _HessianCollector:
    """Forward pre-hooks that feed each requested weight's input vectors into its ``_Gram``s."""

    def __init__(self, model: nn.Module):
        self.grams: dict[str, list[tuple[slice, _Gram]]] = {}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        # The out_proj input is recovered by running the attention again; its hooks must not count that run.
        self.rerunning = False
        self.model = model

    def _module_of(self, name: str, param: nn.Parameter) -> tuple[str, nn.Module, str]:
        prefix, _, attr = name.rpartition(".")
        try:
            module = self.model.get_submodule(prefix)
        except AttributeError:
            module = None
        if module is None or getattr(module, attr, None) is not param:
            raise DetrqError(f"collect_input_hessians: {name!r} is not a parameter of the model")
        return prefix, module, attr

    def register(self, name: str, param: nn.Parameter) -> None:
        prefix, module, attr = self._module_of(name, param)
        parent = self.model.get_submodule(prefix.rpartition(".")[0]) if "." in prefix else self.model
        if isinstance(module, nn.Embedding):
            return  # a lookup table: no input vectors, callers fall back to round-to-nearest
        if isinstance(parent, nn.MultiheadAttention) and module is parent.out_proj and attr == "weight":
            gram = _Gram(parent.embed_dim)
            self.grams[name] = [(slice(0, parent.embed_dim), gram)]
            self.handles.append(parent.register_forward_pre_hook(self._out_proj_hook(gram), with_kwargs=True))
        elif isinstance(module, nn.MultiheadAttention) and attr == "in_proj_weight":
            e = module.embed_dim
            grams = [_Gram(e) for _ in range(3)]
            self.grams[name] = [(slice(i * e, (i + 1) * e), g) for i, g in enumerate(grams)]
            self.handles.append(module.register_forward_pre_hook(self._in_proj_hook(grams), with_kwargs=True))
        elif isinstance(module, nn.Linear) and attr == "weight":
            gram = _Gram(module.in_features)
            self.grams[name] = [(slice(0, module.out_features), gram)]
            self.handles.append(module.register_forward_pre_hook(self._linear_hook(gram)))
        elif isinstance(module, nn.Conv2d) and attr == "weight":
            if module.groups != 1:
                raise DetrqError(f"collect_input_hessians: {name!r} is a grouped conv (groups={module.groups}); "
                                 f"GPTQ here needs groups=1, quantize it with another quantizer")
            gram = _Gram(math.prod(module.weight.shape[1:]))
            self.grams[name] = [(slice(0, module.out_channels), gram)]
            self.handles.append(module.register_forward_pre_hook(self._conv_hook(gram)))
        else:
            raise DetrqError(f"collect_input_hessians: {name!r} belongs to a {type(module).__name__}; only Conv2d, "
                             f"Linear and MultiheadAttention weights (and Embeddings, skipped) are supported")

    def _linear_hook(self, gram: _Gram):
        def hook(module: nn.Module, args: tuple) -> None:
            if not self.rerunning:
                gram.add(args[0])
        return hook

    def _conv_hook(self, gram: _Gram):
        def hook(module: nn.Conv2d, args: tuple) -> None:
            if not self.rerunning:
                x = args[0] if args[0].dim() == 4 else args[0][None]
                for patches in _conv_patches(module, x):
                    gram.add(patches)
        return hook

    def _in_proj_hook(self, grams: list[_Gram]):
        def hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> None:
            if self.rerunning:
                return
            a = _mha_arguments(module, args, kwargs)
            grams[0].add(a["query"])
            grams[1].add(_attended(a["key"], a["key_padding_mask"], module.batch_first))
            grams[2].add(_attended(a["value"], a["key_padding_mask"], module.batch_first))
        return hook

    def _out_proj_hook(self, gram: _Gram):
        def hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> None:
            if self.rerunning:
                return
            # nn.MultiheadAttention hands out_proj.weight to the functional kernel, so out_proj's own hooks
            # never fire. The same attention with an identity output projection returns exactly its input.
            e = module.embed_dim
            swapped = {"out_proj.weight": torch.eye(e, dtype=module.out_proj.weight.dtype,
                                                    device=module.out_proj.weight.device)}
            if module.out_proj.bias is not None:
                swapped["out_proj.bias"] = torch.zeros_like(module.out_proj.bias)
            self.rerunning = True
            try:
                context = functional_call(module, swapped, args, {**kwargs, "need_weights": False})[0]
            finally:
                self.rerunning = False
            gram.add(context)
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def hessians(self) -> dict[str, HessianEntries]:
        unseen = [name for name, entries in self.grams.items() if any(g.count == 0 for _, g in entries)]
        if unseen:
            raise DetrqError(f"collect_input_hessians: no input reached {unseen[:3]}"
                             f"{' ...' if len(unseen) > 3 else ''}; are the batches empty or the layers unused?")
        return {name: [(rows, g.hessian()) for rows, g in entries] for name, entries in self.grams.items()}


def collect_input_hessians(model: nn.Module, batches: Iterable[tuple[Any, Any]],
                           layers: Mapping[str, nn.Parameter]) -> dict[str, HessianEntries]:
    """The input Hessian ``2/N sum x x^T`` (float64) of every weight in ``layers``, from ``model(images)`` in
    eval mode over ``batches`` of ``(images, targets)``.

    ``layers`` maps official parameter names to the model's parameters (e.g. ``quant.quantizable_layers``).
    Returns ``{name: [(row_slice, H), ...]}``: one entry for all rows of a Conv2d (``x``: every unfolded patch
    of every image) or Linear weight (every leading position); three for ``in_proj_weight``, whose rows
    ``0:E``, ``E:2E``, ``2E:3E`` see the attention's query, key and value inputs, the key and value ones only at
    positions that ``key_padding_mask`` leaves visible; one for ``out_proj.weight`` (the attention context,
    before the output projection). ``nn.Embedding`` weights (``query_embed.weight``) have no input and are
    absent: quantize them with per-channel round-to-nearest. The model's training mode is restored and every
    hook removed, also on error.
    """
    was_training = model.training
    collector = _HessianCollector(model)
    try:
        for name, param in layers.items():
            collector.register(name, param)
        model.eval()
        with torch.no_grad():
            for images, _targets in batches:
                model(images)
    finally:
        collector.remove()
        model.train(was_training)
    return collector.hessians()
