"""The integer codes and scales every weight quantizer produces, the one dequantization formula, and the settings
that choose a quantizer.

A quantizer maps a weight ``W`` and a bit width ``n`` to integer codes ``q`` in ``[-(2^(n-1) - 1), 2^(n-1) - 1]``
and float32 scales; the fake-quantized weight is always ``dequantize(codes)`` (Eq. (6)'s formula). ``rtn_codes`` is
Eq. (6)'s round to nearest, per tensor or per output channel. The quantizers themselves (``quantizers.py``) and
GPTQ (``gptq.py``) build on these.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from detrq.io.errors import DetrqError

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
