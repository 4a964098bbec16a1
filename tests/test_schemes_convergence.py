"""Schemes from params, the seed-stability check of bit maps, and the sensitivity-check analysis on made-up data."""

import math

import pytest

from detrq.artifact.pipeline import Scheme, bitmap_path, schemes_from_params, traces_path
from detrq.io.errors import DetrqError
from detrq.sensitivity.check import choose_policy, eq5_decomposition, rho_lookup, rho_markdown, rho_rows
from detrq.sensitivity.convergence import bitmap_agreement, objective_spread, seed_stability


def test_only_probed_schemes_are_stochastic():
    schemes = schemes_from_params({"loss": "blockwise", "out-float": "ggn", "modelopt": "fisher"}, ["loss:fisher"])
    assert {s.name: s.stochastic for s in schemes} == {"loss": True, "out-float": True, "modelopt": False,
                                                       "loss-fisher": False}


def test_schemes_names_labels_and_refusals():
    schemes = schemes_from_params({"out-quant": "blockwise", "loss": "hutchinson", "out-first-order": "ggn"},
                                  ["out-quant:ggn"])
    assert [s.name for s in schemes] == ["loss", "out-quant", "out-first-order", "out-quant-ggn"]
    variant = schemes[-1]
    assert variant.approximate and variant.label == "Out Sen Quant [GGN approximation] (beyond the paper)"
    assert schemes[2].label == "Out Sen First-Order (beyond the paper)" and not schemes[2].approximate
    assert not Scheme("out-float", "ggn").approximate
    with pytest.raises(DetrqError, match="extra_variants"):
        Scheme("out-quant", "ggn")
    with pytest.raises(DetrqError, match="METRIC:ESTIMATOR"):
        schemes_from_params({}, ["out-quant"])
    with pytest.raises(DetrqError, match="unknown metric"):
        schemes_from_params({"hessian": "ggn"})
    with pytest.raises(DetrqError, match="unknown estimator"):
        schemes_from_params({"loss": "hutch++"})
    assert traces_path("r", "loss", 2).name == "traces_loss_seed2.json"
    assert bitmap_path("r", "measured", 5).name == "bitmap_measured_5bit.json"


def allocation(bits, objective):
    return {"bit_map": dict(zip("abc", bits)), "objective": objective, "avg_bits": 0.0}


def test_bitmap_agreement_is_weighted_by_elements_and_stability_needs_both_conditions():
    numel = {"a": 90, "b": 9, "c": 1}
    assert bitmap_agreement({"a": 4, "b": 5, "c": 6}, {"a": 4, "b": 5, "c": 3}, numel) == pytest.approx(0.99)
    assert bitmap_agreement({"a": 4, "b": 5, "c": 6}, {"a": 3, "b": 5, "c": 6}, numel) == pytest.approx(0.10)
    assert objective_spread([1.0, 1.01, 0.99]) == pytest.approx(0.02)
    assert objective_spread([0.0, 0.0]) == 0.0
    runs = [{"s": {5: allocation([4, 5, 6], 1.0)}}, {"s": {5: allocation([4, 5, 3], 1.015)}},
            {"s": {5: allocation([4, 5, 6], 1.0)}}]
    check = seed_stability(runs, numel)
    assert check["schemes"]["s"]["5"]["min_agreement"] == pytest.approx(0.99) and check["stable"]["s"]
    runs[1]["s"][5]["objective"] = 1.1
    assert not seed_stability(runs, numel)["stable"]["s"]
    # A scheme absent from the replicas (deterministic: no probes) is listed, not compared; one seed compares none.
    runs[0]["fisher"] = {5: allocation([4, 5, 6], 2.0)}
    check = seed_stability(runs, numel)
    assert list(check["schemes"]) == ["s"] and check["unchecked"] == ["fisher"]
    assert check["sources"] == ["s", "fisher"] and check["targets"] == ["5"]
    one = seed_stability(runs[:1], numel)
    assert one["schemes"] == {} and one["unchecked"] == ["s", "fisher"] and one["seeds"] == 1
    with pytest.raises(DetrqError, match="at least one scheme"):
        seed_stability([{}], numel)
    with pytest.raises(DetrqError, match="different layers"):
        bitmap_agreement({"a": 4}, {"b": 4}, numel)


def measured_file(rise):
    return {"reference_bits": None, "reference_loss": 0.0,
            "layers": {n: {str(b): {"rise": v * (8 - b), "kl": 0.01 * v * (8 - b), "l1": 0.99 * v * (8 - b)}
                           for b in (3, 4, 5)} for n, v in rise.items()}}


def test_rho_rows_policy_choice_and_decomposition():
    measured = measured_file({"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0, "e": 5.0})
    from detrq.sensitivity.truth import measured_table

    truth = {"rise": measured_table(measured, "rise")}
    good = {n: {b: v * (8 - b) for b in (3, 4, 5)} for n, v in zip("abcde", (1, 2, 3, 4, 5))}
    # "keep" ranks the negative estimates of d and e cheapest, "clip" ties them at 0, "abs" restores them.
    negative = {n: {b: (-v if n in "de" else v) * (8 - b) for b in (3, 4, 5)}
                for n, v in zip("abcde", (1, 2, 3, 4, 5))}
    predicted = {"loss": {"keep": negative, "clip": {n: {b: max(0.0, c) for b, c in t.items()}
                                                     for n, t in negative.items()}, "abs": good}}
    rows = rho_rows(predicted, {"loss": "loss"}, truth, per_bits=(3, 4, 5), n_boot=200)
    assert rho_lookup(rows, "loss", "abs", "rise", 4)["rho"] == pytest.approx(1.0)
    assert rho_lookup(rows, "loss", "keep", "rise", 4)["rho"] == pytest.approx(-0.6)
    assert rho_lookup(rows, "loss", "clip", "rise", 4)["rho"] == pytest.approx(-5.5 / math.sqrt(95))
    choice = choose_policy(rows, ["loss"])
    assert choice["best"] == "abs" and choice["mean_pooled_rho"]["abs"] > choice["mean_pooled_rho"]["clip"]
    assert "| loss | abs | 1.00 [1.00, 1.00]" in rho_markdown(rows, "rise", [4])
    d = eq5_decomposition(measured, 4)
    assert d["median_l1_share"] == pytest.approx(0.99) and d["layers"] == list("abcde")
