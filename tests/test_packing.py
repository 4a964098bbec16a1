"""Bit-packed checkpoints: exact round trips, the on-disk size against the ideal, bad files, atomic writes."""

import math
import os
import pickle

import numpy as np
import pytest
import torch

from detrq.io.errors import DetrqError
from detrq.models.detr import build_detr
from detrq.quant.bitmaps import quantizable_layers
from detrq.quant.codes import dequantize, rtn_codes
from detrq.quant.packing import FORMAT, load_packed, pack_bits, pack_state, save_packed, unpack_bits

torch.set_num_threads(1)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    zero_row = torch.randn(5, 7, generator=g)
    zero_row[2] = 0.0  # per-channel scale of an all-zero row is the safe stand-in; must still round-trip
    return {
        "conv.weight": torch.randn(6, 3, 3, 3, generator=g),
        "odd.weight": torch.randn(7, 13, generator=g),  # 91 elements: not a multiple of 8
        "zero_row.weight": zero_row,
        "vec.weight": torch.randn(3, generator=g),  # 1-D, 3 elements
        "conv.bias": torch.randn(6, generator=g),
        "norm.running_var": torch.rand(5, generator=g),
        "scalar": torch.tensor(1.5),
        "steps": torch.tensor([3, 4], dtype=torch.int64),
    }


QUANTIZED = ("conv.weight", "odd.weight", "zero_row.weight", "vec.weight")


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", range(2, 9))
def test_round_trip_exact(tmp_path, bits, per_channel):
    sd = _tensors()
    codes = {name: rtn_codes(sd[name], bits, per_channel) for name in QUANTIZED}
    save_packed(tmp_path / "p.pt", sd, codes, {"bits": bits})
    loaded, meta = load_packed(tmp_path / "p.pt")
    assert meta == {"bits": bits}
    assert list(loaded) == list(sd)  # order kept
    for name, value in sd.items():
        if name in codes:
            assert loaded[name].dtype == torch.float32
            assert torch.equal(loaded[name], dequantize(codes[name])), name
        else:
            assert loaded[name].dtype == value.dtype and torch.equal(loaded[name], value), name
    # the extreme codes must survive the unsigned offset (the test would pass vacuously without them)
    levels = 2 ** (bits - 1) - 1
    assert int(codes["conv.weight"].q.max()) == levels or int(codes["conv.weight"].q.min()) == -levels


@pytest.mark.parametrize("bits", [9, 12, 16])
def test_round_trip_above_8_bits(tmp_path, bits):
    sd = _tensors()
    codes = {name: rtn_codes(sd[name], bits, name == "conv.weight") for name in QUANTIZED}
    save_packed(tmp_path / "p.pt", sd, codes, {})
    loaded, _ = load_packed(tmp_path / "p.pt")
    for name in QUANTIZED:
        assert torch.equal(loaded[name], dequantize(codes[name])), name


@pytest.mark.parametrize("bits", [2, 3, 5, 8, 11, 16])
def test_bit_stream_is_exactly_n_bits_per_value(bits):
    rng = np.random.default_rng(bits)
    u = rng.integers(0, 2**bits - 1, size=37)  # 2^n - 2 is the largest offset code
    stream = pack_bits(u, bits)
    assert stream.dtype == np.uint8 and stream.size == math.ceil(37 * bits / 8)
    assert np.array_equal(unpack_bits(stream, bits, 37), u)


def test_bad_codes_rejected():
    sd = _tensors()
    codes = rtn_codes(sd["conv.weight"], 4, False)
    codes.q[0, 0, 0, 0] = 8  # outside [-7, 7]: would silently wrap in 4 bits
    with pytest.raises(DetrqError, match="outside"):
        pack_state(sd, {"conv.weight": codes}, {})
    with pytest.raises(DetrqError, match="no entry"):
        pack_state(sd, {"missing.weight": rtn_codes(sd["conv.weight"], 4, False)}, {})
    with pytest.raises(DetrqError, match="JSON"):
        pack_state(sd, {}, {"x": object()})


def _mini():
    torch.manual_seed(0)
    model = build_detr("mini")
    return model, model.state_dict()


@pytest.fixture(scope="module")
def mini():
    return _mini()


def test_whole_model_round_trip(tmp_path, mini):
    model, sd = mini
    names = list(quantizable_layers(model))
    codes = {name: rtn_codes(sd[name], 2 + i % 7, per_channel=i % 2 == 1) for i, name in enumerate(names)}
    save_packed(tmp_path / "m.pt", sd, codes, {"preset": "mini"})
    loaded, meta = load_packed(tmp_path / "m.pt")
    assert meta == {"preset": "mini"}
    fresh = build_detr("mini")
    fresh.load_state_dict(loaded, strict=True)
    restored = fresh.state_dict()
    for name, value in sd.items():
        expect = dequantize(codes[name]) if name in codes else value
        assert torch.equal(restored[name], expect), name


