"""The measured per-layer costs (detrq.sensitivity.truth) on the tiny preset: features/head split, caching,
Spearman CI."""

import math

import pytest
import torch

import detrq.sensitivity.truth
from detrq.data.coco import class_balanced_subset
from detrq.data.loading import eval_dataset
from detrq.evaluation.evaluate import coco_ap, coco_metrics, evaluate
from detrq.io.errors import DetrqError
from detrq.io.paths import PROJECT_ROOT
from detrq.io.results import read_json
from detrq.models.detr import build_detr
from detrq.quant.bitmaps import quantizable_layers, quantized, uniform_bit_map
from detrq.sensitivity.distill import distillation_loss, distillation_terms
from detrq.sensitivity.truth import (MeasureSettings, as_double, measure_ap_drops, measure_layer_costs, measured_table,
                                     run_measured_costs, spearman_ci)

torch.set_num_threads(1)

# One layer of each cache stage: backbone (all recomputed), input_proj/encoder (from the cached features),
# decoder/queries/box MLP (from the cached encoder memory; the box MLP's hidden layers never reach the logits).
PROBE_LAYERS = ["backbone.0.body.layer2.0.conv1.weight", "input_proj.weight",
                "transformer.encoder.layers.0.linear1.weight",
                "transformer.decoder.layers.1.multihead_attn.in_proj_weight", "query_embed.weight",
                "bbox_embed.layers.0.weight"]


@pytest.fixture
def tiny_detr():
    torch.manual_seed(0)
    model = build_detr("tiny").eval()
    g = torch.Generator().manual_seed(0)
    batches = []
    for sizes in ([(32, 32), (32, 40), (40, 36)], [(40, 32)]):
        images = [torch.randn(3, h, w, generator=g) for h, w in sizes]
        batches.append((images, [{} for _ in sizes]))
    return model, batches


def naive_terms(model, batches, bit_map) -> dict[str, float]:
    """Eq. (5)'s terms with ``bit_map`` applied, from plain ``model(images)`` calls: the image-weighted mean."""
    with torch.no_grad():
        teacher = [as_double(model(images)) for images, _ in batches]
        sums = {"kl": 0.0, "l1": 0.0}
        with quantized(model, bit_map):
            for (images, _), t in zip(batches, teacher):
                terms = distillation_terms(as_double(model(images)), t)
                for k in sums:
                    sums[k] += len(images) * terms[k].item()
    n = sum(len(images) for images, _ in batches)
    return {k: v / n for k, v in sums.items()}


def test_features_head_encode_decode_is_forward_bit_for_bit(tiny_detr):
    model, batches = tiny_detr
    with torch.no_grad():
        for images, _ in batches:
            features = model.features(images)
            a, b, c = model(images), model.head(*features), model.decode(*model.encode(*features))
            for other in (b, c):
                assert torch.equal(a["pred_logits"], other["pred_logits"])
                assert torch.equal(a["pred_boxes"], other["pred_boxes"])
                assert all(torch.equal(x[k], y[k]) for x, y in zip(a["aux_outputs"], other["aux_outputs"]) for k in x)


def test_distillation_terms_sum_to_the_loss(tiny_detr):
    model, batches = tiny_detr
    with torch.no_grad():
        teacher = model(batches[0][0])
        with quantized(model, uniform_bit_map(model, 4)):
            student = model(batches[0][0])
    terms = distillation_terms(student, teacher)
    assert terms["kl"].item() > 0 and terms["l1"].item() > 0
    assert (terms["kl"] + terms["l1"]).item() == pytest.approx(distillation_loss(student, teacher).item(), rel=1e-6)
    assert distillation_terms(student, teacher, lambda_kl=0.0)["kl"].item() == 0.0


@pytest.mark.parametrize("reference_bits", [None, 8])
def test_cached_features_give_the_naive_loop_numbers(tiny_detr, reference_bits):
    model, batches = tiny_detr
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    model.train()
    settings = MeasureSettings(bits=(3, 5), ap_bits=(), reference_bits=reference_bits)
    got = measure_layer_costs(model, batches, settings, layers=PROBE_LAYERS)
    assert model.training and all(torch.equal(v, before[n]) for n, v in model.state_dict().items())
    model.eval()
    reference = {} if reference_bits is None else uniform_bit_map(model, reference_bits)
    ref = naive_terms(model, batches, reference)
    assert got["reference_loss"] == pytest.approx(ref["kl"] + ref["l1"], rel=1e-12, abs=0)
    assert got["reference_terms"] == pytest.approx(ref, rel=1e-12, abs=0)
    assert list(got["layers"]) == PROBE_LAYERS
    for name in PROBE_LAYERS:
        assert list(got["layers"][name]) == [3, 5]
        for b in (3, 5):
            naive = naive_terms(model, batches, {**reference, name: b})
            cost = got["layers"][name][b]
            assert cost["kl"] == pytest.approx(naive["kl"] - ref["kl"], rel=1e-9, abs=1e-12)
            assert cost["l1"] == pytest.approx(naive["l1"] - ref["l1"], rel=1e-9, abs=1e-12)
            assert cost["rise"] == pytest.approx(cost["kl"] + cost["l1"], rel=1e-12, abs=1e-15)


