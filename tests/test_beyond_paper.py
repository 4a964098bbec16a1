"""Beyond the paper: the quantizer setting (eq6, per-channel, gptq) through bit maps, costs, sizes and cache keys;
the Pareto sweep and Table 2 on the embedded model; packed sizes equal the sizes the tables report; the
reproduction report and accept handle Table 2 and the sweep's folder."""

import json
import math

import pytest
import torch

from detrq.artifact import reproduction as rp
from detrq.artifact.pareto import (MEASURED, UNIFORM, SweepSettings, moonshot, per_class_losses, run_sweep, table2,
                                   table2_markdown, write_table2)
from detrq.artifact.pipeline import quantizer_key, run_allocation
from detrq.data.loading import eval_dataset
from detrq.io.errors import DetrqError
from detrq.io.layout import results_file
from detrq.io.paths import PROJECT_ROOT
from detrq.io.results import read_json
from detrq.models.detr import build_detr
from detrq.models.loading import load_model
from detrq.quant.bitmaps import apply_bit_map, model_size_bits, quantizable_layers, quantize_tensor, uniform_bit_map
from detrq.quant.codes import QuantizerSettings, dequantize
from detrq.quant.packing import save_packed
from detrq.quant.quantizers import EQ6, WeightQuantizer
from detrq.sensitivity.costs import cost_table, squared_errors

torch.set_num_threads(1)
PER_CHANNEL = WeightQuantizer(QuantizerSettings(name="per-channel"))


def test_eq6_quantizer_is_the_papers_eq6_and_stays_out_of_cache_keys():
    w = torch.randn(8, 5)
    for bits in (2, 4, 8):
        levels = 2 ** (bits - 1) - 1
        s = w.abs().max()
        assert torch.equal(EQ6.quantize("w", w, bits), torch.round(w * (levels / s)) * (s / levels))
        assert torch.equal(EQ6.quantize("w", w, bits), quantize_tensor(w, bits))
    assert quantizer_key(EQ6) == {} and quantizer_key(PER_CHANNEL) == {"quantizer": {"name": "per-channel"}}


def test_per_channel_has_one_scale_per_output_channel_and_less_error():
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3) * torch.logspace(-2, 0, 6)[:, None, None, None]
    q = PER_CHANNEL.quantize("w", w, 4)
    for c in range(6):  # each channel on its own grid of max|W_c| / 7
        step = w[c].abs().max() / 7
        assert torch.allclose(q[c] / step, torch.round(q[c] / step), atol=1e-4)
    err = squared_errors({"w": w}, [3, 4], quantizer=PER_CHANNEL)["w"]
    assert all(err[b] < squared_errors({"w": w}, [b])["w"][b] for b in (3, 4))
    assert PER_CHANNEL.scale_count(w) == 6 and EQ6.scale_count(w) == 1


def test_gptq_needs_calibration_and_falls_back_without_an_input():
    with pytest.raises(DetrqError, match="calibration"):
        WeightQuantizer(QuantizerSettings(name="gptq"))
    gptq = WeightQuantizer(QuantizerSettings(name="gptq"), hessians={})
    w = torch.randn(5, 7)
    assert torch.equal(gptq.quantize("query_embed.weight", w, 4), PER_CHANNEL.quantize("q", w, 4))
    with pytest.raises(DetrqError, match="unknown quantizer"):
        QuantizerSettings(name="int4")


@pytest.mark.parametrize("quantizer", [EQ6, PER_CHANNEL], ids=["eq6", "per-channel"])
def test_packed_file_size_is_the_size_the_tables_report(tmp_path, quantizer):
    torch.manual_seed(0)
    model = build_detr("mini")
    layers = quantizable_layers(model)
    bit_map = {n: 3 + i % 6 for i, n in enumerate(layers)}
    handle = apply_bit_map(model, bit_map, quantizer)
    fake = {n: p.detach().clone() for n, p in layers.items()}
    handle.restore()
    codes = {n: quantizer.codes(n, layers[n], b) for n, b in bit_map.items()}
    assert all(torch.equal(dequantize(codes[n]), fake[n]) for n in bit_map)
    report = save_packed(tmp_path / "m.pt", model.state_dict(), codes, {})
    ideal_bits = model_size_bits(model, bit_map, quantizer)
    # Each layer's bit stream ends on a whole byte: at most one byte per layer above the bit count.
    assert 0 <= report["ideal_bytes"] - ideal_bits / 8 <= len(bit_map)
    assert report["file_bytes"] <= 1.01 * ideal_bits / 8


