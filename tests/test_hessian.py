"""Hutchinson per-layer traces against exact Hessians; the three DETR sensitivity metrics on the tiny preset."""

import math

import pytest
import torch

from detrq.errors import DetrqError
from detrq.hessian import TraceEstimate, layer_traces, sensitivity
from detrq.quant import quantizable_layers, quantize_tensor

torch.set_num_threads(1)

SHAPES = {"w1": (4, 3), "w2": (3, 4), "w3": (2, 3)}  # 30 weights


def mlp_problem(seed: int = 0):
    """A 3-layer tanh MLP with MSE loss in float64, and a function of the flattened weights for exact Hessians."""
    g = torch.Generator().manual_seed(seed)
    params = {n: torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for n, s in SHAPES.items()}
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    y = torch.randn(16, 2, generator=g, dtype=torch.float64)

    def loss(w: dict, xb=x, yb=y) -> torch.Tensor:
        h = torch.tanh(xb @ w["w1"].T)
        h = torch.tanh(h @ w["w2"].T)
        return ((h @ w["w3"].T - yb) ** 2).mean()

    def flat_loss(theta: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(theta, [math.prod(s) for s in SHAPES.values()])
        return loss({n: c.view(s) for (n, s), c in zip(SHAPES.items(), chunks)})

    return params, x, y, loss, flat_loss


def exact_block_traces(params, flat_loss) -> dict[str, float]:
    theta = torch.cat([p.detach().flatten() for p in params.values()])
    diag = torch.autograd.functional.hessian(flat_loss, theta).diagonal()
    return {n: d.sum().item() for n, d in zip(params, torch.split(diag, [p.numel() for p in params.values()]))}


def test_estimates_match_exact_hessian_blocks():
    params, _, _, loss, flat_loss = mlp_problem()
    exact = exact_block_traces(params, flat_loss)
    est = layer_traces(lambda: loss(params), params, max_probes=400, min_probes=400, probes_per_pass=400)
    for name, e in est.items():
        assert e.n_probes == 400 and len(e.samples) == 400 and e.numel == params[name].numel()
        assert abs(e.trace - exact[name]) <= 4 * e.stderr, (name, e.trace, exact[name], e.stderr)
        assert e.avg_trace == pytest.approx(e.trace / e.numel)
    # The per-probe sum over layers is v.Hv over all weights: an estimate of the total trace.
    total = TraceEstimate.from_samples([sum(s) for s in zip(*(e.samples for e in est.values()))], 30)
    assert abs(total.trace - sum(exact.values())) <= 4 * total.stderr
    assert sum(e.trace for e in est.values()) == pytest.approx(total.trace)


def test_same_seed_same_numbers():
    params, _, _, loss, _ = mlp_problem()
    a = layer_traces(lambda: loss(params), params, max_probes=20, min_probes=20, seed=3)
    b = layer_traces(lambda: loss(params), params, max_probes=20, min_probes=20, seed=3, probes_per_pass=7)
    c = layer_traces(lambda: loss(params), params, max_probes=20, min_probes=20, seed=4)
    assert all(a[n].samples == pytest.approx(b[n].samples, rel=1e-12) for n in a)
    assert a["w1"].samples != c["w1"].samples


def test_batches_average_equals_mean_loss():
    params, x, y, loss, _ = mlp_problem()
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]
    whole = layer_traces(lambda: loss(params), params, max_probes=15, min_probes=15)
    split = layer_traces(lambda b: loss(params, *b), params, batches=batches, batch_weights=[10, 6],
                         max_probes=15, min_probes=15)
    for name in whole:
        assert split[name].samples == pytest.approx(whole[name].samples, rel=1e-10, abs=1e-12)


