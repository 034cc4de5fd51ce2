"""The data set's ELBO of models with global latents (`pyrovae.dataset_bound`), against closed forms:
the conjugate model w ~ N(0, 1), x_i ~ N(w, 1) has log p(x) = log N(x; 0, I + 11^T) and a Gaussian
posterior, so the ELBO of any Gaussian guide is log p(x) - KL(q || posterior)."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import config_enumerate
from test_programs import global_guide, global_model  # w ~ N(0, 1), x_i ~ N(w, 1); q(w) from the param store
from torch import nn

from pyrovae.dataset_bound import dataset_elbo
from pyrovae.errors import PyrovaeError
from pyrovae.evaluate import evaluate

LOG_2PI = math.log(2 * math.pi)


def _data(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) + 1.5


def _log_evidence(x: torch.Tensor) -> float:
    n = len(x)
    return dist.MultivariateNormal(torch.zeros(n, dtype=torch.float64), torch.eye(n, dtype=torch.float64) + 1).log_prob(x.double()).item()


def _posterior(x: torch.Tensor) -> tuple[float, float]:
    """Mean and variance of p(w | x)."""
    return x.sum().item() / (len(x) + 1), 1 / (len(x) + 1)


def _kl(m: float, v: float, m0: float, v0: float) -> float:
    """KL(N(m, v) || N(m0, v0))."""
    return 0.5 * (math.log(v0 / v) + (v + (m - m0) ** 2) / v0 - 1)


def _set_guide(loc: float, scale: float) -> None:
    """The guide's values in the param store, as training leaves them."""
    pyro.clear_param_store()
    pyro.param("w_loc", torch.tensor(loc))
    pyro.param("w_scale", torch.tensor(scale), constraint=dist.constraints.positive)


def test_the_exact_posterior_gives_the_log_evidence_and_a_wrong_guide_falls_short_by_its_kl():
    x = _data(20)
    mean, var = _posterior(x)
    _set_guide(mean, var**0.5)
    exact = dataset_elbo(global_model, global_guide, x, num_samples=50)
    assert abs(exact.elbo - _log_evidence(x)) < 1e-3 and exact.stderr < 1e-4  # every draw weighs p(x) exactly
    assert exact.examples == 20 and exact.per_example == pytest.approx(exact.elbo / 20)
    summary = {"examples": 20, "elbo": exact.elbo, "elbo_per_example": exact.per_example, "stderr": exact.stderr, "num_samples": 50}
    assert exact.summary() == summary
    assert pyro.param("w_loc").item() == pytest.approx(mean)  # the trained values are kept

    _set_guide(mean - 0.4, 0.5)
    wrong = dataset_elbo(global_model, global_guide, x, num_samples=800)
    expected = _log_evidence(x) - _kl(mean - 0.4, 0.25, mean, var)
    assert _kl(mean - 0.4, 0.25, mean, var) > 10 * wrong.stderr  # the KL is far outside MC error
    assert abs(wrong.elbo - expected) < 4 * wrong.stderr, (wrong.elbo, expected, wrong.stderr)


def test_chunks_share_one_global_draw_and_count_its_terms_once():
    """Counting log p(w) - log q(w) once per chunk shifts the mean by (chunks - 1) KL(q || prior);
    drawing w anew per chunk leaves the mean but breaks the exact posterior's zero-variance weights."""
    x = _data(40, seed=1)
    mean, var = _posterior(x)
    _set_guide(mean, var**0.5)
    exact = dataset_elbo(global_model, global_guide, x, num_samples=30, max_examples=7)  # 6 chunks, the last of 5
    assert abs(exact.elbo - _log_evidence(x)) < 1e-3 and exact.stderr < 1e-4

    m, s = mean + 0.1, 0.25
    _set_guide(m, s)
    expected = _log_evidence(x) - _kl(m, s**2, mean, var)
    chunked = dataset_elbo(global_model, global_guide, x, num_samples=400, max_examples=7)
    whole = dataset_elbo(global_model, global_guide, x, num_samples=400)
    assert 5 * _kl(m, s**2, 0.0, 1.0) > 20 * chunked.stderr  # what a per-chunk count would add
    for bound in (chunked, whole):
        assert abs(bound.elbo - expected) < 4 * bound.stderr, (bound.elbo, expected, bound.stderr)


class HierarchicalGuide(nn.Module):
    """q(w) = N(m, s^2), q(z_i | w, x_i) = N(w + c x_i, t^2): the local draw reads the global one."""

    def __init__(self, m: float, s: float, c: float, t: float) -> None:
        super().__init__()
        self.m, self.c = nn.Parameter(torch.tensor(m)), nn.Parameter(torch.tensor(c))
        self.log_s, self.log_t = nn.Parameter(torch.tensor(s).log()), nn.Parameter(torch.tensor(t).log())

    def forward(self, x, keep=None):
        w = pyro.sample("w", dist.Normal(self.m, self.log_s.exp()))
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(w + self.c * x, self.log_t.exp()))