@pytest.fixture(scope="module")
def embedded():
    if not (PROJECT_ROOT / "data/synthetic/annotations/instances_val.json").is_file():
        pytest.skip("the synthetic data set is not generated (./reproduce.sh generates it)")
    model, sha = load_model("mini", PROJECT_ROOT / "checkpoints/detr_mini.pth")
    return model, sha


def test_allocation_costs_follow_the_quantizer_and_measured_costs_must_match_it(embedded, tmp_path):
    model, _ = embedded
    traces = read_json(results_file(PROJECT_ROOT / "results", "traces_out-first-order.json"))
    weights = {n: p.detach() for n, p in quantizable_layers(model).items()}
    eq6 = cost_table(traces, weights, range(3, 7))
    pc = cost_table(traces, weights, range(3, 7), quantizer=PER_CHANNEL)
    assert all(pc[n][4] < eq6[n][4] for n in eq6 if eq6[n][4] > 0)
    a = run_allocation(model, traces, 4.0, range(3, 7), tmp_path / "a.json")
    b = run_allocation(model, traces, 4.0, range(3, 7), tmp_path / "b.json", quantizer=PER_CHANNEL)
    assert a["cache_key"] != b["cache_key"] and b["quantizer"] == "per-channel"
    assert b["size_bits"] > a["size_bits"] - 1 or a["bit_map"] != b["bit_map"]
    measured = read_json(results_file(PROJECT_ROOT / "results", "measured_costs.json"))
    with pytest.raises(DetrqError, match="measured with the eq6 quantizer"):
        cost_table(measured, weights, range(3, 7), quantizer=PER_CHANNEL)


def test_sweep_table2_and_per_class_on_the_embedded_model(embedded, tmp_path):
    model, sha = embedded
    dataset = eval_dataset(model, PROJECT_ROOT / "data/synthetic", "val", max_images=12)
    traces = read_json(results_file(PROJECT_ROOT / "results", "traces_out-first-order.json"))
    sources = {"out-first-order": traces}
    quantizers = {"eq6": EQ6, "per-channel": PER_CHANNEL}
    settings = SweepSettings(targets=(4.0, 6.0), bits=(3, 8), uniform_bits=(4, 6), batch_size=4)
    sweep = run_sweep(model, sha, dataset, {q: sources for q in quantizers}, quantizers, tmp_path, settings)
    points = sweep["points"]
    # eq6 (the full front) at both targets, per-channel at Table 2's 4 and 6 only; uniform at 4 and 6 for both.
    assert {(p["quantizer"], p["source"], p["target"]) for p in points} == {
        (q, s, t) for q in quantizers for s in ("out-first-order", UNIFORM) for t in (4.0, 6.0)}
    assert all(abs(p["avg_bits"] - p["target"]) < 0.02 and 0 <= p["AP"] <= 1 and p["per_class"] for p in points)
    uniform4 = next(p for p in points if p["source"] == UNIFORM and p["target"] == 4.0 and p["quantizer"] == "eq6")
    assert uniform4["size_mb"] == pytest.approx(model_size_bits(model, uniform_bit_map(model, 4)) / 8e6)
    assert read_json(results_file(tmp_path, "pareto.json"))["points"] == points
    again = run_sweep(model, sha, dataset, {q: sources for q in quantizers}, quantizers, tmp_path, settings)
    assert again["points"] == points  # every allocation and evaluation is a cache hit with the same numbers
    table = table2(sweep, {"out-first-order": "First-Order"})
    assert {r["precision"] for r in table["rows"]} == {"6-bit", "4-bit"}
    row = next(r for r in table["rows"] if r["quantizer"] == "per-channel" and r["source"] != UNIFORM
               and r["precision"] == "4-bit")
    base = next(r for r in table["rows"] if r["quantizer"] == "per-channel" and r["source"] == UNIFORM
                and r["precision"] == "4-bit")
    assert row["delta_uniform"] == pytest.approx(row["AP"] - base["AP"])
    write_table2(table, tmp_path)
    assert "First-Order" in results_file(tmp_path, "table2.md").read_text()
    assert results_file(tmp_path, "table2.csv").is_file()
    losses = per_class_losses(sweep, "eq6", 4.0)
    worst = [max(d[i] for d in losses["drops"].values()) for i in range(len(losses["classes"]))]
    assert worst == sorted(worst, reverse=True)