def test_float_reference_rises_are_nonnegative_and_box_layers_miss_the_logits(tiny_detr):
    model, batches = tiny_detr
    got = measure_layer_costs(model, batches, MeasureSettings(bits=(3, 7), ap_bits=()))
    assert got["reference_loss"] == 0.0 and got["reference_terms"] == {"kl": 0.0, "l1": 0.0}
    assert list(got["layers"]) == list(quantizable_layers(model))
    for name, per in got["layers"].items():
        for b, cost in per.items():
            assert cost["rise"] >= 0 and cost["l1"] >= 0 and cost["kl"] >= 0, (name, b, cost)
            assert cost["rise"] == pytest.approx(cost["kl"] + cost["l1"], rel=1e-12, abs=0)
    for name in ("bbox_embed.layers.0.weight", "bbox_embed.layers.1.weight"):
        assert got["layers"][name][3]["kl"] == 0.0 and got["layers"][name][3]["l1"] > 0
    assert any(per[3]["kl"] > 0 for per in got["layers"].values())


def test_spearman_ci_monotone_reversed_and_pooled():
    layers = [f"l{i}" for i in range(12)]
    pred = {n: {3: float(i), 4: i / 10} for i, n in enumerate(layers)}
    same = {n: {3: math.exp(i), 4: math.exp(i) / 7} for i, n in enumerate(layers)}
    rev = {n: {3: -float(i), 4: -i / 10} for i, n in enumerate(layers)}
    r = spearman_ci(pred, same, 3, n_boot=300)
    assert r["rho"] == pytest.approx(1.0) and r["low"] == pytest.approx(1.0) and r["high"] == pytest.approx(1.0)
    assert r["n_layers"] == 12 and r["bits"] == 3 and r["n_boot"] == 300 and r["seed"] == 0
    r = spearman_ci(pred, rev, 4, n_boot=300)
    assert r["rho"] == pytest.approx(-1.0) and r["high"] == pytest.approx(-1.0)
    g = torch.Generator().manual_seed(1)
    noisy = {n: {b: v + 3 * torch.randn((), generator=g).item() for b, v in per.items()} for n, per in pred.items()}
    for bits in (3, None):
        r = spearman_ci(pred, noisy, bits, n_boot=500, seed=2)
        assert -1 <= r["low"] <= r["rho"] <= r["high"] <= 1 and r["low"] < r["high"]
        assert r == spearman_ci(pred, noisy, bits, n_boot=500, seed=2)
    # Pooled with uneven pairs per layer (the looped bootstrap) agrees in kind with the even case.
    uneven = {n: ({3: v[3]} if i % 2 else v) for i, (n, v) in enumerate(noisy.items())}
    r = spearman_ci(pred, uneven, None, n_boot=200)
    assert -1 <= r["low"] <= r["rho"] <= r["high"] <= 1 and r["n_layers"] == 12
    with pytest.raises(DetrqError, match="at least 3"):
        spearman_ci(pred, same, 9)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    from detrq.data.synthetic import make_dataset

    root = tmp_path_factory.mktemp("synthetic")
    make_dataset(root, 12, 6, seed=0, progress=False)
    return root


def test_ap_scan_cached_features_match_evaluate(synthetic_root, monkeypatch):
    torch.manual_seed(0)
    model = build_detr("tiny").eval()
    val = eval_dataset(model, synthetic_root, "val")
    settings = MeasureSettings(ap_bits=(2, 3))
    layers = PROBE_LAYERS[:2]
    got = measure_ap_drops(model, val, settings, layers=layers, batch_size=4)
    assert got["float"] == evaluate(model, val, batch_size=4, progress=False)["AP"]
    assert coco_ap(val.coco, [], val.ids) == coco_metrics(val.coco, [], val.ids)["AP"] == 0
    for name in layers:
        with quantized(model, {name: 2}):
            assert got["layers"][name][2] == evaluate(model, val, batch_size=4, progress=False)["AP"]
        assert got["drop"][name][3] == got["float"] - got["layers"][name][3]
    monkeypatch.setattr(detrq.sensitivity.truth, "MAX_CACHED_IMAGES", 0)  # the streaming path gives the same numbers
    assert measure_ap_drops(model, val, settings, layers=layers, batch_size=4) == got


