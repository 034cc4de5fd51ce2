"""Quadrant completion (Sohn et al. 2015): the quadrant layout, the `Completion` likelihood
against a hand-computed sum, Sohn's importance-sampled conditional log-likelihood against a
closed form and the bound, the hybrid GSNN term, and the models and Pyro's CVAE example from
the command line."""

import json
import math
from pathlib import Path

import pyro
import pytest
import torch
from test_user_cli import run_cli
from torch.nn.functional import binary_cross_entropy_with_logits

from pyrovae.evaluate import evaluate
from pyrovae.guides import build_guide
from pyrovae.models.conditional import CVAE, Completion, CompletionNet, given_quadrants
from pyrovae.nets import IndependentBernoulli

PROGRAMS = Path(__file__).parent / "programs"


def test_the_given_quadrants_are_laid_out_as_pyros_example():
    quadrant = lambda mask: mask.reshape(4, 4)[::2, ::2].int().tolist()  # noqa: E731  (one pixel per 2x2 quadrant)
    assert quadrant(given_quadrants(16, 1)) == [[0, 0], [1, 0]]  # bottom-left
    assert quadrant(given_quadrants(16, 2)) == [[1, 0], [1, 0]]  # the left half
    assert quadrant(given_quadrants(16, 3)) == [[1, 1], [1, 0]]  # all but the bottom-right
    assert [int(given_quadrants(784, q).sum()) for q in (1, 2, 3)] == [196, 392, 588]


@pytest.mark.parametrize("dim, quadrants", [(63, 1), (9, 1), (64, 0), (64, 4)])
def test_a_layout_that_cannot_be_split_is_refused(dim, quadrants):
    with pytest.raises(Exception, match="square images of even side|quadrants must be 1, 2 or 3"):
        given_quadrants(dim, quadrants)


def test_the_completion_scores_the_missing_values_only_and_keeps_the_given_ones():
    torch.manual_seed(0)
    logits, x = torch.randn(3, 16), torch.bernoulli(torch.full((3, 16), 0.5))
    given = given_quadrants(16, 2)
    d = Completion(IndependentBernoulli(logits), given, x)
    by_hand = -binary_cross_entropy_with_logits(logits[:, ~given], x[:, ~given], reduction="none").sum(-1)
    assert torch.allclose(d.log_prob(x), by_hand)
    flipped = x.clone()
    flipped[0, given.nonzero()[0]] = 1 - flipped[0, given.nonzero()[0]]  # a given pixel that is not the known one
    assert d.log_prob(flipped)[0] == -math.inf and torch.allclose(d.log_prob(flipped)[1:], by_hand[1:])
    assert torch.equal(d.mean[:, given], x[:, given]) and torch.allclose(d.mean[:, ~given], torch.sigmoid(logits[:, ~given]))
    assert torch.equal(d.sample((5,))[..., given], x[:, given].expand(5, 3, -1))
    assert d.expand((2, 3)).log_prob(x).shape == (2, 3)


@torch.no_grad()
def test_the_baselines_likelihood_is_the_cross_entropy_of_the_missing_pixels():
    torch.manual_seed(0)
    net, x = CompletionNet((16,), hidden=(8,), quadrants=1), torch.bernoulli(torch.full((5, 16), 0.3))
    result = evaluate(net, lambda x: None, x, num_samples=3)
    logits = net.decoder(x[:, net.given])
    assert torch.allclose(result.log_likelihood, -binary_cross_entropy_with_logits(logits[:, ~net.given], x[:, ~net.given], reduction="none").sum(-1))


def tiny_cvae(gsnn=0.0):
    pyro.set_rng_seed(0)
    model = CVAE((16,), latent=2, hidden=(8,), quadrants=1, gsnn=gsnn)
    x = torch.bernoulli(torch.full((6, 16), 0.4))
    return model, build_guide("diagonal", model, x, hidden=(8,)), x


