"""The semi-amortized VAE (Kim et al. 2018): the encoder's gradient runs back through the refinement."""

import pyro
import pytest
import torch

from pyrovae.errors import PyrovaeError
from pyrovae.guides import build_guide
from pyrovae.infer import LocalVI, TrainSettings
from pyrovae.models import LinearGaussian


def _setup():
    torch.manual_seed(0)
    model = LinearGaussian((3,), latent=1, noise=0.5)
    x = model.marginal().sample((5,)).detach()
    guide = build_guide("diagonal", model, x, hidden=(4,))
    return model, guide, x


def test_the_encoder_gradient_matches_finite_differences_of_the_unrolled_refinement():
    """With Adam's rate 0 a step only reports the refined bound and leaves its gradient: that
    gradient must be the derivative of the reported loss, refinement steps included. Detaching
    the refinement (no create_graph) leaves out the encoder's path through them and fails this."""
    model, guide, x = _setup()
    method = LocalVI(model, guide, TrainSettings(lr=0.0, batch_size=5), 5, semi_amortized_steps=3, backprop_refinement=True, local_lr=0.05)
    index = torch.arange(5)
    param = next(p for p in guide.parameters() if p.dim() == 2)  # the encoder's first layer

    def loss(seed: int = 0) -> float:
        pyro.set_rng_seed(seed)
        return method.step(x, index)

    loss()
    gradient = param.grad[0, 0].item()
    eps = 1e-2
    with torch.no_grad():
        param[0, 0] += eps
    up = loss()
    with torch.no_grad():
        param[0, 0] -= 2 * eps
    down = loss()
    assert abs((up - down) / (2 * eps) - gradient) < 0.05 * abs(gradient) + 1e-4, ((up - down) / (2 * eps), gradient)
    assert abs(gradient) > 1e-3


def test_it_trains_probabilistic_pca_to_the_maximum_likelihood():
    torch.manual_seed(0)
    x = LinearGaussian((8,), latent=2, noise=0.5).marginal().sample((200,)).detach()
    centred = x - x.mean(0)
    values, vectors = torch.linalg.eigh(centred.T @ centred / len(x))
    noise = values[:6].mean()
    top = vectors[:, -2:] @ torch.diag((values[-2:] - noise).sqrt())
    best = torch.distributions.MultivariateNormal(x.mean(0), top @ top.T + noise * torch.eye(8)).log_prob(x).mean().item()
    torch.manual_seed(1)
    model = LinearGaussian((8,), latent=2, noise=1.0)
    guide = build_guide("diagonal", model, x, hidden=(32,))
    method = LocalVI(model, guide, TrainSettings(lr=1e-2, batch_size=100), 200, semi_amortized_steps=2, backprop_refinement=True)
    generator = torch.Generator().manual_seed(0)
    for _ in range(75):
        for index in torch.randperm(200, generator=generator).split(100):
            method.step(x[index], index)
    with torch.no_grad():
        assert best - model.log_marginal(x).mean().item() < 0.5


def test_backprop_refinement_needs_refinement_steps():
    model, guide, _ = _setup()
    with pytest.raises(PyrovaeError, match="semi_amortized_steps"):
        LocalVI(model, guide, TrainSettings(), 5, backprop_refinement=True)
