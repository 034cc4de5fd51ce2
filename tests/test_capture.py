"""The captured loss (pyrovae.capture): same training as the Pyro program, refused where unsafe."""

from __future__ import annotations

import importlib

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyrovae import capture
from pyrovae.guides import build_guide
from pyrovae.infer import AmortizedVI, TrainSettings
from pyrovae.models import VAE


def _train(guide_name: str, objective: str, capture_on: bool, steps: int = 6) -> tuple[AmortizedVI, list[float]]:
    torch.manual_seed(0)
    x = torch.bernoulli(torch.rand(40, 30, generator=torch.Generator().manual_seed(1)))
    model = VAE((30,), 4, (16,))
    guide = build_guide(guide_name, model, x, hidden=(16,))
    method = AmortizedVI(model, guide, TrainSettings(objective, 2 if objective == "iwae" else 1, 1e-2, 20, capture=capture_on), len(x))
    pyro.set_rng_seed(3)
    losses = [float(method.step(x[i % 2 * 20:][:20], torch.arange(20) + i % 2 * 20)) for i in range(steps)]
    return method, losses


@pytest.mark.parametrize("guide_name, objective", [("diagonal", "elbo"), ("diagonal", "elbo-analytic"), ("diagonal", "iwae"), ("full", "elbo"), ("iaf", "elbo")])
def test_captured_training_is_the_programs_training(guide_name, objective):
    captured, captured_losses = _train(guide_name, objective, True)
    eager, eager_losses = _train(guide_name, objective, False)
    assert any(g is not None for g in captured.captured.graphs.values()), captured.captured.refused
    assert captured_losses == pytest.approx(eager_losses, rel=1e-5)
    for a, b in zip(captured.model.parameters(), eager.model.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
    for a, b in zip(captured.guide.parameters(), eager.guide.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_the_surrogate_bookkeeping_and_no_ops_are_simplified_away():
    method, _ = _train("diagonal", "elbo", True, steps=3)
    graph = next(g.module for g in method.captured.graphs.values() if g is not None)
    targets = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.detach.default not in targets  # loss + (s - detach(s)) became s
    assert torch.ops.aten.lift_fresh_copy.default not in targets
    assert torch.randn in targets  # the reparameterized draw is still drawn every call (public binding)


class _DataDependent(nn.Module):
    """A user program whose control flow depends on the data's values: cannot be captured."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(2, 5)

    def forward(self, x: torch.Tensor) -> None:
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(len(x), 2), 1.0).to_event(1))
            loc = self.net(z) if x.sum() > 0 else -self.net(z)
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)


class _ParamStoreUser(_DataDependent):
    def forward(self, x: torch.Tensor) -> None:
        pyro.module("user", self)
        scale = pyro.param("noise", torch.tensor(1.0), constraint=dist.constraints.positive)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(len(x), 2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.net(z), scale).to_event(1), obs=x)


def test_programs_that_cannot_be_captured_run_eagerly():
    pyro.clear_param_store()
    x = torch.randn(20, 5)
    model = _DataDependent()
    method = AmortizedVI(model, build_guide("diagonal", model, x, hidden=(8,)), TrainSettings(batch_size=10), len(x))
    for _i in range(3):
        assert torch.isfinite(method.step(x[:10], torch.arange(10)))
    assert all(g is None for g in method.captured.graphs.values())
    assert "tracer stopped" in next(iter(method.captured.refused.values()))


def test_a_program_with_param_store_parameters_is_not_captured_and_trains_them():
    """A graph would bake the store's tensors in as constants: such a program runs eagerly."""
    pyro.clear_param_store()
    x = torch.randn(20, 5)
    model = _ParamStoreUser()
    method = AmortizedVI(model, build_guide("diagonal", model, x, hidden=(8,)), TrainSettings(batch_size=10, lr=0.1), len(x))
    method.step(x[:10], torch.arange(10))
    noise = pyro.param("noise").item()
    for _i in range(3):
        assert torch.isfinite(method.step(x[:10], torch.arange(10)))
    assert method.captured is None and pyro.param("noise").item() != noise


def test_a_graph_that_differs_from_the_program_is_refused(monkeypatch):
    """The capture check compares loss and gradients: a corrupted graph never trains."""
    original = capture.simplify

    def corrupt(graph):
        original(graph)
        for node in graph.graph.nodes:
            if node.op == "output":
                (out,) = node.args[0] if isinstance(node.args[0], (list, tuple)) else (node.args[0],)
                with graph.graph.inserting_before(node):
                    doubled = graph.graph.call_function(torch.ops.aten.mul.Tensor, (out, 2.0))
                node.args = ([doubled],) if isinstance(node.args[0], (list, tuple)) else (doubled,)
        graph.recompile()

    monkeypatch.setattr(capture, "simplify", corrupt)
    method, losses = _train("diagonal", "elbo", True, steps=3)
    _, eager_losses = _train("diagonal", "elbo", False, steps=3)
    assert all(g is None for g in method.captured.graphs.values())
    assert "differs" in next(iter(method.captured.refused.values()))
    assert losses == pytest.approx(eager_losses, rel=1e-5)


def test_simplify_keeps_value_and_gradient_of_each_rewrite():
    """x*1, x+zeros, sum(-x), the surrogate a + (b - detach(b)): value and gradient unchanged."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(w, x):
        y = torch.tanh(x @ w) * 1.0 + torch.zeros(3, 4)
        b = (-y).sum(-1)
        a = (-y.detach()).sum(-1)
        return (a + (b - b.detach())).sum()

    w, x = torch.randn(2, 4, requires_grad=True), torch.randn(3, 2)
    graph = make_fx(f)(w.detach(), x)
    before = len(graph.graph.nodes)
    capture.simplify(graph)
    assert len(graph.graph.nodes) < before
    (expected,) = torch.autograd.grad(f(w, x), w)
    (got,) = torch.autograd.grad(graph(w, x), w)
    assert torch.allclose(graph(w, x), f(w, x))
    assert torch.allclose(got, expected)


def test_scalings_and_constants_are_gathered_into_one_factor_and_one_number():
    """A bound's chain of scalings (to the data set, per example, of the loss) and its cancelling
    normalizing constants: the rewrites leave one multiplication and keep value and gradient."""
    from torch.fx.experimental.proxy_tensor import make_fx

    half = torch.full((3, 4), 2.0)

    def f(w, x):
        z = torch.tanh(x @ w)
        log_p = ((-z.pow(2)) / half).sum(-1) - 3.7  # a standard normal's log-density, constant apart
        log_q = (-0.5 * x.pow(2).sum(-1, keepdim=True) * z).sum(-1) - 3.7
        return -((log_p * 500.0).sum() - (log_q * 500.0).sum()) / 50000

    w, x = torch.randn(2, 4, requires_grad=True), torch.randn(3, 2)
    graph = make_fx(f)(w.detach(), x)
    capture.simplify(graph)
    targets = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    assert torch.div not in targets and torch.neg not in targets
    scalings = [n for n in graph.graph.nodes if n.target is torch.mul and isinstance(n.args[1], float)]
    assert len(scalings) == 3  # -0.5 * ..., the half-square, and one scale for the whole loss
    assert not any(n.op == "call_function" and 3.7 * 3 in n.args for n in graph.graph.nodes)  # the constants cancelled
    (expected,) = torch.autograd.grad(f(w, x), w)
    (got,) = torch.autograd.grad(graph(w, x), w)
    assert torch.allclose(graph(w, x), f(w, x), atol=1e-6)
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("guide_name", ["diagonal", "iaf"])
def test_captured_evaluation_gives_the_programs_figures(guide_name):
    evaluation = importlib.import_module("pyrovae.evaluate")  # `pyrovae.evaluate` the function shadows the module
    x = torch.bernoulli(torch.full((30, 12), 0.4))
    model = VAE((12,), 3, (8,))
    guide = build_guide(guide_name, model, x, hidden=(8,))
    results = []
    for capture_on in (False, True, True):  # the second captured call replays the kept graphs
        pyro.set_rng_seed(5)
        results.append(evaluation.evaluate(model, guide, list(x.split(10)), num_samples=64, iwae_k=8, max_elements=10 * 12 * 16, capture=capture_on))
    (captured,) = evaluation._captured.values()
    assert captured.graphs and all(g is not None for g in captured.graphs.values()), captured.refused
    for result in results[1:]:
        assert torch.allclose(result.log_likelihood, results[0].log_likelihood, atol=1e-4)
        assert torch.allclose(result.elbo, results[0].elbo, atol=1e-4)
        assert torch.allclose(result.iwae, results[0].iwae, atol=1e-4)


def test_checks_follow_the_geometric_schedule():
    due = [n for n in range(1, 5001) if capture.check_due(n)]
    assert due == [1, 10, 100, 1000, 2000, 3000, 4000, 5000]


def test_a_graph_that_goes_wrong_after_capture_is_dropped_at_its_next_check():
    """A graph corrupted after it passed its capture check (as a stale graph would be) trains
    for calls 2-9 at most: the check at call 10 drops it, says why, and that step is the program's."""
    method, _ = _train("diagonal", "elbo", True, steps=1)
    (entry,) = method.captured.graphs.values()
    graph = entry.module
    entry.module = lambda tensors, x, index: graph(tensors, x, index) * 2.0
    x = torch.bernoulli(torch.rand(40, 30, generator=torch.Generator().manual_seed(1)))
    losses = [float(method.step(x[:20], torch.arange(20))) for _ in range(9)]
    eager = float(method.loss(x[:20], torch.arange(20)).detach())
    assert entry.calls == 10 and not method.captured.graphs and method.captured.eager is not None
    assert "differs" in method.captured.eager and "call 10" in method.captured.eager
    assert losses[-1] == pytest.approx(eager, rel=0.2) and losses[-2] == pytest.approx(2 * eager, rel=0.2)