@torch.no_grad()
def test_the_importance_sampled_conditional_likelihood_reaches_its_closed_form_from_above_the_bound():
    """With p(x_out | x_in, z) made free of z, log p(x_out | x_in) is the decoder's likelihood at
    any z: IS converges to it as K grows, and the ELBO sits a KL below. (The prior is made
    narrower than the guide, so that the importance weights are bounded.)"""
    model, guide, x = tiny_cvae()
    model.decoder[0].weight[:, model.inputs:] = 0.0  # the columns that read z
    last = model.prior_net[-1]
    last.weight.zero_(), last.bias[:2].zero_(), last.bias[2:].fill_(math.log(math.expm1(0.3)))
    exact = -binary_cross_entropy_with_logits(model.decoder(torch.cat([x[:, model.given], torch.zeros(6, 2)], -1))[:, ~model.given],
                                              x[:, ~model.given], reduction="none").sum(-1)
    estimates = {k: evaluate(model, guide, x, num_samples=k) for k in (1, 20, 20_000)}
    elbo, best = estimates[20_000].elbo, estimates[20_000].log_likelihood
    assert (elbo < exact - 1e-3).all()  # KL(q || p) > 0: the guide is not the prior
    assert torch.allclose(best, exact, atol=0.05) and abs((best - exact).mean()) < 0.01, (best, exact)
    assert estimates[1].log_likelihood.mean() < estimates[20].log_likelihood.mean() < best.mean() + 1e-3


def test_the_hybrid_gsnn_term_is_in_training_only_and_trains_the_prior_network():
    model, guide, x = tiny_cvae(gsnn=1.0)
    trace = pyro.poutine.trace(model).get_trace(x)
    assert "gsnn" in trace.nodes
    trace.log_prob_sum().backward()
    assert model.prior_net[0].weight.grad.abs().sum() > 0
    model.eval()
    assert "gsnn" not in pyro.poutine.trace(model).get_trace(x).nodes
    with pytest.raises(Exception, match="gsnn weight must be >= 0"):
        CVAE((16,), gsnn=-1.0)


def test_the_cvae_and_its_baseline_fit_and_evaluate_from_the_command_line(tmp_path):
    done = run_cli("fit", "--model", "cvae", "--dataset", "digits", "--epochs", "3", "--latent", "4", "--hidden", "32", "--model-option", "quadrants=2",
                   "--model-option", "gsnn=1", "--eval-samples", "20", "--out", str(tmp_path / "cvae"), "--quiet")
    assert done.returncode == 0, done.stderr
    assert "log p(x_out | x_in), IS-20" in done.stdout
    assert (tmp_path / "cvae" / "completions.png").stat().st_size > 0
    done = run_cli("evaluate", str(tmp_path / "cvae"), "--samples", "50", "--json")
    scored = json.loads(done.stdout)
    assert scored["scores"] == "log p(x_out | x_in)" and scored["log_likelihood"] >= scored["elbo"]
    done = run_cli("evaluate", str(tmp_path / "cvae"), "--estimator", "ais", "--ais-steps", "20", "--chains", "2")
    assert done.returncode == 0 and "log p(x_out | x_in), AIS T=20" in done.stdout, done.stderr
    done = run_cli("fit", "--model", "completion-nn", "--guide", "none", "--dataset", "digits", "--epochs", "3", "--hidden", "32",
                   "--model-option", "quadrants=2", "--out", str(tmp_path / "nn"), "--quiet")
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "nn" / "metrics.json").read_text())
    assert metrics["elbo"] == pytest.approx(metrics["log_likelihood"])  # no latent: exact
    done = run_cli("fit", "--model", "cvae", "--dataset", "digits", "--model-option", "quadrants=4", "--out", str(tmp_path / "bad"))
    assert done.returncode == 2 and "quadrants must be 1, 2 or 3" in done.stderr and not (tmp_path / "bad").exists()


def test_pyros_cvae_example_runs_through_the_contract_and_is_scored(tmp_path):
    """Pyro's CVAE observes only the pixels it predicts: it trains and is scored, and the run
    says why it has no sample images instead of failing."""
    script = PROGRAMS / "pyro_cvae.py"
    done = run_cli("fit", "--model", f"{script}:CVAE.model", "--guide", f"{script}:CVAE.guide", "--collate", f"{script}:given_1",
                   "--dataset", "digits", "--model-option", "z_dim=4", "--model-option", "hidden_1=32", "--model-option", "hidden_2=32",
                   "--epochs", "3", "--eval-samples", "10", "--out", str(tmp_path / "peer"), "--quiet")
    assert done.returncode == 0, done.stderr
    assert "no sample or reconstruction plots" in done.stderr
    metrics = json.loads((tmp_path / "peer" / "metrics.json").read_text())
    assert math.isfinite(metrics["log_likelihood"]) and metrics["log_likelihood"] >= metrics["elbo"] - 1e-3