def _size_case(model, sd, case: str):
    names = list(quantizable_layers(model))
    if case == "uniform4":
        return {n: rtn_codes(sd[n], 4, False) for n in names}
    if case == "channel4":
        return {n: rtn_codes(sd[n], 4, True) for n in names}
    return {n: rtn_codes(sd[n], (2, 3, 4, 5, 6, 8)[i % 6], i % 3 == 0) for i, n in enumerate(names)}


@pytest.mark.parametrize("case", ["uniform4", "channel4", "mixed"])
def test_file_size_close_to_ideal(tmp_path, mini, case):
    model, sd = mini
    codes = _size_case(model, sd, case)
    report = save_packed(tmp_path / "s.pt", sd, codes, {"case": case})
    file_bytes = os.path.getsize(tmp_path / "s.pt")
    # the ideal, computed here independently of the module
    code_bits = sum(c.bits * c.q.numel() for c in codes.values())
    n_scales = sum(c.scale.numel() for c in codes.values())
    rest = sum(v.numel() * v.element_size() for n, v in sd.items() if n not in codes)
    ideal = code_bits / 8 + 4 * n_scales + rest
    float_bytes = sum(v.numel() * 4 for v in sd.values())  # mini's state dict is all float32
    print(case, {k: v for k, v in report.items() if k != "parts"}, report["parts"])
    assert report["file_bytes"] == file_bytes
    assert report["ideal_bytes"] == pytest.approx(ideal)
    assert report["float_bytes"] == float_bytes
    assert ideal <= file_bytes <= 1.01 * ideal
    assert report["overhead"] == pytest.approx(file_bytes / ideal - 1)
    # smaller than float32 by the expected factor (to within the same 1%)
    assert float_bytes / file_bytes == pytest.approx(float_bytes / ideal, rel=0.01)
    if case == "uniform4":
        assert float_bytes / file_bytes > 7  # 32/4 = 8 on the quantized weights, diluted by the float rest


class Evil:
    """A pickle that creates a file when unpickled: a weights_only load must never run it."""

    def __init__(self, side: str):
        self.side = side

    def __reduce__(self):
        return (open, (self.side, "w"))


def test_bad_files_raise(tmp_path, mini):
    with pytest.raises(DetrqError, match="not found"):
        load_packed(tmp_path / "nope.pt")

    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(DetrqError, match="refusing"):
        load_packed(junk)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(DetrqError, match="cannot read"):
        load_packed(empty)

    side = tmp_path / "side_effect"
    legacy = tmp_path / "evil_legacy.pt"
    with open(legacy, "wb") as f:
        pickle.dump({"format": FORMAT, "x": Evil(str(side))}, f, protocol=2)
    zipped = tmp_path / "evil_zip.pt"
    torch.save({"format": FORMAT, "x": Evil(str(side))}, zipped)
    assert not side.exists()
    for path in (legacy, zipped):
        with pytest.raises(DetrqError, match="refusing"):
            load_packed(path)
        assert not side.exists()

    plain = tmp_path / "plain.pt"
    torch.save({"model": mini[1]}, plain)
    with pytest.raises(DetrqError, match="not a detrq packed checkpoint"):
        load_packed(plain)

    corrupt = tmp_path / "corrupt.pt"
    obj = pack_state(_tensors(), {}, {})
    obj["index"] = torch.arange(10, dtype=torch.uint8)
    torch.save(obj, corrupt)
    with pytest.raises(DetrqError, match="corrupt"):
        load_packed(corrupt)


def test_save_is_atomic(tmp_path, monkeypatch):
    sd = _tensors()
    path = tmp_path / "p.pt"
    save_packed(path, sd, {"conv.weight": rtn_codes(sd["conv.weight"], 4, False)}, {"run": 1})
    before = path.read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial")  # the temp file is started, then the write fails
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_packed(path, sd, {"conv.weight": rtn_codes(sd["conv.weight"], 2, False)}, {"run": 2})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.pt"]  # no temp file left behind
    monkeypatch.undo()
    assert load_packed(path)[1] == {"run": 1}


def test_the_same_packing_gives_the_same_bytes(tmp_path):
    sd = _tensors()
    codes = {name: rtn_codes(sd[name], 4, True) for name in QUANTIZED}
    save_packed(tmp_path / "a.pt", sd, codes, {"bits": 4})
    save_packed(tmp_path / "b.pt", sd, codes, {"bits": 4})
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
