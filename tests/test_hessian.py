"""Trace estimators (hutchinson, blockwise, ggn) against exact Hessians; the DETR sensitivity metrics on the tiny
preset; the first-order metric's Jacobian row-norm sums against exact per-row gradients."""

import math
from dataclasses import replace

import pytest
import torch

from detrq.io.errors import DetrqError
from detrq.quant.bitmaps import quantizable_layers, quantize_tensor
from detrq.sensitivity import (Objective, TraceEstimate, TraceSettings, first_order_sensitivity, layer_traces,
                               sensitivity)
from detrq.sensitivity.first_order import box_rows, jacobian_row_norm_sums
from detrq.sensitivity.objectives import tracing

torch.set_num_threads(1)

SHAPES = {"w1": (4, 3), "w2": (3, 4), "w3": (2, 3)}  # 30 weights


def probes(n: int, **kw) -> TraceSettings:
    return TraceSettings(max_probes=n, min_probes=n, probes_per_pass=kw.pop("probes_per_pass", n), **kw)


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


def exact_hessian(params, flat_loss) -> torch.Tensor:
    theta = torch.cat([p.detach().flatten() for p in params.values()])
    return torch.autograd.functional.hessian(flat_loss, theta)


def exact_block_traces(params, flat_loss) -> dict[str, float]:
    diag = exact_hessian(params, flat_loss).diagonal()
    return {n: d.sum().item() for n, d in zip(params, torch.split(diag, [p.numel() for p in params.values()]))}


def whole(loss, params) -> Objective:
    return Objective.weighted(lambda _: loss(params))


@pytest.mark.parametrize("estimator", ["hutchinson", "blockwise"])
def test_estimates_match_exact_hessian_blocks(estimator):
    params, _, _, loss, flat_loss = mlp_problem()
    exact = exact_block_traces(params, flat_loss)
    est = layer_traces(whole(loss, params), params, probes(400, estimator=estimator))
    for name, e in est.items():
        assert e.n_probes == 400 and len(e.samples) == 400 and e.numel == params[name].numel()
        assert abs(e.trace - exact[name]) <= 4 * e.stderr, (name, e.trace, exact[name], e.stderr)
        assert e.avg_trace == pytest.approx(e.trace / e.numel)
    # The per-probe sum over layers is v.Hv over all weights: an estimate of the total trace.
    total = TraceEstimate.from_samples([sum(s) for s in zip(*(e.samples for e in est.values()))], 30)
    assert abs(total.trace - sum(exact.values())) <= 4 * total.stderr


def test_blockwise_removes_exactly_the_cross_block_variance():
    """Per-probe variance, Rademacher: within-block 2 * sum_{i != j in l} H_ij^2 for both estimators, plus
    sum_{i in l, j not in l} H_ij^2 (the cross-block part) for hutchinson only."""
    params, _, _, loss, flat_loss = mlp_problem()
    h = exact_hessian(params, flat_loss)
    sizes = [p.numel() for p in params.values()]
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    hut = layer_traces(whole(loss, params), params, probes(2000, probes_per_pass=500))
    blk = layer_traces(whole(loss, params), params, probes(2000, probes_per_pass=500, estimator="blockwise"))
    for (name, size), start in zip(zip(params, sizes), starts):
        block = h[start:start + size, start:start + size]
        within = 2 * (block.pow(2).sum() - block.diagonal().pow(2).sum()).item()
        cross = h[start:start + size].pow(2).sum().item() - block.pow(2).sum().item()
        var_hut = (hut[name].stderr ** 2) * hut[name].n_probes
        var_blk = (blk[name].stderr ** 2) * blk[name].n_probes
        assert var_blk == pytest.approx(within, rel=0.2), name
        assert var_hut == pytest.approx(within + cross, rel=0.2), name


def test_blockwise_regions_group_layers():
    params, _, _, loss, _ = mlp_problem()
    named = {f"transformer.encoder.{k}": v for k, v in params.items()}
    objective = whole(loss, params)
    region = layer_traces(objective, named, probes(10, estimator="blockwise", blocks="region"))
    hutch = layer_traces(objective, named, probes(10))
    # One region holding every layer: blockwise by region is hutchinson, sample for sample.
    assert all(region[n].samples == pytest.approx(hutch[n].samples, rel=1e-12) for n in named)


