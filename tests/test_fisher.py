"""The empirical Fisher estimator: its per-layer trace against per-sample gradients from torch.func, and the
Fisher variants of Loss Sen and Out Sen Quant on the tiny DETR (one sample per image, labelled as approximations)."""

import math

import pytest
import torch
from torch.func import functional_call, grad, vmap

from detrq.artifact.pipeline import Scheme, schemes_from_params
from detrq.io.errors import DetrqError
from detrq.quant.bitmaps import quantizable_layers
from detrq.sensitivity import Objective, TraceSettings, approximates, layer_traces, sensitivity

torch.set_num_threads(1)
FISHER = TraceSettings(estimator="fisher")


def test_fisher_trace_equals_mean_squared_per_sample_gradient_from_vmap():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    params = {n: p for n, p in net.named_parameters() if p.ndim >= 2}

    def sample_loss(p, xi, yi):
        logits = functional_call(net, {**dict(net.named_parameters()), **p}, (xi[None],))
        return torch.nn.functional.cross_entropy(logits, yi[None])

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))({n: p.detach() for n, p in params.items()}, x, y)
    expected = {n: g.pow(2).flatten(1).sum(1).mean().item() for n, g in per_sample.items()}
    items = list(range(12))
    objective = Objective.weighted(lambda i: torch.nn.functional.cross_entropy(net(x[i:i + 1]), y[i:i + 1]), items)
    est = layer_traces(objective, params, FISHER)
    for n in params:
        assert est[n].trace == pytest.approx(expected[n], rel=1e-10)
        assert est[n].n_probes == 12 and est[n].avg_trace == pytest.approx(expected[n] / params[n].numel())
        assert est[n].stderr > 0


def test_fisher_refuses_unequal_item_weights():
    w = torch.ones(2, 2, requires_grad=True)
    objective = Objective.weighted(lambda i: (w * i).sum(), [1, 2], [1.0, 3.0])
    with pytest.raises(DetrqError, match="one image per item"):
        layer_traces(objective, {"w": w}, FISHER)


@pytest.fixture(scope="module")
def tiny_detr():
    from detrq.models.detr import build_detr

    torch.manual_seed(0)
    model = build_detr("tiny")
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 32, 32 + 8 * k, generator=g) for k in range(3)]
    targets = [{"labels": torch.randint(0, 11, (2,), generator=g),
                "boxes": torch.rand(2, 4, generator=g) * torch.tensor([0.5, 0.5, 0.3, 0.3]) + 0.2} for _ in images]
    return model, [(images[:2], targets[:2]), (images[2:], targets[2:])]


@pytest.mark.parametrize("metric", ["loss", "out-quant"])
def test_fisher_variants_on_tiny_detr_take_one_sample_per_image(tiny_detr, metric):
    model, batches = tiny_detr
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    est = sensitivity(model, batches, metric, FISHER)
    assert list(est) == list(quantizable_layers(model))
    assert all(e.n_probes == 3 and math.isfinite(e.trace) and e.trace >= 0 for e in est.values())
    assert sum(e.trace > 0 for e in est.values()) > len(est) // 2
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_fisher_is_a_labelled_approximation_and_only_a_variant():
    assert approximates("loss", "fisher") and approximates("out-float", "fisher")
    with pytest.raises(DetrqError, match="extra_variants"):
        Scheme("loss", "fisher")
    schemes = schemes_from_params({"loss": "blockwise"}, ["loss:fisher", "out-quant:fisher"])
    assert [s.name for s in schemes] == ["loss", "loss-fisher", "out-quant-fisher"]
    assert schemes[1].label == "Loss Sen [empirical Fisher] (beyond the paper)"
