"""A plain Pyro program a user wrote (own site names, no pyrovae base class, no index/size)."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from torch import nn

from pyrovae import build_guide, evaluate, inspect_model
from pyrovae.importance import log_weights
from pyrovae.infer import AmortizedVI, TrainSettings

K = 200
CAP = 1280  # evaluate's memory cap: 2 examples and 64 samples a pass, so K takes 4 passes (64, 64, 64, 8)


class UserDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 10))

    def forward(self, x):
        pyro.module("user_decoder", self)
        with pyro.plate("data", len(x)):
            code = pyro.sample("code", dist.Normal(torch.zeros(len(x), 3), 1.0).to_event(1))
            pyro.sample("pixels", dist.Bernoulli(logits=self.net(code)).to_event(1), obs=x)


def _data():
    torch.manual_seed(0)
    return torch.bernoulli(torch.rand(60, 10).round() * 0.8 + 0.1)


def test_sites_are_read_off_the_program():
    sites = inspect_model(UserDecoder(), _data())
    assert dict(sites.latents) == {"code": torch.Size([3])} and sites.observed == ("pixels",)


def _quadrature_log_likelihood(model: nn.Module, x: torch.Tensor, nodes: int = 16) -> torch.Tensor:
    """log p(x) per example by Gauss-Hermite quadrature over the 3-D N(0, I) code, through the
    program itself conditioned on each node (16 nodes a dimension agree with 40 to 1e-6 here)."""
    points, weights = np.polynomial.hermite_e.hermegauss(nodes)
    grid = torch.cartesian_prod(*[torch.tensor(points, dtype=torch.float32)] * 3)
    log_w = torch.tensor(np.log(weights / weights.sum()), dtype=torch.float32)
    log_w = (log_w[:, None, None] + log_w[None, :, None] + log_w[None, None, :]).reshape(-1)
    z = grid.repeat(len(x), 1)
    with torch.no_grad():
        trace = poutine.trace(poutine.condition(model, data={"code": z})).get_trace(x.repeat_interleave(len(grid), 0))
        trace.compute_log_prob()
        joint = sum(site["log_prob"] for site in trace.nodes.values() if site["type"] == "sample" and "log_prob" in site)
    log_likelihood = joint - dist.Normal(0.0, 1.0).log_prob(z).sum(-1)  # the prior is in the weights
    return (log_likelihood.reshape(len(x), len(grid)) + log_w).logsumexp(-1)


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, nn.Module, torch.Tensor, float]:
    """The user's program with a diagonal guide after 150 steps, its data, and the ELBO before."""
    x = _data()
    model = UserDecoder()
    guide = build_guide("diagonal", model, x, hidden=(16,))
    method = AmortizedVI(model, guide, TrainSettings(lr=1e-2, batch_size=20), num_examples=len(x))
    before = evaluate(model, guide, x, num_samples=50).elbo.mean().item()
    for _step in range(150):
        index = torch.randperm(len(x))[:20]
        method.step(x[index], index)
    return model, guide, x, before


def test_is_log_likelihood_of_a_user_program_is_its_exact_marginal(trained) -> None:
    """Per example, IS log p(x) (K split over several passes) lies within Monte Carlo error of
    log p(x) by quadrature, and the ELBO below it (the guide is diagonal: a positive mean gap)."""
    model, guide, x, before = trained
    pyro.set_rng_seed(0)
    result = evaluate(model, guide, x, num_samples=K, max_elements=CAP)
    assert result.elbo.mean() > before + 0.5  # training worked
    exact = _quadrature_log_likelihood(model, x)
    with torch.no_grad():  # many fresh draws: the size of K draws' Monte Carlo error (delta method)
        w = log_weights(model, guide, 50 * K, 1, x).values
    ratio = (w - w.max(0).values).exp()
    se_ll, se_elbo = ratio.std(0) / ratio.mean(0) / math.sqrt(K), w.std(0) / math.sqrt(K)
    error = result.log_likelihood - exact
    # 6 SE per example (the delta method underestimates heavy-tailed weights by up to 1.4x here), 4 SE on the mean
    assert (error.abs() < 6 * se_ll + 1e-3).all(), error / se_ll
    assert abs(error.mean()) < 4 * se_ll.square().sum().sqrt() / len(x) + 1e-3
    assert (result.elbo < exact + 6 * se_elbo).all()
    gap = exact - result.elbo
    assert gap.mean() > 5 * se_elbo.square().sum().sqrt() / len(x) and gap.mean() < 2.0


def test_elbo_of_a_user_program_matches_pyro_trace_elbo(trained) -> None:
    """evaluate's mean ELBO equals Pyro's own Trace_ELBO estimate on the same examples, within
    the Monte Carlo error of both."""
    model, guide, x, _ = trained
    pyro.set_rng_seed(1)
    result = evaluate(model, guide, x, num_samples=K, max_elements=CAP)
    particles = 2000
    loss = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1).loss(model, guide, x)
    with torch.no_grad():
        w = log_weights(model, guide, K, 1, x).values
    se_pyro = w.sum(1).std() / math.sqrt(particles) / len(x)
    se_ours = (w.var(0).sum() / K).sqrt() / len(x)
    assert abs(-loss / len(x) - result.elbo.mean().item()) < 5 * math.hypot(se_pyro, se_ours)


def test_minibatch_of_a_user_program_is_scaled_to_the_data_set():
    x = _data()
    model = UserDecoder()
    guide = build_guide("diagonal", model, x)
    method = AmortizedVI(model, guide, TrainSettings(objective="iwae", particles=4), num_examples=len(x))
    index = torch.arange(20)
    pyro.set_rng_seed(1)
    minibatch = method.loss(x[index], index)  # per example of the whole set, estimated from 20
    pyro.set_rng_seed(1)
    direct = method.loss(x[index], None)  # per example of these 20
    assert torch.allclose(minibatch, direct, rtol=1e-5)


class ForwardsItsKeywords(nn.Module):
    """Written as Pyro's AIR example writes its model: ``**kwargs`` passed on to a helper that
    takes none of pyrovae's minibatch keywords."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(3, 10)

    def prior(self, n):
        return pyro.sample("code", dist.Normal(torch.zeros(n, 3), 1.0).to_event(1))

    def forward(self, x, **kwargs):
        pyro.module("forwards", self)
        with pyro.plate("data", len(x)):
            code = self.prior(len(x), **kwargs)
            pyro.sample("pixels", dist.Bernoulli(logits=self.net(code)).to_event(1), obs=x)


def test_a_program_whose_kwargs_catch_all_passes_them_on_is_scaled_by_the_factor_not_sent_index():
    x = _data()
    model = ForwardsItsKeywords()
    method = AmortizedVI(model, build_guide("diagonal", model, x), TrainSettings(), num_examples=len(x))
    index = torch.arange(20)
    assert method.minibatch_kwargs(x[index], index) == ({}, 3.0)  # N / B, and no index= or size= for its prior
    assert torch.isfinite(method.step(x[index], index))