def test_same_seed_same_numbers():
    params, _, _, loss, _ = mlp_problem()
    a = layer_traces(whole(loss, params), params, probes(20, seed=3))
    b = layer_traces(whole(loss, params), params, probes(20, seed=3, probes_per_pass=7))
    c = layer_traces(whole(loss, params), params, probes(20, seed=4))
    assert all(a[n].samples == pytest.approx(b[n].samples, rel=1e-12) for n in a)
    assert a["w1"].samples != c["w1"].samples


def test_batches_average_equals_mean_loss():
    params, x, y, loss, _ = mlp_problem()
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]
    full = layer_traces(whole(loss, params), params, probes(15))
    split = layer_traces(Objective.weighted(lambda b: loss(params, *b), batches, [10, 6]), params, probes(15))
    for name in full:
        assert split[name].samples == pytest.approx(full[name].samples, rel=1e-10, abs=1e-12)


def test_stops_at_tolerance_in_whole_passes():
    params, _, _, loss, _ = mlp_problem()
    settings = TraceSettings(max_probes=200, min_probes=10, rel_tol=0.5, probes_per_pass=5)
    est = layer_traces(whole(loss, params), params, settings)
    n = est["w1"].n_probes
    assert 10 <= n < 200 and n % 5 == 0
    assert all(e.n_probes == n and e.stderr <= 0.5 * abs(e.trace) for e in est.values())


def test_unused_tensor_has_zero_trace_and_frozen_tensor_is_refused():
    params, _, _, loss, _ = mlp_problem()
    unused = torch.ones(5, dtype=torch.float64, requires_grad=True)
    with_unused = {**params, "unused": unused}
    est = layer_traces(whole(loss, params), with_unused, probes(3))
    assert est["unused"].trace == 0 and est["unused"].stderr == 0
    assert set(est["unused"].to_dict()) == {"trace", "avg_trace", "stderr", "n_probes", "numel", "samples"}
    linear = layer_traces(Objective.weighted(lambda _: params["w1"].sum()), params, probes(2))
    assert all(e.samples == [0.0, 0.0] for e in linear.values())
    with pytest.raises(DetrqError, match="'frozen'"):
        layer_traces(whole(loss, params), {"frozen": torch.ones(2)})


def test_bad_settings_and_objectives_are_refused():
    with pytest.raises(DetrqError, match="estimator"):
        TraceSettings(estimator="hutch++")
    with pytest.raises(DetrqError, match="min_probes"):
        TraceSettings(min_probes=5, max_probes=4)
    params, _, _, loss, _ = mlp_problem()
    with pytest.raises(DetrqError, match="Gauss-Newton"):
        layer_traces(whole(loss, params), params, probes(2, estimator="ggn"))


def test_ggn_equals_exact_trace_for_a_least_squares_loss():
    """For f(z) = ||z - y||^2 / 2 the GGN is J'J; with the factor S = I its probes are exact GGN samples."""
    params, x, y, _, _ = mlp_problem()

    def net(w1, w2, w3):
        return torch.tanh(torch.tanh(x @ w1.T) @ w2.T) @ w3.T

    def outputs(_):
        return net(*params.values())

    def factor(z, share, g):
        return [(z, share * torch.randn(z.shape, generator=g, dtype=z.dtype))]

    jac = torch.autograd.functional.jacobian(net, tuple(p.detach() for p in params.values()))
    exact = {n: j.pow(2).sum().item() for n, j in zip(params, jac)}
    est = layer_traces(Objective.weighted(lambda _: outputs(None).sum(), outputs=outputs, ggn_factor=factor),
                       params, probes(400, estimator="ggn"))
    for name, e in est.items():
        assert min(e.samples) >= 0
        assert abs(e.trace - exact[name]) <= 4 * e.stderr, (name, e.trace, exact[name])


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
    est = sensitivity(model, batches, metric, probes(2))
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
    import detrq.sensitivity.metrics

    model, batches = tiny_detr
    model.eval()
    with torch.no_grad():
        float_logits = [model(images)["pred_logits"] for images, _ in batches]
    layers = quantizable_layers(model)
    expected = {n: quantize_tensor(p.detach(), 8) for n, p in layers.items()}
    seen = {}

    def fake_layer_traces(objective, params, settings, **kwargs):
        seen["quantized"] = all(torch.equal(params[n], expected[n]) for n in layers)
        seen["teacher"] = all(torch.equal(t["pred_logits"], f) for (_, t), f in zip(objective.items, float_logits))
        seen["loss"] = objective.loss(objective.items[0]).item()
        return {}

    monkeypatch.setattr(detrq.sensitivity.metrics, "layer_traces", fake_layer_traces)
    sensitivity(model, batches, "out-quant")
    assert seen["quantized"] and seen["teacher"] and seen["loss"] > 0
    sensitivity(model, batches, "out-float")
    assert not seen["quantized"] and seen["teacher"] and seen["loss"] == 0