def hierarchical_model(x, keep=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)), poutine.mask(mask=True if keep is None else keep):
        z = pyro.sample("z", dist.Normal(w.expand(len(x)), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def _hierarchical_elbo(x: torch.Tensor, keep: torch.Tensor, m: float, s: float, c: float, t: float) -> float:
    """E_q[log p(w) + sum_i log p(z_i | w) + log p(x_i | z_i) - log q], the masked examples left out."""
    x = x[keep].double()
    prior_w = -0.5 * LOG_2PI - 0.5 * (m**2 + s**2) + 0.5 * math.log(2 * math.pi * math.e * s**2)
    entropy_z = 0.5 * math.log(2 * math.pi * math.e * t**2)
    local = -LOG_2PI - 0.5 * (c**2 * x**2 + t**2) - 0.5 * (((1 - c) * x - m) ** 2 + s**2 + t**2) + entropy_z
    return prior_w + local.sum().item()


@pytest.mark.parametrize("form", ["tuple", "dict"])
@pytest.mark.parametrize("max_examples", [None, 6])
def test_a_global_and_a_local_latent_with_masked_examples_give_the_closed_form_elbo(form, max_examples):
    x = _data(25, seed=2)
    keep = torch.arange(25) % 4 != 0  # masked examples add nothing, to log p as to log q
    m, s, c, t = 0.8, 0.3, 0.4, 0.7
    guide = HierarchicalGuide(m, s, c, t)
    data = (x, keep) if form == "tuple" else {"x": x, "keep": keep}
    bound = dataset_elbo(hierarchical_model, guide, data, num_samples=400, max_examples=max_examples)
    expected = _hierarchical_elbo(x, keep, m, s, c, t)
    assert abs(bound.elbo - expected) < 4 * bound.stderr, (bound.elbo, expected, bound.stderr)
    assert abs(_hierarchical_elbo(x, torch.ones(25, dtype=torch.bool), m, s, c, t) - expected) > 20 * bound.stderr  # the mask matters


def local_model(x):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(x.new_zeros(len(x)), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


class LocalGuide(nn.Module):
    def __init__(self, a: float, t: float) -> None:
        super().__init__()
        self.a, self.t = nn.Parameter(torch.tensor(a)), nn.Parameter(torch.tensor(t))

    def forward(self, x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(self.a * x, self.t))


def test_without_global_latents_it_agrees_with_the_per_example_elbo():
    x = _data(30, seed=3)
    a, t = 0.3, 0.9
    xd = x.double()
    entropy_z = 0.5 * math.log(2 * math.pi * math.e * t**2)
    expected = (-LOG_2PI - 0.5 * (a**2 * xd**2 + t**2) - 0.5 * ((1 - a) ** 2 * xd**2 + t**2) + entropy_z).sum().item()
    guide = LocalGuide(a, t)
    bound = dataset_elbo(local_model, guide, x, num_samples=400, max_examples=8)
    assert abs(bound.elbo - expected) < 4 * bound.stderr, (bound.elbo, expected, bound.stderr)
    per_example = evaluate(local_model, guide, x, num_samples=1600, capture=False).elbo.sum().item()
    assert abs(per_example - expected) < 4 * bound.stderr / 2  # 1600 draws: half the standard error of 400


class PointGuide:
    gives_elbo = False

    def __call__(self, x):
        pyro.sample("w", dist.Delta(torch.tensor(0.0)))


def subsampling_model(x):
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x), subsample_size=8) as rows:
        pyro.sample("x", dist.Normal(w, 1.0), obs=x[rows])


@config_enumerate
def enumerated_model(x):
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        y = pyro.sample("y", dist.Bernoulli(0.5))
        pyro.sample("x", dist.Normal(w + y, 1.0), obs=x)


def data_reading_guide(x):  # q(w) read off the examples it is given: differs per chunk
    pyro.sample("w", dist.Normal(x.mean(), 1.0))


def outside_plate_guide(x):  # the per-example z drawn outside the plate: chunks cannot replay it
    pyro.sample("w", dist.Normal(0.0, 1.0))
    pyro.sample("z", dist.Normal(torch.zeros(len(x)), 1.0).to_event(1))


@pytest.mark.parametrize("model, guide, data, options, message", [
    (subsampling_model, global_guide, _data(20), {}, "subsamples its plate"),
    (global_model, PointGuide(), _data(20), {}, "point estimate"),
    (global_model, global_guide, _data(20), {"num_samples": 0}, "at least 1 sample"),
    (global_model, global_guide, torch.empty(0), {}, "empty"),
    (enumerated_model, global_guide, _data(20), {}, "enumeration"),
    (hierarchical_model, global_guide, _data(20), {}, "does not sample the model's latent site"),
    (global_model, data_reading_guide, _data(20), {"max_examples": 5}, "depends on them"),
    (hierarchical_model, outside_plate_guide, _data(20), {"max_examples": 5}, "outside the plate 'data'"),
])
def test_what_has_no_data_set_elbo_is_refused_in_one_line(model, guide, data, options, message):
    with pytest.raises(PyrovaeError, match=message) as error:
        dataset_elbo(model, guide, data, **options)
    assert "\n" not in str(error.value)
    if options.get("max_examples"):
        assert math.isfinite(dataset_elbo(model, guide, data, num_samples=3).elbo)  # one chunk: exact as it stands
