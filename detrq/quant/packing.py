"""Bit-packed checkpoints: a quantized state dict stored at its real size, restored bit for bit.

A fake-quantized model (``quant.apply_bit_map`` and friends) still holds float32 weights, so its checkpoint is
as large as the float one. This module stores each quantized layer as what it really is, ``Codes`` (see
``quantizers.py``): n-bit integer codes plus float32 scales, and restores ``dequantize(codes)``, the very
tensor that was evaluated. It works for any state dict and any mix of bit widths (2..16) and per-tensor or
per-output-channel scales.

File format (``torch.save`` of a plain dict, read with ``torch.load(..., weights_only=True)``)::

    {"format":  "detrq-packed/1",            # tag checked on load
     "index":   uint8[]   zlib-compressed UTF-8 JSON (below),
     "packed":  uint8[]   every quantized layer's codes, n bits per weight, layers one after another,
     "scales":  float32[] every quantized layer's scales, one per tensor or one per output channel,
     "floats":  {dtype name: 1-D tensor}  every other entry, flattened and concatenated per dtype}

The JSON index is ``{"version": 1, "meta": {...}, "entries": [...]}`` with one entry per state-dict key, in
the state dict's order: ``{"name", "shape", "kind": "packed", "bits", "per_channel", "offset", "nbytes",
"scale_offset"}`` (byte offset into ``packed``, element offset into ``scales``) or ``{"name", "shape",
"kind": "float", "dtype", "offset"}`` (element offset into ``floats[dtype]``).

A layer's codes ``q`` in ``[-(2^(n-1)-1), 2^(n-1)-1]`` are offset to ``u = q + 2^(n-1) - 1`` in ``[0, 2^n - 2]``
and written as a big-endian bit stream of exactly n bits per weight in C order, padded with zero bits to a
whole byte per layer (at most one byte per layer). Why one buffer per kind and not one tensor per layer: the
zip container of ``torch.save`` costs a record header, 64-byte alignment and pickled names per tensor, which
for ~150 tensors would be several percent of a sub-megabyte file; with four data tensors the file stays within
a fraction of a percent of the ideal ``sum_l n_l |W_l| / 8 + 4 * (number of scales) + float rest``.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from detrq.io.errors import DetrqError
from detrq.io.results import atomic_output
from detrq.io.torch_files import load_weights_only
from detrq.quant.codes import MIN_BITS, Codes, dequantize

FORMAT = "detrq-packed/1"
VERSION = 1
# 16 bits is quantizers.MAX_BITS; the big-endian two-byte path below covers 9..16, so no lower cap is needed.
PACK_MAX_BITS = 16


def _levels(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _check_pack_bits(bits: Any, name: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= PACK_MAX_BITS:
        raise DetrqError(f"layer {name!r}: bits must be an integer in {MIN_BITS}..{PACK_MAX_BITS}, got {bits!r}")
    return bits


def pack_bits(u: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned values ``u < 2^bits`` (any shape) as a uint8 stream of exactly ``bits`` bits per value."""
    width = 8 if bits <= 8 else 16
    # Big-endian bytes so that unpackbits yields each value's bits most significant first, and the top
    # (width - bits) bits, always zero, can be dropped by slicing columns.
    as_bytes = u.reshape(-1).astype(">u1" if width == 8 else ">u2").view(np.uint8).reshape(-1, width // 8)
    bit_rows = np.unpackbits(as_bytes, axis=1)[:, width - bits:]
    return np.packbits(bit_rows.reshape(-1))


def unpack_bits(stream: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_bits``: ``count`` values of ``bits`` bits as a 1-D int32 array."""
    width = 8 if bits <= 8 else 16
    bit_rows = np.unpackbits(stream, count=count * bits).reshape(count, bits)
    padded = np.zeros((count, width), dtype=np.uint8)
    padded[:, width - bits:] = bit_rows
    as_bytes = np.packbits(padded, axis=1)
    return as_bytes.reshape(-1).view(">u1" if width == 8 else ">u2").astype(np.int32)


def _scale_layout(name: str, codes: Codes) -> tuple[bool, Tensor]:
    """(per_channel, flat float32 scales) of a layer, or a DetrqError if the scale shape is neither form."""
    scale = codes.scale.detach().to("cpu", torch.float32)
    shape = tuple(codes.q.shape)
    if scale.ndim == 0:
        return False, scale.reshape(1)
    channel_shape = (shape[0], *([1] * (len(shape) - 1))) if shape else None
    if tuple(scale.shape) == channel_shape:
        return True, scale.reshape(-1)
    raise DetrqError(f"layer {name!r}: scale shape {tuple(scale.shape)} is neither () nor per output channel "
                     f"{channel_shape} for codes of shape {shape}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: Any) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise DetrqError(f"unknown dtype {name!r} in the index")
    return dtype


def pack_state(state_dict: Mapping[str, Tensor], codes: Mapping[str, Codes], meta: Mapping[str, Any]) -> dict:
    """The packed object for ``state_dict`` with the layers in ``codes`` stored as n-bit codes and scales.

    Every key of ``codes`` must be a key of ``state_dict`` with the same shape; the state dict's value of such
    a key is not stored (the codes replace it). Every other entry is stored as is. ``meta`` must be
    JSON-serializable (it lives in the index); it comes back from ``load_packed`` as parsed JSON.
    """
    unknown = [name for name in codes if name not in state_dict]
    if unknown:
        raise DetrqError(f"codes for {unknown[:3]}{' ...' if len(unknown) > 3 else ''} have no entry in the "
                         f"state dict")
    try:
        meta_json = json.loads(json.dumps(dict(meta), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise DetrqError(f"pack_state: meta must be JSON-serializable: {e}") from None

    entries: list[dict[str, Any]] = []
    packed_parts: list[np.ndarray] = []
    scale_parts: list[Tensor] = []
    float_parts: dict[str, list[Tensor]] = {}
    packed_offset = scale_offset = 0
    float_offsets: dict[str, int] = {}
    for name, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise DetrqError(f"state dict entry {name!r} is a {type(value).__name__}, not a tensor")
        shape = list(value.shape)
        if name in codes:
            layer = codes[name]
            bits = _check_pack_bits(layer.bits, name)
            if list(layer.q.shape) != shape:
                raise DetrqError(f"layer {name!r}: codes shape {tuple(layer.q.shape)} != state dict shape "
                                 f"{tuple(shape)}")
            q = layer.q.detach().to("cpu")
            if q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
                raise DetrqError(f"layer {name!r}: codes must be an integer tensor, got {q.dtype}")
            q64 = q.to(torch.int64)
            levels = _levels(bits)
            if q64.numel() and int(q64.abs().max()) > levels:
                raise DetrqError(f"layer {name!r}: codes outside [-{levels}, {levels}] for {bits} bits")
            per_channel, scales = _scale_layout(name, layer)
            stream = pack_bits((q64 + levels).numpy(), bits)
            entries.append({"name": name, "shape": shape, "kind": "packed", "bits": bits,
                            "per_channel": per_channel, "offset": packed_offset, "nbytes": int(stream.size),
                            "scale_offset": scale_offset})
            packed_parts.append(stream)
            scale_parts.append(scales)
            packed_offset += int(stream.size)
            scale_offset += scales.numel()
        else:
            dtype = _dtype_name(value.dtype)
            offset = float_offsets.get(dtype, 0)
            entries.append({"name": name, "shape": shape, "kind": "float", "dtype": dtype, "offset": offset})
            float_parts.setdefault(dtype, []).append(value.detach().to("cpu").reshape(-1))
            float_offsets[dtype] = offset + value.numel()

    index = json.dumps({"version": VERSION, "meta": meta_json, "entries": entries}, separators=(",", ":"))
    packed = np.concatenate(packed_parts) if packed_parts else np.zeros(0, dtype=np.uint8)
    return {
        "format": FORMAT,
        "index": torch.frombuffer(bytearray(zlib.compress(index.encode(), 9)), dtype=torch.uint8),
        "packed": torch.from_numpy(packed),
        "scales": torch.cat(scale_parts) if scale_parts else torch.zeros(0, dtype=torch.float32),
        # cat copies, so the file never carries a storage larger than what is listed in the index.
        "floats": {dtype: torch.cat(parts) for dtype, parts in float_parts.items()},
    }


def _read_index(obj: dict, where: str) -> dict:
    try:
        index = json.loads(zlib.decompress(obj["index"].numpy().tobytes()).decode())
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError, KeyError) as e:
        raise DetrqError(f"corrupt packed checkpoint {where}: unreadable index ({e})") from None
    if not isinstance(index, dict) or index.get("version") != VERSION or not isinstance(index.get("entries"), list):
        raise DetrqError(f"packed checkpoint {where}: unsupported index version {index.get('version')!r} "
                         f"(this detrq reads version {VERSION})" if isinstance(index, dict)
                         else f"corrupt packed checkpoint {where}: index is not a JSON object")
    return index


def unpack_state(obj: Mapping[str, Any], where: str = "(in memory)") -> tuple[dict[str, Tensor], dict]:
    """(state dict, meta) from a packed object (``pack_state``'s result); packed layers as float32."""
    if not isinstance(obj, Mapping) or obj.get("format") != FORMAT:
        tag = obj.get("format") if isinstance(obj, Mapping) else None
        raise DetrqError(f"{where} is not a detrq packed checkpoint (format tag {tag!r}, expected {FORMAT!r}); "
                         f"a plain checkpoint is read with detrq.models.detr.load_checkpoint")
    index = _read_index(dict(obj), where)
    try:
        packed = obj["packed"].numpy()
        scales = obj["scales"]
        floats = obj["floats"]
        state: dict[str, Tensor] = {}
        for e in index["entries"]:
            shape = tuple(int(s) for s in e["shape"])
            count = math.prod(shape)
            if e["kind"] == "packed":
                bits = _check_pack_bits(e["bits"], e["name"])
                nbytes = (count * bits + 7) // 8
                if e["nbytes"] != nbytes or e["offset"] < 0 or e["offset"] + nbytes > packed.size:
                    raise DetrqError(f"corrupt packed checkpoint {where}: layer {e['name']!r} is out of bounds")
                u = unpack_bits(packed[e["offset"]:e["offset"] + nbytes], bits, count)
                q = torch.from_numpy(u - _levels(bits)).reshape(shape)
                n_scales = shape[0] if e["per_channel"] else 1
                if e["scale_offset"] < 0 or e["scale_offset"] + n_scales > scales.numel():
                    raise DetrqError(f"corrupt packed checkpoint {where}: scales of {e['name']!r} out of bounds")
                scale = scales[e["scale_offset"]:e["scale_offset"] + n_scales].clone()
                scale = scale.reshape(shape[0], *([1] * (len(shape) - 1))) if e["per_channel"] else scale.reshape(())
                # The same int dtypes as quantizers.rtn_codes, through the same dequantize: bit-identical.
                layer = Codes(q.to(torch.int8 if bits <= 8 else torch.int32), scale, bits)
                state[e["name"]] = dequantize(layer)
            elif e["kind"] == "float":
                flat = floats[e["dtype"]]
                if flat.dtype != _dtype_from_name(e["dtype"]) or e["offset"] < 0 or e["offset"] + count > flat.numel():
                    raise DetrqError(f"corrupt packed checkpoint {where}: entry {e['name']!r} is out of bounds")
                state[e["name"]] = flat[e["offset"]:e["offset"] + count].reshape(shape).clone()
            else:
                raise DetrqError(f"corrupt packed checkpoint {where}: unknown entry kind {e['kind']!r}")
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        if isinstance(e, DetrqError):
            raise
        raise DetrqError(f"corrupt packed checkpoint {where}: {type(e).__name__}: {e}") from None
    return state, index.get("meta", {})


def load_packed(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """(state dict, meta) from a file written by ``save_packed``.

    Quantized layers come back as ``dequantize(codes)`` in float32, bit-identical to the fake-quantized weights;
    every other entry comes back as saved. Anything else (missing file, not a torch file, a pickle that needs
    code, a plain checkpoint, a corrupt index) raises one ``DetrqError``.
    """
    obj = load_weights_only(path, "packed checkpoint")
    return unpack_state(obj, str(path))


def size_report(obj: Mapping[str, Any], file_bytes: int) -> dict[str, Any]:
    """Sizes of a packed object written to a file of ``file_bytes`` bytes, against the ideal.

    ``ideal_bytes = sum_l n_l |W_l| / 8 + 4 * scales + float rest``; ``overhead = file / ideal - 1``;
    ``float_bytes`` is the state dict with every quantized layer in float32 (and the rest as stored).
    """
    index = _read_index(dict(obj), "(in memory)")
    code_bits = packed_weights = 0
    for e in index["entries"]:
        if e["kind"] == "packed":
            n = math.prod(e["shape"])
            code_bits += n * e["bits"]
            packed_weights += n
    scales = 4 * obj["scales"].numel()
    rest = sum(t.numel() * t.element_size() for t in obj["floats"].values())
    ideal = code_bits / 8 + scales + rest
    stored = obj["packed"].numel() + scales + rest + obj["index"].numel()
    return {
        "file_bytes": file_bytes,
        "ideal_bytes": ideal,
        "overhead": file_bytes / ideal - 1 if ideal else math.inf,
        "float_bytes": 4 * packed_weights + rest,
        "compression": (4 * packed_weights + rest) / file_bytes if file_bytes else math.nan,
        "average_bits": code_bits / packed_weights if packed_weights else None,
        "parts": {
            "codes_bytes": int(obj["packed"].numel()),  # ideal code bits rounded up to a byte per layer
            "scale_bytes": scales,
            "float_rest_bytes": rest,
            "index_bytes": int(obj["index"].numel()),
            "container_bytes": file_bytes - stored,  # zip headers, alignment, the pickle of the dict
        },
    }


def save_packed(path: str | os.PathLike, state_dict: Mapping[str, Tensor], codes: Mapping[str, Codes],
                meta: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``pack_state(state_dict, codes, meta)`` to ``path`` atomically; return its ``size_report``.

    An earlier file at ``path`` survives any failure (the file is written to a temp file, then renamed).
    """
    obj = pack_state(state_dict, codes, meta)
    # Through a file object: torch.save names the archive's records after a path's file name (the random temp
    # name here), and "archive" for a file object, so one packing always gives the same bytes.
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
    return size_report(obj, Path(path).stat().st_size)
