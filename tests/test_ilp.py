"""ILP bit allocation against brute force and dynamic programming; Eq. (2)/(4) costs; bit-range helpers."""

import itertools
import math
import random

import numpy as np
import pytest
import torch

from detrq.io.errors import DetrqError
from detrq.quant.allocate import allocate_bits, paper_bits_range, parse_bits_range
from detrq.quant.bitmaps import quantize_tensor
from detrq.sensitivity.costs import apply_negative_policy, cost_table, first_order_terms, paper_costs

torch.set_num_threads(1)


def random_instance(seed: int, layers: int, bits: range, max_numel: int, span: float):
    """Costs decreasing in bits with magnitudes log-uniform over 10^(+-span), like traces x squared errors."""
    rng = random.Random(seed)
    omega = {}
    for i in range(layers):
        magnitude = 10 ** rng.uniform(-span, span)
        omega[f"layer{i}"] = {b: magnitude * rng.uniform(0.5, 1.5) / 4**b for b in bits}
    numel = {name: rng.randint(1, max_numel) for name in omega}
    return omega, numel


def objective(omega, bit_map) -> float:
    return math.fsum(omega[n][b] for n, b in bit_map.items())


def used_average(bit_map, numel) -> float:
    return sum(b * numel[n] for n, b in bit_map.items()) / sum(numel.values())


@pytest.mark.parametrize("seed", range(20))
def test_matches_brute_force(seed):
    omega, numel = random_instance(seed, layers=5, bits=range(3, 7), max_numel=10_000, span=4)
    budget = random.Random(seed).uniform(3.2, 6.0)
    names = list(omega)
    best = min(
        (objective(omega, dict(zip(names, choice))), choice)
        for choice in itertools.product(range(3, 7), repeat=len(names))
        if used_average(dict(zip(names, choice)), numel) <= budget
    )
    bit_map = allocate_bits(omega, numel, budget, time_limit=60)  # optimality is the property, not speed
    assert used_average(bit_map, numel) <= budget
    assert objective(omega, bit_map) == pytest.approx(best[0], rel=1e-9)


def test_exact_on_150_layers_with_costs_spanning_20_decades():
    """Regression for the cost scaling: dividing by the largest cost made CBC stop far from the optimum."""
    omega, numel = random_instance(7, layers=150, bits=range(3, 7), max_numel=60, span=10)
    budget = 5.0
    capacity = int(budget * sum(numel.values()))
    best = np.zeros(capacity + 1)  # best[c]: least cost of the layers so far within c budget units
    for name in omega:
        new = np.full(capacity + 1, np.inf)
        for b, cost in omega[name].items():
            w = b * numel[name]
            new[w:] = np.minimum(new[w:], best[: capacity + 1 - w] + cost)
        best = new
    bit_map = allocate_bits(omega, numel, budget, time_limit=30)
    assert used_average(bit_map, numel) <= budget
    assert objective(omega, bit_map) == pytest.approx(best[-1], rel=1e-9)


def test_infeasible_budget_names_smallest_average():
    omega = {"a": {3: 1.0, 4: 0.5}, "b": {4: 1.0, 5: 0.1}}
    numel = {"a": 100, "b": 300}  # every layer at its minimum: (3*100 + 4*300) / 400 = 3.75
    with pytest.raises(DetrqError, match="smallest feasible average is 3.7500"):
        allocate_bits(omega, numel, 3.7)
    assert allocate_bits(omega, numel, 3.75) == {"a": 3, "b": 4}
    assert allocate_bits(omega, numel, 100) == {"a": 4, "b": 5}


def test_bad_inputs():
    with pytest.raises(DetrqError, match="no element count"):
        allocate_bits({"a": {4: 1.0}}, {}, 4)
    with pytest.raises(DetrqError, match="invalid option"):
        allocate_bits({"a": {4: float("nan")}}, {"a": 1}, 4)


def test_paper_costs_eq2_and_eq4():
    w = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    omega = paper_costs({"w": 2.5}, {"w": w}, range(3, 9))
    for b in range(3, 9):
        err = (quantize_tensor(w, b).double() - w.double()).pow(2).sum().item()
        assert omega["w"][b] == pytest.approx(2.5 * err, rel=1e-12)
    w8 = quantize_tensor(w, 8)
    omega_q = paper_costs({"w": 2.5}, {"w": w}, range(3, 9), reference={"w": w8})
    assert omega_q["w"][8] == 0.0
    assert omega_q["w"][4] == pytest.approx(2.5 * (quantize_tensor(w, 4) - w8).double().pow(2).sum().item())
    with pytest.raises(DetrqError, match="'v'"):
        paper_costs({"v": 1.0}, {"w": w}, range(3, 5))


def test_negative_trace_policies():
    w = torch.randn(20, 4, generator=torch.Generator().manual_seed(1))
    err = (quantize_tensor(w, 4) - w).double().pow(2).sum().item()
    for policy, expected in (("keep", -3.0), ("clip", 0.0), ("abs", 3.0)):
        assert apply_negative_policy(-3.0, policy) == expected and apply_negative_policy(2.0, policy) == 2.0
        assert paper_costs({"w": -3.0}, {"w": w}, [4], negative_traces=policy)["w"][4] == pytest.approx(expected * err)
    with pytest.raises(DetrqError, match="negative_traces"):
        apply_negative_policy(-1.0, "square")


def test_first_order_cost_is_eq5_second_plus_first_order_term():
    """omega = 1/2 Tr/|W| ||dW||^2 + c sqrt(2/pi) sigma S, with sigma = ||dW|| / sqrt(|W|): computed by hand."""
    w = torch.randn(30, 5, generator=torch.Generator().manual_seed(2))
    terms = first_order_terms({"w": 0.4}, {"w": 120.0}, 0.01, {"w": w}, [3, 5])
    for b in (3, 5):
        sq = (quantize_tensor(w, b) - w).double().pow(2).sum().item()
        assert terms["w"][b]["kl"] == pytest.approx(0.5 * 0.4 * sq)
        assert terms["w"][b]["l1"] == pytest.approx(0.01 * math.sqrt(2 / math.pi) * math.sqrt(sq / 150) * 120.0)
    traces = {"metric": "out-first-order", "l1_scale": 0.01,
              "layers": {"w": {"kl": {"avg_trace": 0.4}, "jacobian": {"sum": 120.0}}}}
    table = cost_table(traces, {"w": w}, [3, 5])
    assert table["w"][3] == pytest.approx(terms["w"][3]["kl"] + terms["w"][3]["l1"])
    assert table["w"][3] > table["w"][5] > 0
    with pytest.raises(DetrqError, match="not a traces result"):
        cost_table({"metric": "nope", "layers": {}}, {"w": w}, [3])


def test_bits_ranges():
    assert parse_bits_range("3-6") == range(3, 7)
    assert parse_bits_range(" 4 ") == range(4, 5)
    for bad in ("6-3", "x-4", "1-4", "3-17", ""):
        with pytest.raises(DetrqError, match="bits range"):
            parse_bits_range(bad)
    assert paper_bits_range(4) == paper_bits_range(5) == range(3, 7)
    assert paper_bits_range(6) == range(4, 8)