def exact_layer_trace(model, batches, name):
    """Tr(H_ll) of the Eq. (5) objective at float weights, from one HVP per unit vector."""
    from detrq.sensitivity.objectives import sensitivity_objective

    with tracing(model, [name]) as params:
        objective = sensitivity_objective(model, batches, "out-float")
        p = params[name]
        total = 0.0
        for item, share in zip(objective.items, objective.shares):
            (g,) = torch.autograd.grad(objective.loss(item), [p], create_graph=True)
            flat = g.flatten()
            for i in range(flat.numel()):
                (h,) = torch.autograd.grad(flat[i], [p], retain_graph=True)
                total += share * h.flatten()[i].item()
    return total


def test_ggn_equals_the_exact_out_sen_float_trace_on_tiny_detr(tiny_detr):
    """At float weights the Eq. (5) Hessian is its KL term's GGN: the ggn estimate meets the exact trace."""
    model, batches = tiny_detr
    model.eval()
    names = ["query_embed.weight", "backbone.0.body.conv1.weight"]
    est = sensitivity(model, batches, "out-float", probes(300, probes_per_pass=100, estimator="ggn"), layers=names)
    for name in names:
        exact = exact_layer_trace(model, batches, name)
        assert exact > 0 and min(est[name].samples) >= 0
        assert abs(est[name].trace - exact) <= 4 * est[name].stderr, (name, est[name].trace, exact)
        assert est[name].rel_stderr < 0.1


def exact_row_norm_sums(model, batches, names):
    sums = dict.fromkeys(names, 0.0)
    with tracing(model, names) as params:
        for images, _ in batches:
            rows = box_rows(model(images))
            for i in range(rows.numel()):
                grads = torch.autograd.grad(rows[i], [params[n] for n in names], retain_graph=True,
                                            allow_unused=True)
                for n, g in zip(names, grads):
                    sums[n] += 0.0 if g is None else g.double().norm().item()
    return sums


def test_jacobian_row_norm_sums_rows_unbiased_and_cauchy_schwarz_an_upper_bound(tiny_detr):
    model, batches = tiny_detr
    model.eval()
    names = ["bbox_embed.layers.1.weight", "transformer.decoder.layers.1.linear2.weight", "query_embed.weight"]
    exact = exact_row_norm_sums(model, batches, names)
    settings = TraceSettings(jacobian_probes=400, probes_per_pass=100)
    with tracing(model, names) as params:
        images = [im for im, _ in batches]
        rows = jacobian_row_norm_sums(model, images, params, settings)
        bound = jacobian_row_norm_sums(model, images, params, replace(settings, jacobian="cauchy-schwarz"))
    for n in names:
        assert rows[n]["n_rows"] == 4 * 2 * 6 * 3  # coordinates x decoder outputs x queries x images
        assert abs(rows[n]["sum"] - exact[n]) <= 4 * rows[n]["stderr"], (n, rows[n]["sum"], exact[n])
        assert bound[n]["sum"] >= exact[n] - 4 * bound[n]["stderr"]


def test_first_order_sensitivity_terms(tiny_detr):
    model, batches = tiny_detr
    model.eval()
    out = first_order_sensitivity(model, batches, TraceSettings(estimator="ggn", max_probes=4, min_probes=4,
                                                                jacobian_probes=4))
    assert out["num_images"] == 3 and out["l1_scale"] == pytest.approx(1 / (3 * model.num_queries))
    assert list(out["kl"]) == list(out["jacobian"]) == list(quantizable_layers(model))
    # The box MLP's hidden layers do not reach the logits (no KL curvature) but move every box.
    assert out["kl"]["bbox_embed.layers.0.weight"].trace == 0
    assert out["jacobian"]["bbox_embed.layers.0.weight"]["sum"] > 0
