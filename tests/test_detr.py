"""The DETR model: official layout, loading, padding/masks, position encoding, post-processing."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from detrq.io.errors import DetrqError
from detrq.models.detr import (PositionEmbeddingSine, StemMaxPool, build_detr, guess_preset, load_checkpoint,
                               pad_images, postprocess)

MANIFEST = Path(__file__).resolve().parents[2] / "shared" / "detr_r50_state_dict_manifest.json"
torch.set_num_threads(1)


def manifest_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    entries = json.loads(MANIFEST.read_text())["entries"]
    return {e["name"]: torch.randn(e["shape"], generator=g) * 0.02 for e in entries}


@pytest.fixture(scope="module")
def r50():
    return build_detr("r50").eval()


@pytest.mark.skipif(not MANIFEST.is_file(), reason="needs ../shared/detr_r50_state_dict_manifest.json")
def test_r50_state_dict_equals_manifest_and_loads_strictly(r50, tmp_path):
    entries = json.loads(MANIFEST.read_text())["entries"]
    assert [(k, list(v.shape)) for k, v in r50.state_dict().items()] == [(e["name"], e["shape"]) for e in entries]
    trainable = {e["name"]: e["requires_grad"] for e in entries if e["kind"] == "parameter"}
    assert {k: p.requires_grad for k, p in r50.named_parameters()} == trainable
    sd = manifest_state_dict()
    path = tmp_path / "detr-r50.pth"
    torch.save({"model": sd}, path)
    load_checkpoint(r50, path)
    assert torch.equal(r50.state_dict()["query_embed.weight"], sd["query_embed.weight"])


def test_forward_shapes_and_aux_outputs_share_the_final_norm():
    torch.manual_seed(0)
    model = build_detr("tiny").eval()
    out = model([torch.randn(3, 64, 80), torch.randn(3, 48, 64)])
    q, c = model.cfg.num_queries, model.cfg.num_classes + 1
    assert out["pred_logits"].shape == (2, q, c) and out["pred_boxes"].shape == (2, q, 4)
    assert len(out["aux_outputs"]) == model.cfg.dec_layers - 1
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    # The aux output must be the class head applied to decoder layer 1 *after* the shared norm.
    captured = []
    hook = model.transformer.decoder.layers[0].register_forward_hook(lambda m, i, o: captured.append(o))
    out = model([torch.randn(3, 64, 64)])
    hook.remove()
    expected = model.class_embed(model.transformer.decoder.norm(captured[0])).transpose(0, 1)
    torch.testing.assert_close(out["aux_outputs"][0]["pred_logits"], expected)


def test_padding_is_bottom_right_to_batch_max_without_rounding():
    a, b = torch.ones(3, 283, 351), torch.ones(3, 317, 409)
    batch, mask = pad_images([a, b])
    assert batch.shape == (2, 3, 317, 409)
    assert not mask[0, :283, :351].any() and mask[0, 283:, :].all() and mask[0, :, 351:].all()
    assert batch[0, :, 283:].abs().sum() == 0 and not mask[1].any()


def test_feature_mask_uses_legacy_nearest():
    # FIELD_NOTES: a 283x351 image padded to 317x409 keeps 9x12 valid cells on a 10x13 map (legacy 'nearest';
    # 'nearest-exact' or ceil(283/32) would give other counts). Feed the backbone a fake trunk with that map.
    backbone = build_detr("tiny").backbone[0]
    del backbone._modules["body"]
    object.__setattr__(backbone, "body", lambda x: torch.zeros(x.shape[0], 8, 10, 13))
    x, mask = pad_images([torch.ones(3, 283, 351), torch.ones(3, 317, 409)])
    _, m = backbone(x, mask)
    assert m.shape == (2, 10, 13)
    assert (~m[0]).sum().item() == 9 * 12 and not m[1].any()


def test_sine_encoding_matches_the_formula():
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    mask[0, :, 3] = True  # last column is padding
    pos = PositionEmbeddingSine(8)(mask)
    assert pos.shape == (1, 16, 3, 4)
    scale = 2 * math.pi
    y, x = 1, 2  # a valid cell; cumsums are 1-based and normalised by the last valid value
    y_n, x_n = (y + 1) / (3 + 1e-6) * scale, (x + 1) / (3 + 1e-6) * scale
    for i in range(8):
        dim_t = 10000 ** (2 * (i // 2) / 8)
        f = math.sin if i % 2 == 0 else math.cos
        assert pos[0, i, y, x].item() == pytest.approx(f(y_n / dim_t), abs=1e-5)  # y first
        assert pos[0, 8 + i, y, x].item() == pytest.approx(f(x_n / dim_t), abs=1e-5)


def test_postprocess_drops_no_object_and_scales_boxes():
    logits = torch.tensor([[[0.0, 5.0, 0.0, 9.0]]])  # no-object column is the largest; it must be ignored
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4]]])
    (res,) = postprocess({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))
    assert res["labels"].item() == 1
    p = torch.softmax(logits[0, 0], -1)[1].item()
    assert res["scores"].item() == pytest.approx(p)
    torch.testing.assert_close(res["boxes"][0], torch.tensor([80.0, 30.0, 120.0, 70.0]))


def test_checkpoint_errors_are_one_clear_line(tmp_path):
    model = build_detr("tiny")
    with pytest.raises(DetrqError, match="checkpoint not found"):
        load_checkpoint(model, tmp_path / "nope.pth")
    sd = model.state_dict()
    sd["query_embed.renamed"] = sd.pop("query_embed.weight")
    torch.save({"model": sd}, tmp_path / "renamed.pth")
    with pytest.raises(DetrqError, match=r"missing keys \['query_embed.weight'\].*unexpected keys "
                                         r"\['query_embed.renamed'\]"):
        load_checkpoint(model, tmp_path / "renamed.pth")
    torch.save(build_detr("mini").state_dict(), tmp_path / "mini.pth")
    with pytest.raises(DetrqError, match="looks like preset 'mini'"):
        load_checkpoint(model, tmp_path / "mini.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DetrqError, match="garbage.pth"):
        load_checkpoint(model, tmp_path / "garbage.pth")


def test_guess_preset_and_bare_state_dict(tmp_path):
    model = build_detr("tiny")
    assert guess_preset(model.state_dict()) == "tiny"
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    load_checkpoint(build_detr("tiny"), tmp_path / "bare.pth")


def test_the_stem_max_pool_without_autograd_is_max_pool2d():
    pool = StemMaxPool()
    generator = torch.Generator().manual_seed(0)
    for shape in [(2, 3, 64, 64), (1, 4, 63, 65), (1, 2, 5, 7), (1, 1, 1, 1), (1, 1, 2, 3)]:
        x = torch.randn(shape, generator=generator).relu()  # as after the stem's ReLU: ties at 0 included
        with torch.no_grad():
            fast = pool(x)
        assert fast.dtype == x.dtype and torch.equal(fast, F.max_pool2d(x, 3, 2, 1)), shape
    x = torch.randn(1, 2, 6, 6, generator=generator, requires_grad=True)
    assert pool(x).grad_fn is not None  # with autograd: max_pool2d itself, whose backward is torch's
