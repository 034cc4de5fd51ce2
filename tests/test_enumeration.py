"""Enumerated discrete latents are summed out exactly in the importance weights: closed forms."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import config_enumerate

from pyrovae.enumeration import enumerated_sites, log_weights_enum
from pyrovae.errors import PyrovaeError
from pyrovae.importance import LogWeights

MU = torch.tensor([-2.0, 0.0, 3.0])  # component offsets of the Gaussian mixture
S = 0.7  # observation noise
X_GAUSS = torch.tensor([-2.5, 0.3, 2.0, 4.1])


def gaussian_mixture(x, logits):
    """z ~ N(0, 1), y ~ Cat(softmax(logits)), x ~ N(mu_y + z, S^2), all per example."""
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        y = pyro.sample("y", dist.Categorical(logits=logits), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(MU[y] + z, S), obs=x)


def gaussian_exact(x, logits):
    """log p(x_i) = log sum_y pi_y N(x_i; mu_y, 1 + S^2), shape (B,)."""
    log_pi = torch.log_softmax(logits, -1)
    comp = dist.Normal(MU, math.sqrt(1 + S**2)).log_prob(x[:, None])
    return torch.logsumexp(log_pi + comp, -1)


def gaussian_posterior(x, logits):
    """p(z | x_i): a mixture over y of N((x - mu_y) / (1 + S^2), S^2 / (1 + S^2)); (weights, locs, scale)."""
    log_pi = torch.log_softmax(logits, -1)
    resp = torch.softmax(log_pi + dist.Normal(MU, math.sqrt(1 + S**2)).log_prob(x[:, None]), -1)
    locs = (x[:, None] - MU) / (1 + S**2)
    return resp, locs, S / math.sqrt(1 + S**2)


def bernoulli_mixture(x, logits, probs, scale=1.0, size=None, subsample=None):
    """y ~ Cat(softmax(logits)), x_j ~ Bernoulli(probs[y, j]) for the 5 pixels, per example (nesting 1)."""
    with poutine.scale(scale=scale), pyro.plate("data", size or x.shape[0], subsample=subsample):
        y = pyro.sample("y", dist.Categorical(logits=logits), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Bernoulli(probs[y]).to_event(1), obs=x)


def bernoulli_exact(x, logits, probs):
    """log p(x_i) = logsumexp_y [log pi_y + sum_j log Bern(x_ij; probs[y, j])], shape (B,)."""
    comp = dist.Bernoulli(probs).log_prob(x[:, None, :]).sum(-1)  # (B, 3)
    return torch.logsumexp(torch.log_softmax(logits, -1) + comp, -1)


def empty_guide(*args, **kwargs):
    pass


@pytest.fixture
def bern():
    torch.manual_seed(1)
    x = torch.bernoulli(torch.full((6, 5), 0.5))
    logits = torch.randn(3)
    probs = torch.rand(3, 5) * 0.9 + 0.05
    return x, logits, probs


def test_gaussian_mixture_exact_posterior_guide_gives_constant_exact_weights():
    """q(z|x) = p(z|x) (a Gaussian mixture) makes every weight log p(x) itself: zero variance."""
    logits = torch.tensor([0.2, -0.5, 0.4])
    resp, locs, scale = gaussian_posterior(X_GAUSS, logits)

    def guide(x, logits):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MixtureSameFamily(dist.Categorical(probs=resp), dist.Normal(locs, scale)))

    w = log_weights_enum(gaussian_mixture, guide, 50, 1, X_GAUSS, logits)
    assert w.values.shape == (50, 4) and w.data_scale == 1.0
    assert torch.allclose(w.values, gaussian_exact(X_GAUSS, logits).expand(50, -1), atol=1e-4)


def test_gaussian_mixture_importance_estimate_matches_exact():
    """A single-Gaussian guide (moment-matched to the bimodal posterior, widened): K = 20000.

    The estimate log mean_k w_k has standard error ~ sd(w) / (mean(w) sqrt(K)) (delta method);
    it is measured below and is < 0.005 for every example, so a 0.02 tolerance is >= 4 standard
    errors, and a wrong sum over y (e.g. a max, or a missing log pi_y) is off by far more.
    """
    logits = torch.tensor([0.2, -0.5, 0.4])
    resp, locs, scale = gaussian_posterior(X_GAUSS, logits)
    mean = (resp * locs).sum(-1)
    sd = ((resp * (locs**2 + scale**2)).sum(-1) - mean**2).sqrt() * 1.3

    def guide(x, logits):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(mean, sd))

    k = 20000
    values = log_weights_enum(gaussian_mixture, guide, k, 1, X_GAUSS, logits).values
    estimate = torch.logsumexp(values, 0) - math.log(k)
    w = torch.exp(values - values.max(0).values)
    stderr = w.std(0) / (w.mean(0) * math.sqrt(k))
    assert (stderr < 0.005).all(), stderr
    assert torch.allclose(estimate, gaussian_exact(X_GAUSS, logits), atol=0.02)


def test_pure_discrete_model_weight_is_exact_log_likelihood(bern):
    x, logits, probs = bern
    w = log_weights_enum(bernoulli_mixture, empty_guide, 4, 1, x, logits, probs)
    assert isinstance(w, LogWeights) and w.values.shape == (4, 6)
    values, data_scale = w  # also unpacks as a pair
    assert data_scale == 1.0
    assert torch.allclose(values, bernoulli_exact(x, logits, probs).expand(4, -1), atol=1e-5)
    assert (values == values[0]).all()  # nothing is sampled: every particle is identical


def test_examples_are_summed_out_independently(bern):
    """sum_i log sum_y p(x_i, y), not log sum_y prod_i p(x_i, y): per example, as in the model."""
    x, logits, probs = bern
    pair = x[:2]
    both = log_weights_enum(bernoulli_mixture, empty_guide, 1, 1, pair, logits, probs).values[0]
    alone = torch.cat([log_weights_enum(bernoulli_mixture, empty_guide, 1, 1, pair[i : i + 1], logits, probs).values[0] for i in range(2)])
    assert torch.allclose(both, alone, atol=1e-6)
    assert torch.allclose(both, bernoulli_exact(pair, logits, probs), atol=1e-5)
    # a joint enumeration (one y for the whole batch) gives a different total: the check has teeth
    comp = dist.Bernoulli(probs).log_prob(pair[:, None, :]).sum(-1).sum(0)
    joint = torch.logsumexp(torch.log_softmax(logits, -1) + comp, -1)
    assert abs(float(both.sum() - joint)) > 0.1


def test_gradient_wrt_mixture_logits_matches_closed_form(bern):
    x, logits, probs = bern
    logits = logits.clone().requires_grad_()
    probs = probs.clone().requires_grad_()
    values = log_weights_enum(bernoulli_mixture, empty_guide, 3, 1, x, logits, probs).values
    got = torch.autograd.grad(values.sum(), (logits, probs))
    want = torch.autograd.grad(3 * bernoulli_exact(x, logits, probs).sum(), (logits, probs))
    for g, e in zip(got, want):
        assert torch.allclose(g, e, atol=1e-5)


def test_gradient_flows_through_continuous_part():
    logits = torch.tensor([0.2, -0.5, 0.4], requires_grad=True)
    loc = torch.zeros(4, requires_grad=True)

    def guide(x, logits):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, 1.0))

    values = log_weights_enum(gaussian_mixture, guide, 8, 1, X_GAUSS, logits).values
    g_logits, g_loc = torch.autograd.grad(values.sum(), (logits, loc))
    assert g_logits.abs().sum() > 0 and g_loc.abs().sum() > 0


def _one_line_error(fn, *args, match):
    with pytest.raises(PyrovaeError, match=match) as info:
        log_weights_enum(fn, empty_guide, 2, 1, *args)
    assert "\n" not in str(info.value)


def test_discrete_site_neither_enumerated_nor_guided_is_refused(bern):
    x, logits, probs = bern

    def model(x):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("cluster", dist.Categorical(logits=logits))
            pyro.sample("x", dist.Bernoulli(probs[y]).to_event(1), obs=x)

    _one_line_error(model, x, match="'cluster'.*neither enumerated nor sampled by the guide")


def test_sequential_enumeration_and_unguided_continuous_site_are_refused(bern):
    x, logits, probs = bern

    def sequential(x):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(logits=logits), infer={"enumerate": "sequential"})
            pyro.sample("x", dist.Bernoulli(probs[y]).to_event(1), obs=x)

    _one_line_error(sequential, x, match="'y'.*sequential")
    _one_line_error(gaussian_mixture, X_GAUSS, torch.zeros(3), match="'z' is not sampled by the guide")


def test_global_site_is_refused(bern):
    x, logits, probs = bern

    def model(x):
        y = pyro.sample("y", dist.Categorical(logits=logits), infer={"enumerate": "parallel"})
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Bernoulli(probs[y]).to_event(1), obs=x)

    _one_line_error(model, x, match="'y' is outside the 'data' plate")


@config_enumerate
def pixel_mixture(x, logits, probs):
    """Nesting 2: y ~ Cat per example (dim -2), pixels x_j ~ Bernoulli(probs[y, j]) in an inner plate."""
    with pyro.plate("data", x.shape[0], dim=-2):
        y = pyro.sample("y", dist.Categorical(logits=logits.expand(x.shape[0], 1, 3)))
        with pyro.plate("pixels", x.shape[1], dim=-1):
            pyro.sample("x", dist.Bernoulli(probs[y.squeeze(-1)]), obs=x)


def test_inner_plate_with_nesting_two_is_exact(bern):
    x, logits, probs = bern
    assert enumerated_sites(pixel_mixture, x, logits, probs) == ["y"]
    w = log_weights_enum(pixel_mixture, empty_guide, 3, 2, x, logits, probs)
    assert w.values.shape == (3, 6)
    assert torch.allclose(w.values, bernoulli_exact(x, logits, probs).expand(3, -1), atol=1e-5)


def test_subsample_scale_is_returned_apart_and_annealing_scale_kept(bern):
    x, logits, probs = bern
    idx = torch.tensor([0, 2, 5])
    w = log_weights_enum(bernoulli_mixture, empty_guide, 2, 1, x[idx], logits, probs, size=30, subsample=idx)
    assert w.data_scale == pytest.approx(10.0)
    assert torch.allclose(w.values, bernoulli_exact(x[idx], logits, probs).expand(2, -1), atol=1e-5)
    half = log_weights_enum(bernoulli_mixture, empty_guide, 2, 1, x[idx], logits, probs, scale=0.5, size=30, subsample=idx)
    assert half.data_scale == pytest.approx(10.0)
    assert torch.allclose(half.values, 0.5 * w.values, atol=1e-5)


def test_without_enumerated_sites_equals_plain_importance_weights():
    from pyrovae.importance import log_weights

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, S), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.5 * x, 0.8))

    pyro.set_rng_seed(3)
    plain = log_weights(model, guide, 5, 1, X_GAUSS).values
    pyro.set_rng_seed(3)
    enum = log_weights_enum(model, guide, 5, 1, X_GAUSS).values
    assert torch.allclose(plain, enum, atol=1e-6)


def test_latent_scale_differing_from_likelihood_scale_is_refused(bern):
    """Annealing only log p(y) would put a scale inside the sum over y: Pyro refuses, in one line."""
    from pyrovae.handlers import scale_latents

    x, logits, probs = bern
    _one_line_error(scale_latents(bernoulli_mixture, 0.3), x, logits, probs, match="common poutine.scale")


def mixture_prior(x):
    """y ~ Cat(pi), z ~ N(mu_y, 1), x ~ N(z, S^2): the continuous latent's density depends on the enumerated one."""
    with pyro.plate("data", x.shape[0]):
        y = pyro.sample("y", dist.Categorical(torch.tensor([0.2, 0.5, 0.3])), infer={"enumerate": "parallel"})
        z = pyro.sample("z", dist.Normal(MU[y], 1.0))
        pyro.sample("x", dist.Normal(z, S), obs=x)


@pytest.mark.parametrize("vectorize", [True, False])
def test_a_latent_whose_density_depends_on_an_enumerated_site_has_exact_weights(vectorize):
    """Each weight is log sum_y pi_y N(z; mu_y, 1) N(x; z, S^2) - log q(z), in closed form at the drawn z."""
    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x / 2, 1.5))

    pyro.set_rng_seed(0)
    weights = log_weights_enum(mixture_prior, guide, 4, 1, X_GAUSS, vectorize=vectorize).values
    pyro.set_rng_seed(0)
    z = torch.stack([poutine.trace(guide).get_trace(X_GAUSS).nodes["z"]["value"] for _ in range(4)]) if not vectorize else None
    if z is None:
        with pyro.plate("_particles", 4, dim=-2):
            z = poutine.trace(guide).get_trace(X_GAUSS).nodes["z"]["value"]
    joint = torch.logsumexp(torch.tensor([0.2, 0.5, 0.3]).log() + dist.Normal(MU, 1.0).log_prob(z[..., None]), -1) + dist.Normal(z, S).log_prob(X_GAUSS)
    assert torch.allclose(weights, joint - dist.Normal(X_GAUSS / 2, 1.5).log_prob(z), atol=1e-5)