def test_ap_subsets_are_the_scan_of_those_images_alone(synthetic_root):
    """A subset's APs come from the whole scan's detections, matched once: they must be what a scan of those
    images alone measures (the mini checkpoint, so that the APs are far from 0 and a wrong subset shows)."""
    from detrq.models.loading import load_model
    from detrq.sensitivity.truth import ap_subset

    model, _ = load_model("mini", PROJECT_ROOT / "checkpoints/detr_mini.pth", "cpu", min_size=128, max_size=128)
    val = eval_dataset(model, synthetic_root, "val")
    layers = ["input_proj.weight", "class_embed.weight"]
    settings = MeasureSettings(ap_bits=(2,), ap_subsets=(3, 4, len(val)))
    got = measure_ap_drops(model, val, settings, layers=layers, batch_size=4)
    assert set(got["subsets"]) == {3, 4}  # a size not below the set's is the set itself: left out
    for n, sub in got["subsets"].items():
        assert sub["images"] == ap_subset(val.ids, n) and len(sub["images"]) == n
        alone = measure_ap_drops(model, eval_dataset(model, synthetic_root, "val", image_ids=sub["images"]),
                                 settings, layers=layers, batch_size=4)
        assert alone["float"] > 0.05
        assert sub["float"] == pytest.approx(alone["float"], abs=1e-12)
        for name in layers:
            assert sub["layers"][name][2] == pytest.approx(alone["layers"][name][2], abs=1e-12)
            assert sub["drop"][name][2] == pytest.approx(alone["drop"][name][2], abs=1e-12)
    with pytest.raises(DetrqError, match="ap_subsets"):
        MeasureSettings(ap_subsets=(0,))


def test_run_measured_costs_writes_then_hits_the_cache(synthetic_root, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = build_detr("tiny").eval()
    ids = class_balanced_subset(eval_dataset(model, synthetic_root, "train"), 4, 0)
    settings = MeasureSettings(bits=(3,), ap_bits=(3,), batch_size=3)
    out = tmp_path / "measured.json"
    calls = []
    real = detrq.sensitivity.truth.measure_layer_costs

    def once(*args, **kwargs):
        if calls:
            raise AssertionError("recomputed despite a matching cache key")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(detrq.sensitivity.truth, "measure_layer_costs", once)
    first = run_measured_costs(model, "sha", synthetic_root, "train", out, image_ids=ids, settings=settings,
                               progress=False)
    assert out.is_file() and first["image_ids"] == ids and first["reference_bits"] is None
    assert first["reference_loss"] == 0.0 and set(first["layers"]) == set(quantizable_layers(model))
    assert set(first["ap"]["layers"][PROBE_LAYERS[0]]) == {"3"} and "float" in first["ap"]
    assert {"layer_costs", "ap_drops", "total"} <= set(first["seconds"])
    second = run_measured_costs(model, "sha", synthetic_root, "train", out, image_ids=ids, settings=settings,
                                progress=False)
    assert second == first == read_json(out) and len(calls) == 1
    rise = measured_table(second)
    assert rise[PROBE_LAYERS[0]][3] == first["layers"][PROBE_LAYERS[0]]["3"]["rise"]
    assert measured_table(second, "ap_drop")[PROBE_LAYERS[0]] == {3: first["ap"]["drop"][PROBE_LAYERS[0]]["3"]}
    with pytest.raises(DetrqError, match="key"):
        measured_table(second, "nope")
    # Another setting is another key: it recomputes (and the guard trips).
    with pytest.raises(AssertionError, match="recomputed"):
        run_measured_costs(model, "sha", synthetic_root, "train", out, image_ids=ids, progress=False,
                           settings=MeasureSettings(bits=(4,), ap_bits=(), batch_size=3))


def test_settings_are_checked():
    with pytest.raises(DetrqError, match="bit widths"):
        MeasureSettings(bits=(1,))
    with pytest.raises(DetrqError, match="bit widths"):
        MeasureSettings(reference_bits=True)
    with pytest.raises(DetrqError, match="batch sizes"):
        MeasureSettings(batch_size=0)