def test_stops_at_tolerance_in_whole_passes():
    params, _, _, loss, _ = mlp_problem()
    est = layer_traces(lambda: loss(params), params, max_probes=200, min_probes=10, rel_tol=0.5, probes_per_pass=5)
    n = est["w1"].n_probes
    assert 10 <= n < 200 and n % 5 == 0
    assert all(e.n_probes == n and e.stderr <= 0.5 * abs(e.trace) for e in est.values())


def test_unused_tensor_has_zero_trace_and_frozen_tensor_is_refused():
    params, _, _, loss, _ = mlp_problem()
    unused = torch.ones(5, dtype=torch.float64, requires_grad=True)
    est = layer_traces(lambda: loss(params), {**params, "unused": unused}, max_probes=3, min_probes=3)
    assert est["unused"].trace == 0 and est["unused"].stderr == 0
    assert set(est["unused"].to_dict()) == {"trace", "avg_trace", "stderr", "n_probes", "numel", "samples"}
    linear = layer_traces(lambda: params["w1"].sum(), params, max_probes=2, min_probes=2)
    assert all(e.samples == [0.0, 0.0] for e in linear.values())
    with pytest.raises(DetrqError, match="'frozen'"):
        layer_traces(lambda: loss(params), {"frozen": torch.ones(2)})


@pytest.fixture(scope="module")
def tiny_detr():
    detr = pytest.importorskip("detrq.models.detr")
    torch.manual_seed(0)
    model = detr.build_detr("tiny")
    g = torch.Generator().manual_seed(0)
    batches = []
    for sizes in ([(32, 32), (32, 40)], [(40, 32)]):
        images = [torch.randn(3, h, w, generator=g) for h, w in sizes]
        targets = [{"labels": torch.randint(0, 11, (2,), generator=g),
                    "boxes": torch.rand(2, 2, generator=g).repeat(1, 2) * torch.tensor([0.5, 0.5, 0.3, 0.3]) + 0.2}
                   for _ in sizes]
        batches.append((images, targets))
    return model, batches


@pytest.mark.parametrize("metric", ["loss", "out-float", "out-quant"])
def test_sensitivity_metrics_on_tiny_detr(tiny_detr, metric):
    model, batches = tiny_detr
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    est = sensitivity(model, batches, metric, max_probes=2, min_probes=2, probes_per_pass=2)
    assert list(est) == list(quantizable_layers(model))
    assert all(math.isfinite(e.trace) and e.n_probes == 2 for e in est.values())
    assert any(e.trace != 0 for e in est.values())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.training and all(p.grad is None for p in model.parameters())


def test_sensitivity_rejects_unknown_metric_and_layer(tiny_detr):
    model, batches = tiny_detr
    with pytest.raises(DetrqError, match="metric"):
        sensitivity(model, batches, "hessian")
    with pytest.raises(DetrqError, match="'nope'"):
        sensitivity(model, batches, "out-float", layers=["nope"])


def test_out_quant_traces_at_8_bit_point_against_float_teacher(tiny_detr, monkeypatch):
    import detrq.hessian

    model, batches = tiny_detr
    model.eval()
    with torch.no_grad():
        float_logits = [model(images)["pred_logits"] for images, _ in batches]
    layers = quantizable_layers(model)
    expected = {n: quantize_tensor(p.detach(), 8) for n, p in layers.items()}
    seen = {}

    def fake_layer_traces(loss_fn, params, *, batches, **kwargs):
        seen["quantized"] = all(torch.equal(params[n], expected[n]) for n in layers)
        seen["teacher"] = all(torch.equal(t["pred_logits"], f) for (_, t), f in zip(batches, float_logits))
        seen["loss"] = loss_fn(batches[0]).item()
        return {}

    monkeypatch.setattr(detrq.hessian, "layer_traces", fake_layer_traces)
    sensitivity(model, batches, "out-quant")
    assert seen["quantized"] and seen["teacher"] and seen["loss"] > 0
    sensitivity(model, batches, "out-float")
    assert not seen["quantized"] and seen["teacher"] and seen["loss"] == 0
