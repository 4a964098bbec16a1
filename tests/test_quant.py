"""Eq. (6) quantizer, the quantizable-layer policy, bit-map I/O, apply/restore and the model-size formula."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from detrq.io.errors import DetrqError
from detrq.quant.bitmaps import (apply_bit_map, average_bits, load_bit_map, model_size_bits, quantizable_layers,
                                 quantize_model_copy, quantize_tensor, quantized, save_bit_map, uniform_bit_map)

torch.set_num_threads(1)


class HeadsNet(nn.Module):
    """A few modules named like DETR's, to exercise the policy without building a DETR."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.backbone[0].weight.requires_grad_(False)  # like R50's frozen conv1/layer1
        self.input_proj = nn.Conv2d(4, 8, 1)
        self.attn = nn.MultiheadAttention(8, 2)
        self.norm = nn.LayerNorm(8)
        self.query_embed = nn.Embedding(3, 8)
        self.class_embed = nn.Linear(8, 5)
        self.bbox_embed = nn.Module()
        self.bbox_embed.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)])


def test_quantize_tensor_matches_eq6_in_float64():
    w = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    for bits in range(2, 9):
        levels = 2 ** (bits - 1) - 1
        wd = w.double().numpy()
        s = np.abs(wd).max()
        expected = np.round(wd * levels / s) * s / levels
        np.testing.assert_allclose(quantize_tensor(w, bits).double().numpy(), expected, rtol=0, atol=1e-6 * s)


def test_number_of_levels():
    w = torch.randn(20000, generator=torch.Generator().manual_seed(1))
    dense = torch.linspace(-1, 1, 100001)
    for bits in range(8, 1, -1):
        assert quantize_tensor(w, bits).unique().numel() <= 2**bits - 1
        assert quantize_tensor(dense, bits).unique().numel() == 2**bits - 1


def test_max_is_kept_and_zero_tensor_stays_zero():
    w = torch.tensor([-0.3, 0.1, 0.7])
    assert quantize_tensor(w, 4)[2] == pytest.approx(0.7)
    z = quantize_tensor(torch.zeros(3, 3), 4)
    assert torch.equal(z, torch.zeros(3, 3))


@pytest.mark.parametrize("bits", [1, 17, True, 4.0])
def test_bad_bits(bits):
    with pytest.raises(DetrqError, match="bits"):
        quantize_tensor(torch.ones(2), bits)


def test_policy_on_detr_like_names():
    names = set(quantizable_layers(HeadsNet()))
    assert names == {"input_proj.weight", "attn.in_proj_weight", "attn.out_proj.weight", "query_embed.weight",
                     "bbox_embed.layers.0.weight", "bbox_embed.layers.1.weight"}
    with_frozen = quantizable_layers(HeadsNet(), include_frozen=True, exclude=())
    assert {"backbone.0.weight", "class_embed.weight", "bbox_embed.layers.2.weight"} <= set(with_frozen)


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(torch.int32).clone()


def test_apply_and_restore_are_bit_exact():
    torch.manual_seed(0)
    model = HeadsNet()
    before = {n: bits_of(p) for n, p in model.named_parameters()}
    bit_map = uniform_bit_map(model, 3)
    with quantized(model, bit_map):
        for name, p in model.named_parameters():
            if name in bit_map:
                assert p.unique().numel() <= 7
                assert torch.equal(p, quantize_tensor(before[name].view(torch.float32), 3))
            else:
                assert torch.equal(bits_of(p), before[name])
    assert all(torch.equal(bits_of(p), before[n]) for n, p in model.named_parameters())

    handle = apply_bit_map(model, {"input_proj.weight": 2})
    assert not torch.equal(bits_of(model.input_proj.weight), before["input_proj.weight"])
    handle.restore()
    assert all(torch.equal(bits_of(p), before[n]) for n, p in model.named_parameters())

    copy = quantize_model_copy(model, bit_map)
    assert all(torch.equal(bits_of(p), before[n]) for n, p in model.named_parameters())
    assert torch.equal(copy.input_proj.weight, quantize_tensor(model.input_proj.weight, 3))


def test_apply_rejects_unknown_names():
    with pytest.raises(DetrqError, match="'nope.weight'"):
        apply_bit_map(HeadsNet(), {"nope.weight": 4})


def test_model_size_and_average_bits():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))  # 12 + 4 params, 4 + 4 params, 2x4 + 1 buffers
    float_bits = (12 + 4 + 4 + 4 + 4 + 4 + 1) * 32
    assert model_size_bits(model, {}) == float_bits
    assert model_size_bits(model, {"0.weight": 4}) == float_bits - 12 * 32 + 12 * 4 + 32
    assert average_bits({"a": 4, "b": 6}, {"a": 30, "b": 10, "c": 99}) == pytest.approx(4.5)


def test_bit_map_round_trip_and_validation(tmp_path):
    model = HeadsNet()
    bit_map = uniform_bit_map(model, 5)
    path = save_bit_map(tmp_path / "bits.json", bit_map, metric="out-quant", avg_bits=5)
    assert load_bit_map(path, model) == bit_map
    assert json.loads(path.read_text())["meta"] == {"metric": "out-quant", "avg_bits": 5}

    path.write_text(json.dumps({"bit_map": {"class_embed.weight": 4}}))
    assert load_bit_map(path) == {"class_embed.weight": 4}
    with pytest.raises(DetrqError, match="'class_embed.weight' is not a quantizable layer"):
        load_bit_map(path, model)
    path.write_text(json.dumps({"bit_map": {"input_proj.weight": 4, "query_embed.weight": 0}}))
    with pytest.raises(DetrqError, match="'query_embed.weight'"):
        load_bit_map(path, model)
    path.write_text("{not json")
    with pytest.raises(DetrqError, match="corrupt JSON"):
        load_bit_map(path)
    path.write_text("[1, 2]")
    with pytest.raises(DetrqError, match="not a bit map file"):
        load_bit_map(path)


def test_policy_on_detr_r50():
    detr = pytest.importorskip("detrq.models.detr")
    model = detr.build_detr("r50")
    names = quantizable_layers(model)
    assert all(p.ndim >= 2 and p.requires_grad for p in names.values())
    assert not any(n.startswith(("class_embed.", "bbox_embed.layers.2.", "backbone.0.body.conv1.",
                                 "backbone.0.body.layer1.")) for n in names)
    assert not any(n.endswith("bias") or ".norm" in n for n in names)
    assert {"query_embed.weight", "input_proj.weight", "bbox_embed.layers.0.weight", "bbox_embed.layers.1.weight",
            "backbone.0.body.layer2.0.downsample.0.weight", "transformer.encoder.layers.0.self_attn.in_proj_weight",
            "transformer.decoder.layers.5.multihead_attn.out_proj.weight",
            "transformer.decoder.layers.5.linear2.weight"} <= set(names)
    # 6 encoder layers x 4 + 6 decoder layers x 6 + 2 box hidden + input_proj + query_embed, + ResNet layer2-4 convs
    resnet = [n for n in names if n.startswith("backbone.")]
    assert len(names) - len(resnet) == 6 * 4 + 6 * 6 + 2 + 2
    assert len(resnet) == (4 * 3 + 1) + (6 * 3 + 1) + (3 * 3 + 1)
