"""Weight quantization: the Eq. (6) quantizer, which weights count as layers, bit maps, applying them, model size.

A *layer* is one weight tensor and a *bit map* is ``{parameter name: bits}``, keyed by the official DETR
parameter names so that a map saved as JSON is readable and portable. Layers absent from a bit map stay in
float. Applying a bit map fake-quantizes the weights in place (the stored values are exactly Eq. (6)'s
``Q(W)``) and returns a handle that restores the original tensors bit for bit, so that many bit maps can be
evaluated on one loaded model.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detrq.io.errors import DetrqError
from detrq.io.results import read_json, write_json_atomic
from detrq.quant.codes import check_bits, dequantize, rtn_codes
from detrq.quant.quantizers import EQ6, WeightQuantizer

# The paper keeps "the final FFN layers for the class and bounding box outputs" in float: the class head and
# the last layer of the box MLP. The box MLP's hidden layers are ordinary FFN layers and are quantized.
DEFAULT_EXCLUDE: tuple[str, ...] = ("class_embed.", "bbox_embed.layers.2.")

# Where each quantizable layer belongs, by parameter-name prefix (official names); the rest are the box MLP's
# hidden layers, the object queries and the input projection.
REGIONS: tuple[tuple[str, str], ...] = (("backbone", "backbone."), ("encoder", "transformer.encoder."),
                                        ("decoder", "transformer.decoder."))
OTHER_REGION = "heads/proj"

def layer_region(name: str) -> str:
    """The model region of a layer name: backbone, encoder, decoder, or heads/proj."""
    return next((region for region, prefix in REGIONS if name.startswith(prefix)), OTHER_REGION)


def quantize_tensor(w: Tensor, bits: int) -> Tensor:
    """Symmetric per-tensor linear quantizer, Eq. (6).

    ``Q(W) = Round[W (2^(n-1) - 1) / max|W|] * max|W| / (2^(n-1) - 1)``: the integers run from
    ``-(2^(n-1) - 1)`` to ``2^(n-1) - 1``, i.e. at most ``2^n - 1`` distinct values. ``torch.round`` rounds
    halves to even; exact ties have probability zero for trained weights, so the choice does not matter.
    An all-zero tensor stays zero. The result is a new tensor in ``w``'s dtype and device (computed in float32,
    through ``quantizers.rtn_codes`` and ``quantizers.dequantize``, the formula every quantizer shares).
    """
    return dequantize(rtn_codes(w, bits, per_channel=False)).to(w.dtype)


def quantizable_layers(
    model: nn.Module, *, exclude: tuple[str, ...] = DEFAULT_EXCLUDE, include_frozen: bool = False
) -> dict[str, nn.Parameter]:
    """The weight tensors that are quantized and get a bit width: the one policy of which weights count.

    The paper quantizes "all trainable weights in the DETR model with an exception of the final FFN layers
    for the class and bounding box outputs". Here a parameter counts when

    * it is a weight tensor, i.e. has ``ndim >= 2``: Conv2d and Linear weights, nn.MultiheadAttention's
      ``in_proj_weight`` and ``out_proj.weight``, ``input_proj`` and ``query_embed.weight`` (the learned
      object queries are a trained weight tensor like any other, and are stored like one);
    * it is trainable (``requires_grad``): in DETR-R50 the backbone's ``conv1`` and ``layer1`` are frozen
      and stay in float, unless ``include_frozen``;
    * its name does not start with a prefix in ``exclude``. The default, ``DEFAULT_EXCLUDE``, keeps the class
      head ``class_embed`` and the last box layer ``bbox_embed.layers.2`` in float; the box MLP's hidden
      layers ``bbox_embed.layers.0/1`` are ordinary FFN layers and are quantized.

    Biases, LayerNorm parameters and FrozenBatchNorm2d buffers are 1-D or buffers and stay in float.
    Returns ``{name: parameter}`` in ``model.named_parameters()`` order.
    """
    prefixes = tuple(exclude)
    return {
        name: p
        for name, p in model.named_parameters()
        if p.ndim >= 2 and (p.requires_grad or include_frozen) and not name.startswith(prefixes)
    }


def uniform_bit_map(model: nn.Module, bits: int) -> dict[str, int]:
    """Every quantizable layer of ``model`` at ``bits`` (the uniform-quantization baseline)."""
    check_bits(bits, "uniform_bit_map")
    return {name: bits for name in quantizable_layers(model)}


def validate_bit_map(bit_map: Mapping[str, Any], allowed: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Check a bit map's bit widths (and its names against ``allowed`` when given); return it as a plain dict.

    Raises ``DetrqError`` naming the first bad entry.
    """
    if not isinstance(bit_map, Mapping):
        raise DetrqError(f"a bit map must be a mapping of layer name to bits, got {type(bit_map).__name__}")
    for name, bits in bit_map.items():
        if allowed is not None and name not in allowed:
            raise DetrqError(f"bit map entry {name!r} is not a quantizable layer of this model")
        check_bits(bits, f"bit map entry {name!r}")
    return dict(bit_map)