def test_moonshot_verdict_and_table2_markdown():
    rows = [{"precision": "4-bit", "quantizer": "gptq", "source": "measured", "label": "M", "AP": 0.478,
             "avg_bits": 4.0, "size_mb": 1.0, "delta_uniform": 0.1, "delta_float": -0.008},
            {"precision": "4-bit", "quantizer": "eq6", "source": UNIFORM, "label": "Uniform", "AP": 0.3,
             "avg_bits": 4.0, "size_mb": 1.0, "delta_uniform": None, "delta_float": -0.186}]
    shot = moonshot(rows, 0.486)
    assert shot["holds"] and shot["best"]["quantizer"] == "gptq" and math.isclose(shot["gap_points"], 0.8)
    assert not moonshot(rows, 0.50)["holds"]
    text = table2_markdown({"float": {"AP": 0.486, "size_mb": 5.4}, "rows": rows})
    assert "| 4-bit | GPTQ per-channel | M | 47.8 | +10.0 | -0.8 | 4.00 | 1.000 |" in text


def test_sweep_settings_refuse_targets_outside_the_bit_range():
    with pytest.raises(DetrqError, match="outside the bit range"):
        SweepSettings(targets=(2.5,), bits=(3, 8))
    with pytest.raises(DetrqError, match="unknown quantizer"):
        SweepSettings(full_front=("int4",))


def _table2(ap: float) -> dict:
    return {"rows": [{"precision": "4-bit", "quantizer": "gptq", "source": MEASURED, "AP": ap, "avg_bits": 4.0}]}


def test_reproduction_report_compares_table2_rows():
    tol = rp.Tolerances()
    same = rp.compare_table2(_table2(0.45), _table2(0.45), tol)
    assert [line["verdict"] for line in same] == [rp.IDENTICAL, rp.IDENTICAL]
    moved = rp.compare_table2(_table2(0.45), _table2(0.452), tol)
    assert moved[0]["verdict"] == rp.DIFFERS and moved[0]["committed"] == pytest.approx(45.0)
    assert rp.compare_table2(_table2(0.45), {"rows": []}, tol)[0]["verdict"] == rp.DIFFERS


def test_accept_moves_a_folder_of_cached_steps_whole(tmp_path):
    results, figures = tmp_path / "results", tmp_path / "figures"
    (results / "pareto").mkdir(parents=True)
    (results / "pareto" / "stale.json").write_text("{}")
    figures.mkdir()
    run = tmp_path / "runs" / "default"
    (run / "results" / "pareto").mkdir(parents=True)
    (run / "results" / "pareto" / "eval_a.json").write_text(json.dumps({"AP": 1}))
    (run / "results" / "tables").mkdir()
    (run / "results" / "tables" / "table2.json").write_text("{}")
    (run / rp.REPORT_NAME).write_text("{}")
    copied = rp.accept_runs({"default": run}, results, figures, rp.PARTS)
    assert "results/pareto/eval_a.json" in copied
    assert (results / "pareto" / "eval_a.json").is_file() and not (results / "pareto" / "stale.json").exists()
