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

import hashlib
from typing import Any

from torch import Tensor

from detrq.io.errors import DetrqError
from detrq.quant.codes import Codes, QuantizerSettings, dequantize, rtn_codes
from detrq.quant.gptq import gptq_layer_codes


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
