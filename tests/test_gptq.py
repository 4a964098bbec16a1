"""GPTQ: output error against round-to-nearest and a brute-force optimum, the RTN limit, the code range and grid;
the input Hessians of a tiny DETR against ones built independently from the sub-computations."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detrq.io.errors import DetrqError
from detrq.models.detr import build_detr, pad_images
from detrq.quant.bitmaps import quantizable_layers
from detrq.quant.codes import QuantizerSettings, channel_scale, dequantize, rtn_codes
from detrq.quant.gptq import collect_input_hessians, gptq_codes, gptq_layer_codes

torch.set_num_threads(1)


def output_error(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    """||X Wq^T - X W^T||^2 on the calibration inputs, in float64."""
    return (x @ (wq.double() - w.double()).T).pow(2).sum().item()


def factor_inputs(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    """Inputs sharing one common factor: the correlated activations that GPTQ's compensation exploits."""
    return torch.randn(n, d, generator=g, dtype=torch.float64) + 1.5 * torch.randn(n, 1, generator=g,
                                                                                    dtype=torch.float64)


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    return 2 / x.shape[0] * x.T @ x


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_output_error_below_round_to_nearest(bits, act_order):
    # GPTQ is greedy: on a single small layer it can lose to RTN by chance, so the claim is over ten layers.
    gptq_total = rtn_total = 0.0
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(6, 5, generator=g)
        x = factor_inputs(200, 5, g)
        codes = gptq_codes(w, hessian_of(x), bits, act_order=act_order)
        gptq_total += output_error(x, w, dequantize(codes))
        rtn_total += output_error(x, w, dequantize(rtn_codes(w, bits, per_channel=True)))
    assert gptq_total <= 0.9 * rtn_total


def hessian_error(h: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    """sum over rows of e^T H e, e = Wq - W: the output error up to the factor N/2."""
    e = (wq - w).double().reshape(w.shape[0], -1)
    return torch.einsum("ri,ij,rj->", e, h.double(), e).item()


def grid_optimum(h: torch.Tensor, w: torch.Tensor, bits: int) -> float:
    """The least ``hessian_error`` over every code combination on the per-channel grid, row by row."""
    levels = 2 ** (bits - 1) - 1
    codes = torch.tensor(list(itertools.product(range(-levels, levels + 1), repeat=w.shape[1])),
                         dtype=torch.float32)
    step = channel_scale(w).reshape(-1) / levels
    return sum(torch.einsum("ci,ij,cj->c", e, h, e).min().item()
               for e in ((codes * step[r] - w[r]).double() for r in range(w.shape[0])))


@pytest.mark.parametrize("bits", [2, 3])
def test_gptq_between_brute_force_optimum_and_round_to_nearest(bits):
    gptq_total = rtn_total = opt_total = 0.0
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(2, 4, generator=g)
        h = hessian_of(factor_inputs(50, 4, g))
        gptq = hessian_error(h, w, dequantize(gptq_codes(w, h, bits)))
        opt = grid_optimum(h, w, bits)
        assert opt <= gptq * (1 + 1e-9)
        gptq_total, opt_total = gptq_total + gptq, opt_total + opt
        rtn_total += hessian_error(h, w, dequantize(rtn_codes(w, bits, per_channel=True)))
    assert gptq_total < rtn_total
    assert gptq_total <= 1.5 * opt_total


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [2, 3])
def test_gptq_is_the_optimum_for_a_diagonal_hessian(bits, act_order):
    # A diagonal H makes the error separable per weight: nearest rounding is optimal, and GPTQ is exactly that.
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 4, generator=g)
    h = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64).diag()
    codes = gptq_codes(w, h, bits, act_order=act_order)
    assert hessian_error(h, w, dequantize(codes)) == pytest.approx(grid_optimum(h, w, bits), rel=1e-9)
    assert torch.equal(codes.q, rtn_codes(w, bits, per_channel=True).q)


@pytest.mark.parametrize("shape", [(7, 9), (5, 3, 3, 3)])
@pytest.mark.parametrize("bits", [2, 4, 8, 12])
def test_identity_hessian_gives_round_to_nearest_codes(shape, bits):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(bits))
    d = math.prod(shape[1:])
    # An all-zero H (every input dead) is the identity after the dead-input fix.
    for h in (torch.eye(d), 3.7 * torch.eye(d, dtype=torch.float64), torch.zeros(d, d)):
        for act_order in (False, True):
            codes = gptq_codes(w, h, bits, act_order=act_order, block_size=4)
            rtn = rtn_codes(w, bits, per_channel=True)
            assert codes.q.dtype == rtn.q.dtype and torch.equal(codes.q, rtn.q)
            assert torch.equal(codes.scale, rtn.scale)


