"""AIS and BDMC against closed forms: the linear-Gaussian model, a constrained conjugate pair,
an enumerated mixture; on a trained VAE, AIS is no looser than IS with its encoder."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import config_enumerate

from pyrovae.ais import AISSettings, ais, bdmc, sigmoid_schedule, simulate
from pyrovae.data import load_dataset
from pyrovae.errors import PyrovaeError
from pyrovae.evaluate import evaluate
from pyrovae.guides.base import build_guide
from pyrovae.infer.amortized import AmortizedVI
from pyrovae.infer.base import TrainSettings
from pyrovae.models.linear_gaussian import LinearGaussian
from pyrovae.models.vae import VAE


def _linear_gaussian(seed: int = 0, noise: float = 0.5) -> tuple[LinearGaussian, torch.Tensor]:
    torch.manual_seed(seed)
    model = LinearGaussian([5], latent=2, noise=noise)
    return model, model.marginal().sample((6,))


def test_the_schedule_runs_from_zero_to_one_increasing():
    betas = sigmoid_schedule(50)
    assert betas[0] == 0 and betas[-1] == 1 and bool((betas.diff() > 0).all()) and len(betas) == 51


def test_ais_converges_to_the_exact_linear_gaussian_evidence_per_example_as_steps_grow():
    model, x = _linear_gaussian()
    exact = model.log_marginal(x).detach()
    errors, stderr = {}, {}
    for steps in (3, 300):
        torch.manual_seed(1)
        result = ais(model, x, settings=AISSettings(steps=steps, chains=16, leapfrog=5, warmup=40))
        errors[steps], stderr[steps] = result.log_likelihood - exact, result.stderr
        assert result.log_likelihood.shape == (6,) and 0.4 < result.accept_rate < 0.95
    # unbiased in log-mean weight up to the chains' error (here about 0.1 nats per example), which falls as T grows
    assert bool((errors[300].abs() < 4 * stderr[300] + 0.02).all()), (errors[300], stderr[300])
    assert abs(errors[300].mean()) < 0.1 and errors[3].mean() < -0.5, errors
    assert stderr[300].mean() < stderr[3].mean() / 3, stderr


def test_ais_from_the_exact_posterior_is_exact_with_zero_variance():
    """Started at q0 = p(z|x), every weight is p(x, z) / q0(z) = p(x), whatever the chains do."""
    model, x = _linear_gaussian()
    guide = build_guide("exact", model, x)
    result = ais(model, x, guide, AISSettings(steps=20, chains=4, leapfrog=3, warmup=5, start="guide"))
    assert torch.allclose(result.log_likelihood, model.log_marginal(x).detach(), atol=1e-3)
    assert float(result.stderr.max()) < 1e-3


def test_bdmc_sandwiches_the_exact_evidence_of_simulated_data_and_tightens_with_steps():
    torch.manual_seed(0)
    model = LinearGaussian([5], latent=2, noise=0.3)
    like = model.marginal().sample((24,))
    widths = []
    for steps in (5, 200):
        torch.manual_seed(2)
        simulated, _ = simulate(model, like)
        exact = model.log_marginal(simulated.primary).detach()
        torch.manual_seed(2)  # bdmc simulates the same data again
        result = bdmc(model, like, settings=AISSettings(steps=steps, chains=8, leapfrog=5, warmup=40))
        assert result.lower.shape == exact.shape and bool(torch.isfinite(result.width).all())
        # stochastic bounds: they hold in expectation, so on the mean over examples within its standard error
        below, above = result.lower - exact, result.upper - exact
        assert below.mean() <= 3 * below.std() / 24**0.5 and above.mean() >= -3 * above.std() / 24**0.5, (steps, below, above)
        widths.append(result.width.mean().item())
    assert widths[1] < 0.3 and widths[0] > 5 * widths[1], widths


def test_simulate_replaces_only_the_data_and_returns_the_latents_that_drew_it():
    model, like = _linear_gaussian()
    batch, z = simulate(model, like)
    assert batch.primary.shape == like.shape and not torch.equal(batch.primary, like)
    residual = batch.primary - (z["z"] @ model.weight.T + model.bias)
    assert abs(residual.std().item() - 0.5) < 0.2  # x = W z + b + noise for the returned z


def gamma_poisson(x):
    with pyro.plate("data", len(x)):
        rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
        pyro.sample("counts", dist.Poisson(rate[:, None].expand(len(x), 6)).to_event(1), obs=x)


def test_a_positive_latent_is_annealed_on_the_reals_with_its_jacobian():
    """Gamma-Poisson: the evidence is negative binomial; a missing or wrong log|dz/du| biases it by nats."""
    x = torch.poisson(torch.full((8, 6), 2.5), generator=torch.Generator().manual_seed(0))
    a, b, n, total = 2.0, 1.0, 6, x.sum(-1)
    exact = a * math.log(b) - math.lgamma(a) + torch.lgamma(a + total) - (a + total) * math.log(b + n) - torch.lgamma(x + 1).sum(-1)
    torch.manual_seed(0)
    result = ais(gamma_poisson, x, settings=AISSettings(steps=200, chains=16, leapfrog=5, warmup=40))
    error = result.log_likelihood - exact
    assert bool((error.abs() < 4 * result.stderr + 0.02).all()) and abs(error.mean()) < 0.05, (error, result.stderr)


MEANS = torch.tensor([-3.0, 0.0, 3.0])
WEIGHTS = torch.tensor([0.2, 0.5, 0.3])


@config_enumerate
def mixture(x):
    with pyro.plate("data", len(x)):
        y = pyro.sample("y", dist.Categorical(WEIGHTS))
        z = pyro.sample("z", dist.Normal(MEANS[y], 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def test_an_enumerated_site_is_summed_out_in_the_prior_and_the_joint():
    """y ~ Cat, z ~ N(mu_y, 1), x ~ N(z, 1): log p(x) = log sum_y pi_y N(x; mu_y, 2), a bimodal posterior in z."""
    x = torch.tensor([-3.5, -1.0, 0.5, 1.5, 4.0])
    exact = torch.logsumexp(WEIGHTS.log() + dist.Normal(MEANS, math.sqrt(2)).log_prob(x[:, None]), -1)
    torch.manual_seed(0)
    result = ais(mixture, x, settings=AISSettings(steps=100, chains=16, leapfrog=3, warmup=20))
    error = result.log_likelihood - exact
    assert bool((error.abs() < 4 * result.stderr + 0.02).all()) and abs(error.mean()) < 0.05, (error, result.stderr)


def masked(x, keep):
    with pyro.plate("data", len(x)), pyro.poutine.mask(mask=keep):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def test_a_masked_example_contributes_nothing():
    x, keep = torch.tensor([0.5, 2.0, -1.0, 1.0]), torch.tensor([True, False, True, False])
    result = ais(masked, (x, keep), settings=AISSettings(steps=100, chains=8, leapfrog=3, warmup=20))
    exact = dist.Normal(0.0, math.sqrt(2)).log_prob(x)
    assert torch.equal(result.log_likelihood[~keep], torch.zeros(2))
    assert bool(((result.log_likelihood[keep] - exact[keep]).abs() < 0.05).all())


def test_on_a_trained_vae_ais_is_no_looser_than_is_with_the_encoder():
    pyro.clear_param_store()
    torch.manual_seed(0)
    data = load_dataset("digits")
    x = data.batch("train", torch.arange(512))

    model = VAE(x.shape[1:], latent=2, hidden=(32,))
    guide = build_guide("diagonal", model, x, hidden=(32,))
    method = AmortizedVI(model, guide, TrainSettings(lr=3e-3, batch_size=64), len(x))
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        index = torch.randperm(len(x), generator=generator)[:64]
        method.step(x[index], index)
    held = data.batch("valid", torch.arange(16))
    encoder = evaluate(model, guide, held, num_samples=200)
    annealed = ais(model, held, settings=AISSettings(steps=150, chains=8, leapfrog=5, warmup=30))
    gain = (annealed.log_likelihood - encoder.log_likelihood).mean().item()
    error = 3 * (annealed.stderr.pow(2).mean().sqrt().item() + 0.05)
    assert gain > -error, (gain, error)
    from_guide = ais(model, held, guide, AISSettings(steps=50, chains=8, leapfrog=5, warmup=10, start="guide"))
    assert (from_guide.log_likelihood - encoder.log_likelihood).mean().item() > -error, (from_guide.log_likelihood - encoder.log_likelihood)


def coin(x):
    with pyro.plate("data", len(x)):
        c = pyro.sample("c", dist.Bernoulli(0.5))
        pyro.sample("x", dist.Normal(c, 1.0), obs=x)


def global_mean(x):
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(w, 1.0), obs=x)


def observed_only(x):
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)


def auxiliary_guide(x, keep=None):
    with pyro.plate("data", len(x)):
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("z", dist.Normal(a, 1.0))


@pytest.mark.parametrize("model, guide, settings, match", [
    (coin, None, AISSettings(), "mark it infer"),
    (global_mean, None, AISSettings(), "global latent"),
    (observed_only, None, AISSettings(), "no continuous latents"),
    (masked, None, AISSettings(steps=0), "--ais-steps, --chains and --leapfrog must be positive"),
    (masked, None, AISSettings(start="guide"), "needs a guide"),
    (masked, auxiliary_guide, AISSettings(start="guide", steps=2, warmup=1), "exactly the model's latents"),
])
def test_refusals_are_one_line(model, guide, settings, match):
    x = torch.randn(5)
    data = (x, torch.ones(5, dtype=torch.bool)) if model is masked else x
    with pytest.raises(PyrovaeError, match=match) as error:
        ais(model, data, guide, settings)
    assert "\n" not in str(error.value)
