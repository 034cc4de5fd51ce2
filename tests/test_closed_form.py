"""The linear-Gaussian model has exact log p(x) and p(z|x): every bound is checked against them."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyrovae import evaluate
from pyrovae.guides import ExactPosterior, build_guide
from pyrovae.handlers import scale_latents
from pyrovae.infer import AmortizedVI, TrainSettings
from pyrovae.models import LinearGaussian
from pyrovae.sites import data_plate


class FixedGaussian(nn.Module):
    """A diagonal Gaussian q(z|x) with given per-example loc and scale (not amortized)."""

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.loc, self.scale = loc, scale

    def forward(self, x, index=None, size=None):
        with data_plate(x, index, size):
            rows = index if index is not None else slice(None)
            pyro.sample("z", dist.Normal(self.loc[rows], self.scale[rows]).to_event(1))


@pytest.fixture
def setup():
    torch.manual_seed(1)
    model = LinearGaussian((5,), latent=2, noise=0.7)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.5, 0.9], [0.8, -1.0], [0.2, 0.5], [-1.1, 0.7], [0.6, 1.2]]))
        model.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0, 0.5]))
    x = model.marginal().sample((40,))
    posterior = model.posterior(x)
    # a deliberately imperfect proposal: the posterior mean, shifted, with its diagonal widened
    loc = posterior.mean + 0.3
    scale = posterior.covariance_matrix.diagonal(dim1=-2, dim2=-1).sqrt().expand_as(loc) * 1.4
    return model, x, FixedGaussian(loc, scale)


def test_importance_sampled_log_likelihood_matches_exact(setup):
    model, x, guide = setup
    exact = model.log_marginal(x)
    result = evaluate(model, guide, x, num_samples=5000)
    assert (result.log_likelihood - exact).abs().mean() < 0.05
    assert (result.log_likelihood - exact).abs().max() < 0.1


def test_elbo_below_log_likelihood_and_gap_is_kl(setup):
    model, x, guide = setup
    exact = model.log_marginal(x)
    result = evaluate(model, guide, x, num_samples=20000)
    assert (result.elbo < exact).all()
    q = dist.Normal(guide.loc, guide.scale).to_event(1)
    p = model.posterior(x)
    # KL(q || p) between a diagonal and a full Gaussian, in closed form
    kl = _kl_diag_full(guide.loc, guide.scale, p)
    assert torch.allclose(exact - result.elbo, kl, atol=0.03)
    assert kl.min() > 0.05  # the proposal really is off, so the test can fail


def _kl_diag_full(loc, scale, p):
    cov_q = torch.diag_embed(scale**2)
    k = loc.shape[-1]
    prec = p.precision_matrix
    diff = p.mean - loc
    prec = prec.expand(len(loc), k, k)
    trace = torch.einsum("bij,bji->b", prec, cov_q)
    quad = torch.einsum("bi,bij,bj->b", diff, prec, diff)
    logdet = torch.logdet(p.covariance_matrix.expand(len(loc), k, k)) - 2 * scale.log().sum(-1)
    return 0.5 * (trace + quad - k + logdet)


def test_exact_posterior_makes_the_elbo_tight(setup):
    model, x, _ = setup
    guide = build_guide("exact", model, x)
    assert isinstance(guide, ExactPosterior)
    result = evaluate(model, guide, x, num_samples=64)
    exact = model.log_marginal(x)
    assert torch.allclose(result.elbo, exact, atol=1e-4)
    assert torch.allclose(result.log_likelihood, exact, atol=1e-4)


def test_iwae_bound_sits_between_elbo_and_log_likelihood(setup):
    model, x, guide = setup
    result = evaluate(model, guide, x, num_samples=4000, iwae_k=10)
    exact = model.log_marginal(x)
    assert result.elbo.mean() < result.iwae.mean() < exact.mean() + 0.01
    assert result.iwae.mean() < result.log_likelihood.mean() + 0.01


@pytest.mark.parametrize("objective", ["elbo", "elbo-analytic", "iwae"])
def test_minibatch_scaling_is_exact(setup, objective):
    """With the exact posterior every bound is log p(x): a minibatch must scale to N/B of its sum."""
    model, x, _ = setup
    guide = build_guide("exact", model, x)
    method = AmortizedVI(model, guide, TrainSettings(objective=objective, particles=3), num_examples=len(x))
    index = torch.tensor([3, 7, 11, 20])
    loss = method.loss(x[index], index)
    expected = -model.log_marginal(x[index]).sum() * len(x) / len(index) / len(x)
    assert torch.allclose(loss, expected, atol=1e-4)


def test_warmup_scales_the_kl_term_linearly(setup):
    """loss(beta) = -E[log p(x|z)] + beta KL: linear in beta with the same draws."""
    model, x, guide = setup
    method = AmortizedVI(model, guide, TrainSettings(objective="elbo-analytic"), num_examples=len(x))
    losses = []
    for beta in (0.0, 0.5, 1.0):
        pyro.set_rng_seed(3)
        losses.append(method.loss(x, None, beta).item())
    assert math.isclose(losses[1], (losses[0] + losses[2]) / 2, rel_tol=1e-5)
    assert losses[0] < losses[2]  # the KL is positive


def test_scale_latents_leaves_observations_alone(setup):
    model, x, _ = setup
    from pyro import poutine

    trace = poutine.trace(scale_latents(model, 0.25)).get_trace(x)
    assert trace.nodes["z"]["scale"] == 0.25 and trace.nodes["x"]["scale"] == 1.0


def test_amortized_guide_trains_towards_the_exact_bound(setup):
    model, x, _ = setup
    model.requires_grad_(False)
    guide = build_guide("diagonal", model, x, hidden=(32,))
    method = AmortizedVI(model, guide, TrainSettings(lr=1e-2), num_examples=len(x))
    before = evaluate(model, guide, x, num_samples=200).elbo.mean()
    for _ in range(300):
        method.step(x, torch.arange(len(x)))
    after = evaluate(model, guide, x, num_samples=200)
    exact = model.log_marginal(x).mean()
    assert after.elbo.mean() > before + 1.0
    assert after.elbo.mean() < exact  # a diagonal q cannot match a correlated posterior