@pytest.mark.parametrize("bits", [2, 3, 5])
def test_codes_in_range_and_on_the_per_channel_grid(bits):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 2, 2, 3, generator=g) * torch.linspace(0.1, 3, 8).reshape(8, 1, 1, 1)
    w[2] = 0  # an all-zero output channel
    # Strongly correlated inputs push compensated weights past max|W|: clamping must keep codes in range.
    x = factor_inputs(100, 12, g) * 5
    x[:, 4] = 0  # a dead input
    codes = gptq_codes(w, hessian_of(x), bits, act_order=True, block_size=5)
    levels = 2 ** (bits - 1) - 1
    assert codes.q.shape == w.shape and codes.q.dtype == torch.int8
    assert codes.q.abs().max().item() == levels  # the range is reached (so the clamp is tested) ...
    assert codes.q.abs().max().item() <= levels  # ... and never exceeded
    assert torch.equal(codes.scale, channel_scale(w))
    wq = dequantize(codes)
    step = channel_scale(w) / levels
    assert torch.allclose(wq / step, torch.round(wq / step), atol=1e-5)
    assert (wq.abs() <= channel_scale(w) * (1 + 1e-6)).all()
    assert not codes.q[2].any()
    assert gptq_codes(w, hessian_of(x), 12).q.dtype == torch.int32


def test_block_size_does_not_change_the_codes():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(5, 11, generator=g)
    h = hessian_of(factor_inputs(80, 11, g))
    ref = gptq_codes(w, h, 3, act_order=True, block_size=128).q
    assert all(torch.equal(gptq_codes(w, h, 3, act_order=True, block_size=b).q, ref) for b in (1, 3, 4))


def test_bad_inputs_are_refused():
    w = torch.randn(4, 3)
    with pytest.raises(DetrqError, match=r"\(3, 3\) Hessian"):
        gptq_codes(w, torch.eye(4), 4)
    with pytest.raises(DetrqError, match="non-finite"):
        gptq_codes(w, torch.full((3, 3), float("nan")), 4)
    with pytest.raises(DetrqError, match="bits"):
        gptq_codes(w, torch.eye(3), 1)
    with pytest.raises(DetrqError, match="tile"):
        gptq_layer_codes(w, [(slice(0, 2), torch.eye(3)), (slice(3, 4), torch.eye(3))], 4, QuantizerSettings())


def test_layer_codes_quantize_each_row_slice_with_its_own_hessian():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(6, 8, generator=g)
    hs = [torch.eye(8)] + [hessian_of(factor_inputs(30, 8, g) * torch.linspace(1, k, 8)) for k in (4, 0.2)]
    settings = QuantizerSettings(name="gptq", act_order=True, block_size=2)
    codes = gptq_layer_codes(w, [(slice(2 * i, 2 * i + 2), h) for i, h in enumerate(hs)], 2, settings)
    parts = [gptq_codes(w[2 * i:2 * i + 2], h, 2, act_order=True, block_size=2).q for i, h in enumerate(hs)]
    assert torch.equal(codes.q, torch.cat(parts)) and torch.equal(codes.scale, channel_scale(w))
    # The identity block is round to nearest; the others are not (their own Hessians were used).
    rtn = rtn_codes(w, 2, per_channel=True).q
    assert torch.equal(codes.q[:2], rtn[:2]) and not torch.equal(codes.q[2:], rtn[2:])


# ---- input Hessians of a tiny DETR ----

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_detr("tiny").double()
    g = torch.Generator().manual_seed(0)
    # Different sizes in one batch, so the padding mask hides keys of the first image.
    batches = [([torch.randn(3, h, w, generator=g, dtype=torch.float64) for h, w in sizes], None)
               for sizes in ([(64, 64), (64, 96)], [(96, 64), (64, 64)])]
    return model, batches


