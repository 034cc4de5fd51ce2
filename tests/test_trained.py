"""A trained run from Python (`pyrovae.load`): each operation against the closed forms of pPCA."""

import pytest
import torch

import pyrovae
from pyrovae.ais import AISSettings
from pyrovae.experiment import Config, fit


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    quiet = {"progress": False, "log": lambda s: None}
    base = dict(model="linear-gaussian", dataset="digits", latent=2, epochs=2, eval_samples=0, seed=0)
    fit(Config(guide="exact", **base), out=root / "exact", **quiet)
    fit(Config(guide="diagonal", method="map", hidden=(8,), **base), out=root / "map", **quiet)
    return root


def test_a_run_loads_in_one_line_and_each_operation_matches_the_closed_form(runs):
    run = pyrovae.load(runs / "exact")
    model = run.model
    x = run.data("valid", 6)
    z = run.encode(x)
    assert torch.allclose(z, model.posterior(x).mean, atol=1e-5)  # the exact guide's mean is the posterior mean
    assert torch.allclose(run.decode(z), z @ model.weight.T + model.bias, atol=1e-5)  # p(x | z) = N(W z + b, sigma^2)
    path = run.interpolate(x[0], x[1], steps=5)
    ends = run.decode(z[:2])
    assert path.shape == (5, *x.shape[1:]) and torch.allclose(path[0], ends[0], atol=1e-5) and torch.allclose(path[-1], ends[1], atol=1e-5)
    assert torch.allclose(path[2], ends.mean(0), atol=1e-5)  # a linear decoder: the midpoint of the decodes
    assert torch.allclose(run.log_likelihood(x, samples=10), model.log_marginal(x), atol=1e-3)  # exact weights
    annealed = run.log_likelihood(x, estimator="ais", settings=AISSettings(steps=300, chains=8, leapfrog=5, warmup=30))
    assert abs((annealed - model.log_marginal(x)).mean()) < 0.5  # AIS's own accuracy is tests/test_ais.py's
    assert run.sample(7).shape == (7, 64) and run.reconstruct(x).shape == x.shape
    assert "linear-gaussian" in repr(run)


def test_a_run_without_a_guide_is_scored_by_ais_and_refuses_what_needs_one(runs):
    run = pyrovae.load(runs / "map")
    x = run.data("valid", 4)
    with pytest.raises(pyrovae.PyrovaeError, match="needs an amortized guide") as error:
        run.encode(x)
    assert "\n" not in str(error.value)
    annealed = run.log_likelihood(x, estimator="ais", settings=AISSettings(steps=300, chains=8, leapfrog=5, warmup=30))
    assert abs((annealed - run.model.log_marginal(x)).mean()) < 0.5
    with pytest.raises(pyrovae.PyrovaeError, match="at least 2 steps"):
        pyrovae.load(runs / "exact").interpolate(x[0], x[1], steps=1)
