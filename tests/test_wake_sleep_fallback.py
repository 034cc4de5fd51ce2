"""Wake-sleep with K > 1 particles on programs that cannot run over a particle dimension: the K
draws are made one at a time, with the estimator of the vectorized pass (Bornschein & Bengio 2015)."""

from __future__ import annotations

import logging

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyrovae.errors import PyrovaeError
from pyrovae.infer import TrainSettings
from pyrovae.registry import METHODS

D, Z, N = 4, 2, 16
W_TRUE = torch.tensor([[1.2, -0.5], [0.4, 0.9], [-0.8, 0.3], [0.5, 1.1]])
B_TRUE = torch.tensor([0.3, -0.2, 0.5, 0.0])
NOISE = 0.5


class PPCA(nn.Module):
    """z ~ N(0, I), x ~ N(W z + b, NOISE^2 I); with `concatenate`, written as Pyro's CVAE example
    writes its networks, a concatenation with a data-shaped tensor that fails for z of shape (K, B, Z)."""

    def __init__(self, concatenate: bool, scale: float = 1.0) -> None:
        super().__init__()
        self.concatenate = concatenate
        self.weight = nn.Parameter(W_TRUE * scale)
        self.bias = nn.Parameter(B_TRUE * scale)

    def forward(self, x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), Z), 1.0).to_event(1))
            if self.concatenate:
                loc = torch.cat([z, x.new_ones(len(x), 1)], -1) @ torch.cat([self.weight, self.bias[:, None]], 1).T
            else:
                loc = z @ self.weight.T + self.bias
            pyro.sample("x", dist.Normal(loc, NOISE).to_event(1), obs=x)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        cov = self.weight @ self.weight.T + NOISE**2 * torch.eye(D)
        return dist.MultivariateNormal(self.bias, cov).log_prob(x)


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(D, Z)
        self.log_scale = nn.Parameter(torch.full((Z,), -0.5))

    def forward(self, x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(self.linear(x), self.log_scale.exp()).to_event(1))


def _data(n: int = N) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, Z, generator=g) @ W_TRUE.T + B_TRUE + NOISE * torch.randn(n, D, generator=g)


def _estimates(model: PPCA, guide: Encoder, variant: str, vectorize: bool | None, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(steps, 1 + parameters): the returned loss and every gradient component of `steps` steps at frozen parameters (lr = 0)."""
    x = _data()
    settings = TrainSettings(lr=0.0, batch_size=N)
    method = METHODS.get("wake-sleep")(model, guide, settings, N, variant=variant, particles=3, vectorize=vectorize)
    params = [*model.parameters(), *guide.parameters()]
    rows = []
    for _ in range(steps):
        for p in params:
            p.grad = None
        loss = method.step(x, torch.arange(N))
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        rows.append(torch.cat([torch.tensor([loss]), *(g.flatten() for g in grads)]))
    return torch.stack(rows).double(), torch.stack(rows)[:, 1:].abs().sum(0)


@pytest.mark.parametrize("variant", ["ws", "rws"])
def test_one_particle_at_a_time_gives_the_vectorized_estimator(variant, caplog):
    """Same mean loss and mean gradient of every parameter, within MC error: vectorized, forced one at a
    time, and the fallback of the same math written so that it cannot vectorize."""
    guide = Encoder()
    state = guide.state_dict()
    runs = {}
    with caplog.at_level(logging.WARNING, logger="pyrovae"):
        for name, concatenate, vectorize in [("vectorized", False, None), ("sequential", False, False), ("fallback", True, None)]:
            copy = Encoder()
            copy.load_state_dict(state)
            runs[name], reached = _estimates(PPCA(concatenate, scale=0.8), copy, variant, vectorize, 300)
            assert (reached > 0).all()  # every parameter gets a gradient: no component compared at zero
    assert caplog.text.count("cannot run over a vectorized particle dimension") == 1  # the fallback run only, once
    base = runs["vectorized"]
    for name in ("sequential", "fallback"):
        other = runs[name]
        se = (base.var(0) / len(base) + other.var(0) / len(other)).sqrt()
        z = (base.mean(0) - other.mean(0)).abs() / se
        assert z.max() < 4.5, (name, z)


def test_rws_trains_a_program_that_cannot_vectorize_and_vectorize_true_refuses(caplog):
    torch.manual_seed(0)
    x = _data(64)
    model, guide = PPCA(concatenate=True, scale=0.3), Encoder()
    method = METHODS.get("wake-sleep")(model, guide, TrainSettings(lr=0.03, batch_size=16), len(x), variant="rws", particles=3)
    generator = torch.Generator().manual_seed(1)
    losses = []
    with caplog.at_level(logging.WARNING, logger="pyrovae"):
        for _ in range(500):
            index = torch.randperm(len(x), generator=generator)[:16]
            losses.append(method.step(x[index], index))
    assert caplog.text.count("cannot run over a vectorized particle dimension") == 1
    with torch.no_grad():
        start, end = -PPCA(True, scale=0.3).log_marginal(x).mean().item(), -model.log_marginal(x).mean().item()
        best = -PPCA(True).log_marginal(x).mean().item()  # the generating parameters: near the maximum likelihood
    first, last = sum(losses[:50]) / 50, sum(losses[-50:]) / 50
    assert last < first - 0.8 and end < start - 2.0 and end < best + 0.3, (first, last, start, end, best)

    settings = TrainSettings(batch_size=16)
    refusing = METHODS.get("wake-sleep")(PPCA(concatenate=True), Encoder(), settings, 16, variant="rws", particles=3, vectorize=True)
    with pytest.raises(PyrovaeError, match="particle dimension: Tensors must have same number of dimensions") as error:
        refusing.step(x[:16], torch.arange(16))
    assert "\n" not in str(error.value)
