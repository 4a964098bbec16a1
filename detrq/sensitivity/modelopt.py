"""NVIDIA TensorRT Model Optimizer's ``auto_quantize`` score as a per-layer, per-bit cost (beyond the paper).

ModelOpt's "gradient" method scores quantizing layer l to b bits by

    S_l(b) = sum over images and output elements of (dL/dY_l)^2 * (Y_l^Q(b) - Y_l)^2,

``Y_l`` the output of the module that applies the weight, on its float input, ``Y_l^Q(b)`` the same module's output on
the same input with only that weight quantized, and L the task loss: here the DETR training loss (Hungarian matching,
aux outputs included, ``models/criterion.py``), as a ModelOpt user would pass it. It is an output-space empirical
Fisher: ``1/2 dY' diag(g^2) dY`` is the second-order loss change when the output's curvature is replaced by its
squared gradient; no weight Hessian, and the actual error ``dY`` of each bit width instead of Eq. (2)'s isotropic
``||Q_b(W) - W||^2``. (Eq. (5) has zero gradient at float weights, so only the training loss can serve.)

One forward and one backward per image: forward hooks keep each module's input and output, one
``autograd.grad`` gives ``dL/dY`` for all of them, and per bit width only the quantized weight's own module is
re-applied to its kept input (it is linear in W: ``dY = f(X; Q_b(W) - W)``). ``nn.MultiheadAttention`` applies
``in_proj`` and ``out_proj`` inside one functional, so its hook recomputes the attention explicitly from the kept
inputs (the same operations as PyTorch's path) and returns that output: q, k, v (``in_proj``'s output) and the
attention context (``out_proj``'s input) are then tensors of the graph. The object queries ``query_embed.weight``
enter as the weight itself: their output is W and ``dL/dY`` is the weight's gradient. The costs use the quantizer
that will be applied (Eq. (6), per-channel, GPTQ), as every cost table does.

Per (layer, bits) the per-image values are kept as a ``TraceEstimate`` (mean over images and its standard error);
the ILP's cost is the mean, ModelOpt's sum over the image count, which no allocation depends on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrq.io.errors import DetrqError
from detrq.models.criterion import build_criterion, weighted_loss
from detrq.quant.bitmaps import quantizable_layers
from detrq.quant.quantizers import EQ6, WeightQuantizer
from detrq.sensitivity.estimates import TraceEstimate
from detrq.sensitivity.objectives import tracing

MODELOPT = "modelopt"
MODELOPT_NAME = "ModelOpt auto_quantize score (beyond the paper)"
# The bit widths scored by default: Table 1's ILP ranges (3-6, 4-7) and the Pareto sweep's (3-8).
MODELOPT_BITS = range(3, 9)

Batch = tuple[list[Tensor], list[dict[str, Any]]]


@dataclass
class _Site:
    """Where one quantizable weight acts on the current image: the inputs and outputs of the modules that apply it
    (three of each for an ``in_proj``: q, k, v, with the weight's rows of each), and ``delta(x, dW)``, the output
    change of one input under a weight change. ``weight_is_output``: the weight is read whole (the object queries)."""

    delta: Callable[[Tensor, Tensor], Tensor]
    out_dim: int = -1  # the output's channel dimension, where ``delta`` of weight changes stacked by rows lands
    weight_is_output: bool = False
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    rows: list[slice | None] = field(default_factory=list)

    def keep(self, x: Tensor, y: Tensor, rows: slice | None = None) -> None:
        self.inputs.append(x)
        self.outputs.append(y)
        self.rows.append(rows)

    def clear(self) -> None:
        self.inputs, self.outputs, self.rows = [], [], []


def _attention(mha: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
               key_padding_mask: Tensor | None) -> tuple[Tensor, list[Tensor], Tensor]:
    """``nn.MultiheadAttention``'s output (sequence first, eval mode, no extra biases) with its projections exposed:
    ``(output, [q, k, v] before the head split, context before out_proj)``."""
    e, h = mha.embed_dim, mha.num_heads
    w, b = mha.in_proj_weight, mha.in_proj_bias
    q, k, v = (F.linear(x, w[i * e:(i + 1) * e], b[i * e:(i + 1) * e]) for i, x in enumerate((query, key, value)))
    tgt, bsz, src = query.shape[0], query.shape[1], key.shape[0]
    hd = e // h
    qh = q.reshape(tgt, bsz * h, hd).transpose(0, 1) * (1.0 / math.sqrt(hd))  # PyTorch scales q before the product
    kh = k.reshape(src, bsz * h, hd).transpose(0, 1)
    vh = v.reshape(src, bsz * h, hd).transpose(0, 1)
    scores = torch.bmm(qh, kh.transpose(1, 2))
    if key_padding_mask is not None:
        pad = key_padding_mask.view(bsz, 1, 1, src).expand(-1, h, -1, -1).reshape(bsz * h, 1, src)
        scores = scores.masked_fill(pad, float("-inf"))
    context = torch.bmm(torch.softmax(scores, dim=-1), vh).transpose(0, 1).reshape(tgt, bsz, e)
    return F.linear(context, mha.out_proj.weight, mha.out_proj.bias), [q, k, v], context


def _module_hook(site: _Site) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        site.keep(args[0], output)
    return hook


def _attention_hook(in_site: _Site | None, out_site: _Site | None) -> Callable[..., tuple]:
    def hook(mha: nn.MultiheadAttention, args: tuple, kwargs: dict, output: tuple) -> tuple:
        if mha.batch_first or kwargs.get("attn_mask") is not None or mha.bias_k is not None:
            raise DetrqError("the ModelOpt score recomputes DETR's attention: sequence first, no attn_mask, no bias_k")
        query, key, value = [*args, *(kwargs[k] for k in ("query", "key", "value")[len(args):])][:3]
        out, qkv, context = _attention(mha, query, key, value, kwargs.get("key_padding_mask"))
        e = mha.embed_dim
        if in_site is not None:
            for i, (x, y) in enumerate(zip((query, key, value), qkv)):
                in_site.keep(x, y, slice(i * e, (i + 1) * e))
        if out_site is not None:
            out_site.keep(context, out)
        return out, output[1]
    return hook


def _conv_delta(conv: nn.Conv2d) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda x, dw: F.conv2d(x, dw, None, conv.stride, conv.padding, conv.dilation, conv.groups)


def _sites(model: nn.Module, names: Sequence[str]) -> tuple[dict[str, _Site], list[Any]]:
    """A site per layer, and the forward-hook handles that fill them."""
    modules = dict(model.named_modules())
    sites: dict[str, _Site] = {}
    handles = []
    for name in names:
        owner, _, attr = name.rpartition(".")
        module = modules[owner]
        parent, _, child = owner.rpartition(".")
        in_attention = ((isinstance(modules.get(parent), nn.MultiheadAttention) and child == "out_proj")
                        or (isinstance(module, nn.MultiheadAttention) and attr == "in_proj_weight"))
        if in_attention:
            sites[name] = _Site(F.linear)  # the attention's own hook fills it (below)
        elif isinstance(module, (nn.Conv2d, nn.Linear)) and attr == "weight":
            conv = isinstance(module, nn.Conv2d)
            sites[name] = _Site(_conv_delta(module) if conv else F.linear, out_dim=1 if conv else -1)
            handles.append(module.register_forward_hook(_module_hook(sites[name])))
        elif isinstance(module, nn.Embedding) and attr == "weight":
            sites[name] = _Site(lambda x, dw: dw, out_dim=0, weight_is_output=True)
        else:
            raise DetrqError(f"layer {name!r} ({type(module).__name__}.{attr}) has no ModelOpt score here: only "
                             "Conv2d, Linear, MultiheadAttention and Embedding weights")
    for owner, module in modules.items():
        in_site, out_site = sites.get(f"{owner}.in_proj_weight"), sites.get(f"{owner}.out_proj.weight")
        if isinstance(module, nn.MultiheadAttention) and (in_site is not None or out_site is not None):
            handles.append(module.register_forward_hook(_attention_hook(in_site, out_site), with_kwargs=True))
    return sites, handles


def modelopt_scores(model: nn.Module, batches: Iterable[Batch], bits: Iterable[int] = MODELOPT_BITS,
                    quantizer: WeightQuantizer = EQ6, *, layers: Iterable[str] | None = None,
                    progress: bool = False) -> dict[str, dict[int, TraceEstimate]]:
    """ModelOpt's score of every layer (default ``quantizable_layers``) at every bit width, from the images of
    ``batches`` one at a time: ``{layer: {bits: TraceEstimate of the per-image scores}}`` (module docstring)."""
    bits = sorted(set(bits))
    names = list(quantizable_layers(model)) if layers is None else list(layers)
    criterion = build_criterion(model.cfg.num_classes, model.cfg.dec_layers)
    items = [([image], [target]) for images, targets in batches for image, target in zip(images, targets)]
    if not items or not bits:
        raise DetrqError("modelopt_scores needs at least one image and one bit width")
    samples: dict[str, dict[int, list[float]]] = {n: {b: [] for b in bits} for n in names}
    with tracing(model, names) as params:
        # Each weight's error at each width, once: the quantizer's, as the ILP will apply it.
        errors = {n: {b: quantizer.quantize(n, p.detach(), b) - p.detach() for b in bits} for n, p in params.items()}
        stacked = {n: torch.cat([by_bits[b] for b in bits]) for n, by_bits in errors.items()}
        sites, handles = _sites(model, names)
        if progress:
            from tqdm import tqdm

            items = tqdm(items, desc="modelopt (per image)", unit="image")
        try:
            for images, targets in items:
                for n, site in sites.items():
                    site.clear()
                    if site.weight_is_output:
                        site.keep(params[n], params[n])
                loss = weighted_loss(criterion(model(images), targets), criterion.weight_dict)
                order = [(n, i) for n, site in sites.items() for i in range(len(site.outputs))]
                grads = torch.autograd.grad(loss, [sites[n].outputs[i] for n, i in order], allow_unused=True)
                score = {n: torch.zeros(len(bits), dtype=torch.float64) for n in names}
                with torch.no_grad():
                    for (n, i), g in zip(order, grads):
                        if g is None:  # this output does not reach the loss
                            continue
                        site = sites[n]
                        # Every width's output change in one call: the weight errors stacked along the output rows.
                        dw = stacked[n] if site.rows[i] is None else torch.cat(
                            [errors[n][b][site.rows[i]] for b in bits])
                        dim = site.out_dim % g.dim()
                        dy = site.delta(site.inputs[i], dw).unflatten(dim, (len(bits), g.shape[dim]))
                        per_bits = (g.double().pow(2).unsqueeze(dim) * dy.double().pow(2)).movedim(dim, 0)
                        score[n] += per_bits.reshape(len(bits), -1).sum(1).cpu()
                for n in names:
                    for b, v in zip(bits, score[n].tolist()):
                        samples[n][b].append(v)
        finally:
            for h in handles:
                h.remove()
            for site in sites.values():
                site.clear()
        numel = {n: p.numel() for n, p in params.items()}
    return {n: {b: TraceEstimate.from_samples(samples[n][b], numel[n]) for b in bits} for n in names}


def modelopt_costs(result: Mapping[str, Any], bits_range: Iterable[int], quantizer: WeightQuantizer = EQ6
                   ) -> dict[str, dict[int, float]]:
    """The ILP's table from a ModelOpt result (``pipeline.run_traces`` with metric ``modelopt``): the mean score per
    image at each width; the scores must have been made with ``quantizer`` and cover ``bits_range``."""
    made_with = result.get("quantizer_key", {"name": EQ6.name})
    if made_with != quantizer.key:
        other = " with another calibration" if made_with.get("name") == quantizer.name else ""
        raise DetrqError(f"these ModelOpt scores were computed with the {made_with.get('name')} quantizer{other}, "
                         f"not the one that will be applied ({quantizer.name}): compute them with it")
    bits_list = sorted(set(bits_range))
    table = {}
    for name, per in result["layers"].items():
        absent = [b for b in bits_list if str(b) not in per]
        if absent:
            raise DetrqError(f"the ModelOpt scores have no {absent[0]}-bit entry for {name!r}: compute them for "
                             "the ILP's bit range")
        table[name] = {b: float(per[str(b)]["trace"]) for b in bits_list}
    return table
