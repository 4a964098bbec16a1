"""Weight quantizers behind one interface: the paper's Eq. (6), per-channel, and GPTQ (beyond the paper).

Every quantizer maps a weight tensor ``W`` and a bit width ``n`` to integer *codes* ``q`` in
``[-(2^(n-1) - 1), 2^(n-1) - 1]`` and float32 *scales* (``max|W|`` of the tensor, or of each output channel),
and the fake-quantized weight is always ``dequantize(codes)``: ``q * (scale / (2^(n-1) - 1))``. One formula
for every quantizer is what lets a packed checkpoint (``packing.py``) restore the evaluated weights bit for bit.

* ``eq6``: Eq. (6), symmetric per tensor, round to nearest (the paper's quantizer and the default);
* ``per-channel``: Eq. (6) with one ``max|W|`` per output channel (dim 0), round to nearest;
* ``gptq``: per-channel scales with GPTQ's error compensation from the layer's input-activation Hessian
  (``gptq.py``); the calibration images come from the train split.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from detrq.errors import DetrqError

QUANTIZERS: tuple[str, ...] = ("eq6", "per-channel", "gptq")
# Eq. (6) has 2^(n-1) - 1 positive levels, so n = 1 leaves no level at all (0/0): 2 bits is the minimum.
MIN_BITS = 2
MAX_BITS = 16


def check_bits(bits: Any, what: str) -> int:
    """``bits`` if it is an integer bit width in ``MIN_BITS..MAX_BITS``, else a ``DetrqError`` naming ``what``."""
    # bool is an int subclass; True as a bit width is a bug in the caller's data, not 1 bit.
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise DetrqError(f"{what}: bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return bits


@dataclass(frozen=True)
class QuantizerSettings:
    """Which quantizer, and GPTQ's knobs (ignored by the round-to-nearest quantizers but kept in the key)."""

    name: str = "eq6"
    act_order: bool = False  # gptq: quantize columns in order of decreasing Hessian diagonal
    damp: float = 0.01  # gptq: dampening added to the Hessian diagonal, as a fraction of its mean
    block_size: int = 128  # gptq: columns per lazy-update block (changes rounding order only, not the math)
    calib_images: int = 128  # gptq: train-split calibration images (class-balanced sample)
    calib_seed: int = 0  # gptq: seed of that sample

    def __post_init__(self) -> None:
        if self.name not in QUANTIZERS:
            raise DetrqError(f"unknown quantizer {self.name!r}; choose one of {', '.join(QUANTIZERS)}")
        if not self.damp > 0 or self.block_size < 1 or self.calib_images < 1:
            raise DetrqError(f"quantizer settings: damp must be > 0, block_size and calib_images >= 1 "
                             f"(got {self.damp}, {self.block_size}, {self.calib_images})")

    def to_dict(self) -> dict[str, Any]:
        """The settings that determine the quantized weights (a cache-key part): only the name for RTN."""
        return asdict(self) if self.name == "gptq" else {"name": self.name}


@dataclass
class Codes:
    """One layer's quantized form: integer codes (same shape as W), float32 scales and the bit width.

    ``scale`` has shape ``()`` (per tensor) or ``(C_out, 1, ..., 1)`` (per output channel, broadcastable).
    """

    q: Tensor
    scale: Tensor
    bits: int

    @property
    def levels(self) -> int:
        return 2 ** (self.bits - 1) - 1


def dequantize(codes: Codes) -> Tensor:
    """The fake-quantized weight ``q * (scale / levels)`` in float32: the one formula for every quantizer."""
    return codes.q.to(torch.float32) * (codes.scale / codes.levels)


def _safe_scale(scale: Tensor) -> Tensor:
    # A zero scale would give 0 * inf = NaN; any positive stand-in maps an all-zero tensor (or row) to zero.
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def channel_scale(w: Tensor) -> Tensor:
    """Per-output-channel ``max|W|`` (dim 0) shaped to broadcast against ``w``, zero rows made safe."""
    amax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1)
    return _safe_scale(amax.to(torch.float32)).reshape(w.shape[0], *([1] * (w.ndim - 1)))


def rtn_codes(w: Tensor, bits: int, per_channel: bool) -> Codes:
    """Round-to-nearest codes of Eq. (6), per tensor or per output channel.

    ``torch.round`` rounds halves to even; exact ties have probability zero for trained weights.
    """
    check_bits(bits, "rtn_codes")
    levels = 2 ** (bits - 1) - 1
    w32 = w.detach().to(torch.float32)
    scale = channel_scale(w32) if per_channel else _safe_scale(w32.abs().max())
    q = torch.round(w32 * (levels / scale))
    return Codes(q.to(torch.int8 if bits <= 8 else torch.int32), scale, bits)


class WeightQuantizer:
    """A quantizer ready to use: ``codes(name, w, bits)`` and the fake-quantized ``quantize(name, w, bits)``.

    ``eq6`` and ``per-channel`` depend on ``w`` alone. ``gptq`` also needs each layer's input-activation
    Hessians (``gptq.collect_input_hessians`` on the calibration images, float model): a layer without one
    (the object queries, which see no input) falls back to per-channel round-to-nearest. GPTQ's codes are
    memoised per layer, bit width and weight bytes, since an allocation sweep asks for the same ones many times.
    ``key`` identifies everything that determines the weights (settings and calibration), for cache keys.
    """

    def __init__(self, settings: QuantizerSettings = QuantizerSettings(),
                 hessians: dict[str, list[tuple[slice, Tensor]]] | None = None,
                 calibration: dict[str, Any] | None = None) -> None:
        if settings.name == "gptq" and hessians is None:
            raise DetrqError("the gptq quantizer needs input Hessians from calibration images "
                             "(pipeline.build_quantizer makes them)")
        self.settings = settings
        self.hessians = hessians or {}
        self.calibration = calibration
        self._memo: dict[tuple[str, int, bytes], Codes] = {}

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def per_channel(self) -> bool:
        return self.settings.name != "eq6"

    @property
    def key(self) -> dict[str, Any]:
        return {**self.settings.to_dict(), **({"calibration": self.calibration} if self.calibration else {})}

    def codes(self, name: str, w: Tensor, bits: int) -> Codes:
        if self.settings.name != "gptq" or name not in self.hessians:
            return rtn_codes(w, bits, self.per_channel)
        import hashlib

        from detrq.gptq import gptq_layer_codes

        digest = hashlib.sha1(w.detach().cpu().contiguous().numpy().tobytes()).digest()
        memo_key = (name, bits, digest)
        if memo_key not in self._memo:
            self._memo[memo_key] = gptq_layer_codes(w.detach(), self.hessians[name], bits, self.settings)
        return self._memo[memo_key]

    def quantize(self, name: str, w: Tensor, bits: int) -> Tensor:
        """The fake-quantized weight, in ``w``'s dtype and device."""
        return dequantize(self.codes(name, w, bits)).to(dtype=w.dtype, device=w.device)

    def scale_count(self, w: Tensor) -> int:
        """How many float32 scales one layer stores: one per tensor, or one per output channel."""
        return w.shape[0] if self.per_channel else 1


EQ6 = WeightQuantizer()  # the paper's quantizer; stateless, so one shared instance serves every default
