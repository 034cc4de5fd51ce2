"""The linear-Gaussian model has exact log p(x) and p(z|x): every bound is checked against them."""

import io
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyrovae import evaluate
from pyrovae.evaluate import chunk_sizes
from pyrovae.guides import ExactPosterior, build_guide
from pyrovae.handlers import scale_latents
from pyrovae.importance import log_weights
from pyrovae.infer import AmortizedVI, TrainSettings
from pyrovae.infer.loop import warmup_beta
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


class ShiftedPosterior(nn.Module):
    """An amortized, deliberately imperfect q(z|x): the exact posterior's mean (affine in x) shifted
    by `shift`, its marginal scales widened by `widen`, correlations dropped (any chunk of examples)."""

    def __init__(self, model: LinearGaussian, shift: float = 0.3, widen: float = 1.4) -> None:
        super().__init__()
        with torch.no_grad():
            inverse = torch.linalg.inv(model.weight.T @ model.weight + model.noise**2 * torch.eye(model.latent))
            self.register_buffer("gain", model.weight @ inverse.T)  # mean = (x - b) @ gain
            self.register_buffer("offset", model.bias.clone())
            self.register_buffer("scale", (model.noise**2 * inverse).diagonal().sqrt() * widen)
        self.shift = shift

    def forward(self, x, index=None, size=None):
        with data_plate(x, index, size):
            loc = (x.reshape(len(x), -1) - self.offset) @ self.gain + self.shift
            pyro.sample("z", dist.Normal(loc, self.scale.expand_as(loc)).to_event(1))


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
    p = model.posterior(x)
    # KL(q || p) between a diagonal and a full Gaussian, in closed form
    kl = _kl_diag_full(guide.loc, guide.scale, p)
    # the ELBO of 20000 draws has a Monte Carlo standard error of about 0.011 nats per example:
    # 5 of them bound the worst of 40 examples, and the mean is tight
    error = exact - result.elbo - kl
    assert error.abs().max() < 0.06 and error.mean().abs() < 0.01, error
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


# A memory cap of 4 examples x 60 samples a pass: K = 1000 samples take 17 passes, the last of 40.
CAP = 5 * 64 * 4


@pytest.mark.parametrize("capture", [False, True], ids=["eager", "captured"])
def test_every_pass_of_the_samples_counts(setup, capture):
    """K split over many passes: with the exact posterior every log-weight is log p(x), so the
    ELBO, the IWAE-10 bound and IS log p(x) are exactly log p(x) only if every pass is summed
    and normalized by K; with the imperfect proposal the IS estimate is within Monte Carlo error
    of log p(x), per example."""
    model, x, _ = setup
    assert chunk_sizes(len(x), 1000, 5, CAP, 10) == (4, 60)
    exact = model.log_marginal(x)
    tight = evaluate(model, build_guide("exact", model, x), x, num_samples=1000, iwae_k=10, max_elements=CAP, capture=capture)
    for value in (tight.elbo, tight.log_likelihood, tight.iwae):
        assert torch.allclose(value, exact, atol=1e-4, rtol=0)
    guide = ShiftedPosterior(model)
    pyro.set_rng_seed(0)
    result = evaluate(model, guide, x, num_samples=1000, iwae_k=10, max_elements=CAP, capture=capture)
    with torch.no_grad():  # many fresh draws: the size of K draws' Monte Carlo error (delta method)
        w = log_weights(model, guide, 20_000, 1, x).values
    ratio = (w - w.max(0).values).exp()
    se = ratio.std(0) / ratio.mean(0) / math.sqrt(1000)
    assert ((result.log_likelihood - exact).abs() < 6 * se + 1e-3).all(), (result.log_likelihood - exact) / se
    elbo_se = w.std(0) / math.sqrt(1000)  # and the ELBO is the mean log-weight over all K samples
    assert ((result.elbo - w.mean(0)).abs() < 6 * elbo_se * math.sqrt(1 + 1000 / 20_000)).all()