def attention_context(mha: nn.MultiheadAttention, query, key, value, mask):
    """Multi-head attention before its output projection, written out by hand ([L, B, E] layout)."""
    e, h = mha.embed_dim, mha.num_heads
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)

    def heads(t):
        return t.reshape(t.shape[0], t.shape[1], h, e // h).permute(1, 2, 0, 3)

    q, k, v = heads(query @ wq.T + bq), heads(key @ wk.T + bk), heads(value @ wv.T + bv)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(e // h)
    if mask is not None:
        scores = scores.masked_fill(mask[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v).permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], e)


def conv_jacobian_columns(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Each output pixel's input vector, as the output of the conv with one-hot weights (no unfold)."""
    d = math.prod(conv.weight.shape[1:])
    onehot = torch.eye(d, dtype=x.dtype).reshape(d, *conv.weight.shape[1:])
    out = F.conv2d(x, onehot, stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
    return out.permute(0, 2, 3, 1).reshape(-1, d)


def independent_inputs(model, batches) -> dict[str, list[torch.Tensor]]:
    """Each checked weight's input vectors, rebuilt from the model's sub-computations without hooks."""
    enc, dec = model.transformer.encoder.layers[0], model.transformer.decoder.layers[0]
    body = model.backbone[0].body
    seen: dict[str, list[torch.Tensor]] = {}

    def add(name, x):
        seen.setdefault(name, []).append(x.reshape(-1, x.shape[-1]))

    with torch.no_grad():
        for images, _ in batches:
            x, _ = pad_images(images)
            stem = body.layer1(body.maxpool(body.relu(body.bn1(body.conv1(x)))))
            add("backbone.0.body.layer2.0.conv1.weight", conv_jacobian_columns(body.layer2[0].conv1, stem))
            feat, mask0, pos0 = model.features(images)
            src = model.input_proj(feat).flatten(2).permute(2, 0, 1)
            pos, mask = pos0.flatten(2).permute(2, 0, 1), mask0.flatten(1)
            assert mask.any()
            visible = ~mask.T
            qk = src + pos
            rows = ["q", "k", "v"]
            for r, t in zip(rows, (qk, qk[visible], src[visible])):
                add(f"enc.in_proj.{r}", t)
            add("transformer.encoder.layers.0.self_attn.out_proj.weight",
                attention_context(enc.self_attn, qk, qk, src, mask))
            x1 = enc.norm1(src + enc.self_attn(qk, qk, value=src, key_padding_mask=mask)[0])
            add("transformer.encoder.layers.0.linear1.weight", x1)
            memory, mask, pos = model.encode(feat, mask0, pos0)
            query_pos = model.query_embed.weight.unsqueeze(1).repeat(1, memory.shape[1], 1)
            tgt = dec.norm1(dec.self_attn(query_pos, query_pos, value=torch.zeros_like(query_pos))[0])
            query, key = tgt + query_pos, memory + pos
            for r, t in zip(rows, (query, key[visible], memory[visible])):
                add(f"dec.in_proj.{r}", t)
            add("transformer.decoder.layers.0.multihead_attn.out_proj.weight",
                attention_context(dec.multihead_attn, query, key, memory, mask))
    return {name: hessian_of(torch.cat(xs)) for name, xs in seen.items()}


def test_input_hessians_of_tiny_detr_match_independent_ones(tiny):
    model, batches = tiny
    model.train()
    layers = quantizable_layers(model)
    got = collect_input_hessians(model, batches, layers)
    assert model.training
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert "query_embed.weight" not in got and set(got) == set(layers) - {"query_embed.weight"}
    model.eval()
    expected = independent_inputs(model, batches)

    def close(a, b):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item())

    e = model.cfg.hidden_dim
    for prefix, name in (("enc", "transformer.encoder.layers.0.self_attn.in_proj_weight"),
                         ("dec", "transformer.decoder.layers.0.multihead_attn.in_proj_weight")):
        assert [rows for rows, _ in got[name]] == [slice(0, e), slice(e, 2 * e), slice(2 * e, 3 * e)]
        for (_, h), r in zip(got[name], "qkv"):
            close(h, expected[f"{prefix}.in_proj.{r}"])
    for name in ("backbone.0.body.layer2.0.conv1.weight", "transformer.encoder.layers.0.linear1.weight",
                 "transformer.encoder.layers.0.self_attn.out_proj.weight",
                 "transformer.decoder.layers.0.multihead_attn.out_proj.weight"):
        ((rows, h),) = got[name]
        assert rows == slice(0, layers[name].shape[0])
        close(h, expected[name])
    # Every entry feeds gptq_layer_codes for its whole tensor.
    name = "transformer.decoder.layers.0.multihead_attn.in_proj_weight"
    codes = gptq_layer_codes(layers[name].detach(), got[name], 4, QuantizerSettings(name="gptq"))
    assert codes.q.shape == layers[name].shape


def test_grouped_conv_refused_and_hooks_removed():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, groups=2))
    layers = dict(model.named_parameters())
    with pytest.raises(DetrqError, match="groups=2"):
        collect_input_hessians(model, [(torch.randn(1, 4, 6, 6), None)], {k: layers[k] for k in ("0.weight",
                                                                                                  "1.weight")})
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_conv_hessian_with_stride_dilation_and_reflect_padding():
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=2, dilation=2, padding_mode="reflect").double()
    x = torch.randn(2, 2, 9, 11, dtype=torch.float64)
    ((_, h),) = collect_input_hessians(conv, [(x, None)], {"weight": conv.weight})["weight"]
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    plain = nn.Conv2d(2, 3, 3, stride=2, dilation=2).double()
    torch.testing.assert_close(h, hessian_of(conv_jacobian_columns(plain, padded)), rtol=1e-10, atol=1e-10)
