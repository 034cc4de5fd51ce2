"""Programs written like Pyro's ss_vae_M2, ``model(xs, ys=None)``: labelled examples are called
with their labels and unlabelled ones without (`Batch.omit`, ``--unlabelled omit``), and every
score is checked against a closed form: a mixture of Gaussians with a Gaussian latent, whose
guide is the exact posterior, so the ELBO is log p(x, y) on a labelled example and log p(x) on
an unlabelled one."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyrovae.batch import UNLABELLED, Batch
from pyrovae.dataset_bound import dataset_elbo
from pyrovae.diagnostics import kl_per_site
from pyrovae.errors import PyrovaeError
from pyrovae.evaluate import evaluate
from pyrovae.infer import AmortizedVI, TrainSettings
from pyrovae.registry import METHODS
from pyrovae.sites import inspect_model

D, K, NOISE = 3, 4, 0.5


class Mixture(nn.Module):
    """y ~ Cat(pi), z ~ N(0, I), x ~ N(mu_y + z, NOISE^2 I); the guide is the exact posterior:
    q(y|x) = p(y|x) where no label is given, q(z|x,y) = p(z|x,y)."""

    def __init__(self) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.randn(K))
        self.means = nn.Parameter(3 * torch.randn(K, D))

    def model(self, xs: torch.Tensor, ys: torch.Tensor | None = None) -> None:
        pyro.module("mixture", self)
        with pyro.plate("data"):
            ys = pyro.sample("y", dist.Categorical(logits=self.logits.expand(len(xs), K)), obs=ys)
            zs = pyro.sample("z", dist.Normal(xs.new_zeros(len(xs), D), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.means[ys] + zs, NOISE).to_event(1), obs=xs)

    def guide(self, xs: torch.Tensor, ys: torch.Tensor | None = None) -> None:
        with pyro.plate("data"):
            if ys is None:
                ys = pyro.sample("y", dist.Categorical(logits=self.posterior_logits(xs)), infer={"enumerate": "parallel"})
            precision = 1 + NOISE**-2
            loc = (xs - self.means[ys]) * NOISE**-2 / precision
            pyro.sample("z", dist.Normal(loc, precision**-0.5).to_event(1))

    def joint(self, xs: torch.Tensor) -> torch.Tensor:
        """log p(x, y) for every y, (B, K): x | y ~ N(mu_y, (1 + NOISE^2) I)."""
        marginal = dist.Normal(self.means, (1 + NOISE**2) ** 0.5).to_event(1)
        return self.logits.log_softmax(-1) + marginal.log_prob(xs.unsqueeze(-2))

    def posterior_logits(self, xs: torch.Tensor) -> torch.Tensor:
        return self.joint(xs)

    def exact(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """log p(x, y) where y is given, log p(x) where it is UNLABELLED."""
        joint = self.joint(xs)
        return torch.where(ys == UNLABELLED, joint.logsumexp(-1), joint.gather(-1, ys.clamp(min=0).unsqueeze(-1)).squeeze(-1))


def _data(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs = 3 * torch.randn(n, D, generator=g)
    ys = torch.randint(0, K, (n,), generator=g)
    ys[torch.tensor([1, 2, 5, 6, 7, 10])] = UNLABELLED  # interleaved, so that a wrong order of the scores shows
    return xs, ys


@pytest.fixture(autouse=True)
def _clean_store():
    pyro.clear_param_store()
    torch.manual_seed(0)
    yield
    pyro.clear_param_store()


def test_groups_call_labelled_examples_with_labels_and_unlabelled_ones_without():
    xs, ys = _data()
    batch = Batch((xs, ys), omit=1)
    (labelled_rows, labelled), (unlabelled_rows, unlabelled) = batch.groups()
    assert (ys[labelled_rows] >= 0).all() and (ys[unlabelled_rows] == UNLABELLED).all()
    assert labelled.args[1].tolist() == ys[labelled_rows].tolist() and len(unlabelled.args) == 1
    assert torch.equal(unlabelled.args[0], xs[unlabelled_rows])
    with pytest.raises(PyrovaeError, match="mixes labelled and unlabelled"):
        batch.call_args()  # one call of a mixed batch would pass -1 as a label
    assert len(batch[unlabelled_rows].call_args()[0]) == 1 and len(batch[labelled_rows].call_args()[0]) == 2
    keyword = Batch((xs,), {"ys": ys}, omit="ys")
    args, kwargs = keyword.groups()[1][1].call_args()
    assert len(args) == 1 and torch.equal(args[0], xs[unlabelled_rows]) and kwargs == {}
    with pytest.raises(PyrovaeError, match="last positional argument"):
        Batch((xs, ys, xs), omit=1)
    with pytest.raises(PyrovaeError, match="one integer per example"):
        Batch((xs, ys.float()), omit=1)


def test_sites_of_both_calls_are_read_the_label_a_latent():
    xs, ys = _data()
    sites = inspect_model(Mixture().model, Batch((xs, ys), omit=1))
    assert set(sites.latents) == {"y", "z"} and sites.observed == ("x",) and sites.discrete == ("y",)
    assert set(inspect_model(Mixture().model, Batch((xs[ys >= 0], ys[ys >= 0]), omit=1)).latents) == {"z"}


def test_evaluation_is_exact_per_example_in_the_batchs_order():
    xs, ys = _data()
    mixture = Mixture()
    scores = evaluate(mixture.model, mixture.guide, Batch((xs, ys), omit=1), num_samples=7)
    exact = mixture.exact(xs, ys).detach()
    assert torch.allclose(scores.log_likelihood, exact, atol=1e-4) and torch.allclose(scores.elbo, exact, atol=1e-4)
    chunked = evaluate(mixture.model, mixture.guide, [Batch((xs[:5], ys[:5]), omit=1), Batch((xs[5:], ys[5:]), omit=1)], num_samples=3)
    assert torch.allclose(chunked.log_likelihood, exact, atol=1e-4)


def test_the_training_loss_is_the_minibatchs_exact_bound_scaled_to_the_data_set():
    xs, ys = _data()
    mixture = Mixture()
    method = AmortizedVI(mixture.model, mixture.guide, TrainSettings(objective="elbo-enum", batch_size=7), num_examples=len(xs))
    exact = mixture.exact(xs, ys).detach()
    index = torch.tensor([0, 1, 2, 3, 4, 5, 6])  # labelled 0, 3, 4 and unlabelled 1, 2, 5, 6: calls of unequal shares
    batch = Batch((xs[index], ys[index]), omit=1)
    method.prepare(batch)
    assert math.isclose(method.loss(batch, index).item(), -exact[index].mean().item(), rel_tol=1e-5)
    weights = torch.tensor([1.0, 3.0, 3.0, 1.0, 1.0, 3.0, 3.0])  # stratified minibatches weigh each group apart
    assert math.isclose(method.loss(batch, index, weights=weights).item(), -(weights * exact[index]).mean().item(), rel_tol=1e-5)
    assert math.isclose(method.loss(batch).item(), -exact[index].mean().item(), rel_tol=1e-5)  # no index: the minibatch alone
    before = [p.detach().clone() for p in mixture.parameters()]
    method.step(batch, index)
    assert all(not torch.equal(a, b) for a, b in zip(before, mixture.parameters()))  # both calls reach every parameter


def test_the_data_sets_bound_and_the_kl_cover_both_calls():
    xs, ys = _data()
    mixture = Mixture()
    batch = Batch((xs, ys), omit=1)
    assert math.isclose(dataset_elbo(mixture.model, mixture.guide, batch, num_samples=2, max_examples=4).elbo, mixture.exact(xs, ys).sum().item(), rel_tol=1e-5)
    kl = kl_per_site(mixture.model, mixture.guide, batch)
    assert set(kl) == {"y", "z"} and kl["z"] > 0


@pytest.mark.parametrize("method", ["local", "map", "mcmc-em", "wake-sleep"])
def test_methods_that_call_the_program_once_refuse(method):
    xs, ys = _data()
    mixture = Mixture()
    labelled = Batch((xs[ys >= 0], ys[ys >= 0]))
    built = METHODS.get(method)(mixture.model, mixture.guide, TrainSettings(), num_examples=len(xs), sites=inspect_model(mixture.model, labelled))
    with pytest.raises(PyrovaeError, match="cannot leave the labels out"):
        built.prepare(Batch((xs, ys), omit=1))