@pytest.mark.parametrize("holds_model", [False, True], ids=["own-tensors", "guide-holds-the-model"])
def test_captured_evaluation_returns_ordinary_tensors(setup, holds_model):
    """The captured path gives the eager path's numbers on the same draws, as plain tensors a user
    can read (NumPy view, list, saved copy), and leaves the model's parameters as they were, also
    when the guide holds the model as a submodule (shared parameters) and capture is refused."""
    model, x, _ = setup
    guide = ShiftedPosterior(model)
    if holds_model:
        guide.model = model
    before = [p.detach().clone() for p in model.parameters()]
    pyro.set_rng_seed(0)
    eager = evaluate(model, guide, x, num_samples=1000, max_elements=CAP, capture=False)
    pyro.set_rng_seed(0)
    captured = evaluate(model, guide, x, num_samples=1000, max_elements=CAP, capture=True)
    for ours, reference in ((captured.elbo, eager.elbo), (captured.log_likelihood, eager.log_likelihood)):
        assert torch.allclose(ours, reference, atol=1e-4)  # same draws, same numbers
        assert np.allclose(ours.numpy(), reference.numpy(), atol=1e-4)
        assert np.allclose(ours.tolist(), reference.tolist(), atol=1e-4)
        buffer = io.BytesIO()
        torch.save(ours, buffer)
        buffer.seek(0)
        assert torch.allclose(torch.load(buffer), reference, atol=1e-4)
    for parameter, value in zip(model.parameters(), before):
        assert np.array_equal(parameter.detach().numpy(), value.numpy())


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


def test_warmup_ramps_from_its_start_to_one():
    """Pyro's dmm.py annealing: start + (1 - start) (step + 1) / steps, then 1."""
    assert warmup_beta(0, 10) == 0.1 and warmup_beta(9, 10) == 1.0 and warmup_beta(50, 10) == 1.0
    assert math.isclose(warmup_beta(0, 10, 0.2), 0.28) and math.isclose(warmup_beta(4, 10, 0.2), 0.6)
    assert warmup_beta(9, 10, 0.2) == 1.0 and warmup_beta(0, 0, 0.2) == 1.0


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


def test_log_weights_of_a_subsampled_plate_are_per_example():
    """Scored on a minibatch of a larger data set (the plate subsampled by `index` of `size`),
    each example's log-weights are those of the example alone: the plate's N/B scale comes out."""
    from pyrovae.importance import log_weights
    from pyrovae.models import VAE

    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((6, 12), 0.4))
    model = VAE((12,), 3, (8,))
    guide = build_guide("diagonal", model, x, hidden=(8,))
    pyro.set_rng_seed(1)
    alone = log_weights(model, guide, 5, 1, x).values
    pyro.set_rng_seed(1)
    in_a_larger_set = log_weights(model, guide, 5, 1, x, index=torch.arange(6) + 20, size=60).values
    assert alone.shape == in_a_larger_set.shape == (5, 6)
    assert torch.allclose(alone, in_a_larger_set, atol=1e-5)


def test_fit_passes_the_warmup_start_to_every_step(tmp_path, monkeypatch):
    """`--warmup 1 --warmup-from 0.5 --beta 2`: the latent weights of the first epoch's steps."""
    from pyrovae.config import Config
    from pyrovae.experiment import fit

    weights = []
    step = AmortizedVI.step
    monkeypatch.setattr(AmortizedVI, "step", lambda self, x, index, beta=1.0, **kw: weights.append(beta) or step(self, x, index, beta, **kw))
    config = Config(dataset="digits", hidden=(8,), latent=2, epochs=2, batch_size=500, warmup=1.0, warmup_from=0.5, beta=2.0, eval_samples=0, logs="none")
    fit(config, tmp_path / "run", progress=False)
    steps = len(weights) // 2
    assert steps >= 2
    assert weights[:steps] == pytest.approx([2.0 * (0.5 + 0.5 * (s + 1) / steps) for s in range(steps)])
    assert weights[steps:] == [2.0] * steps