def save_bit_map(path: str | os.PathLike, bit_map: Mapping[str, int], **meta: Any) -> Path:
    """Write ``{"bit_map": ..., "meta": meta}`` as JSON, atomically (an earlier file survives a failure)."""
    return write_json_atomic(path, {"bit_map": validate_bit_map(bit_map), "meta": meta})


def load_bit_map(path: str | os.PathLike, model: nn.Module | None = None) -> dict[str, int]:
    """Read a bit map written by ``save_bit_map``; with ``model``, its names must be quantizable layers."""
    data = read_json(path)
    if not isinstance(data, dict) or "bit_map" not in data:
        raise DetrqError(f"{path} is not a bit map file: expected a JSON object with a 'bit_map' key")
    allowed = quantizable_layers(model) if model is not None else None
    return validate_bit_map(data["bit_map"], allowed)


@dataclass
class QuantizedWeights:
    """Handle returned by ``apply_bit_map``: the quantized parameters and clones of their original values."""

    params: dict[str, nn.Parameter]
    originals: dict[str, Tensor]

    def restore(self) -> None:
        """Copy the original values back, bit for bit."""
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.originals[name])


def apply_bit_map(model: nn.Module, bit_map: Mapping[str, int], quantizer: WeightQuantizer = EQ6
                  ) -> QuantizedWeights:
    """Quantize ``model``'s weights in place at each layer's bits with ``quantizer`` (default Eq. (6)); return
    the restore handle.

    Names may be any parameter of ``model`` (applying is mechanical; which layers *should* be quantized is
    ``quantizable_layers``' policy), so ablations such as quantizing the heads remain possible.
    """
    params = dict(model.named_parameters())
    bit_map = validate_bit_map(bit_map, params)
    handle = QuantizedWeights({n: params[n] for n in bit_map}, {n: params[n].detach().clone() for n in bit_map})
    with torch.no_grad():
        for name, bits in bit_map.items():
            params[name].copy_(quantizer.quantize(name, params[name], bits))
    return handle


@contextmanager
def quantized(model: nn.Module, bit_map: Mapping[str, int], quantizer: WeightQuantizer = EQ6
              ) -> Iterator[nn.Module]:
    """``with quantized(model, bit_map): ...`` runs the block on the quantized model, then restores it exactly."""
    handle = apply_bit_map(model, bit_map, quantizer)
    try:
        yield model
    finally:
        handle.restore()


def quantize_model_copy(model: nn.Module, bit_map: Mapping[str, int], quantizer: WeightQuantizer = EQ6
                        ) -> nn.Module:
    """A deep copy of ``model`` with ``bit_map`` applied; ``model`` itself is untouched."""
    qmodel = copy.deepcopy(model)
    apply_bit_map(qmodel, bit_map, quantizer)
    return qmodel


def model_size_bits(model: nn.Module, bit_map: Mapping[str, int], quantizer: WeightQuantizer = EQ6) -> int:
    """Storage of ``model`` under ``bit_map``, in bits: the ideal size of its packed checkpoint (``packing.py``).

    Each quantized weight costs its bits plus its 32-bit float scales (one per tensor for Eq. (6), one per output
    channel for the per-channel quantizers); every other parameter and buffer element costs 32 bits.
    ``model_size_bits(model, {})`` is the float size.
    """
    params = dict(model.named_parameters())
    bit_map = validate_bit_map(bit_map, params)
    total = 0
    for name, p in params.items():
        total += (p.numel() * bit_map[name] + 32 * quantizer.scale_count(p) if name in bit_map
                  else p.numel() * 32)
    return total + sum(b.numel() * 32 for b in model.buffers())


def average_bits(bit_map: Mapping[str, int], numel: Mapping[str, int]) -> float:
    """Average bit width over the quantized weight elements: ``sum(bits_i * numel_i) / sum(numel_i)``."""
    total = sum(numel[name] for name in bit_map)
    if total == 0:
        raise DetrqError("average_bits: the bit map is empty or its layers have no elements")
    return sum(bits * numel[name] for name, bits in bit_map.items()) / total
