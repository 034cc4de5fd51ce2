"""Probabilistic PCA: the linear-Gaussian model, whose marginal and posterior are exact.

x = W z + b + eps with z ~ N(0, I_L) and eps ~ N(0, sigma^2 I_D), so
p(x) = N(b, W W^T + sigma^2 I) and p(z|x) = N(M^-1 W^T (x - b), sigma^2 M^-1) with
M = W^T W + sigma^2 I (Tipping & Bishop 1999). The closed-form reference for tests of the
ELBO, the IWAE bound and the importance-sampled log p(x) (Kingma & Welling 2019, sec. 2.7).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae.registry import MODELS
from pyrovae.sites import data_plate, register

__all__ = ["LinearGaussian"]


@MODELS.register("linear-gaussian", "probabilistic PCA: exact log p(x) and p(z|x), the closed-form reference")
class LinearGaussian(nn.Module):
    """x = W z + b + eps, z ~ N(0, I), eps ~ N(0, sigma^2 I)."""

    def __init__(self, data_shape: Sequence[int], latent: int = 2, noise: float = 0.5) -> None:
        super().__init__()
        self.data_shape = torch.Size(data_shape)
        dim = math.prod(self.data_shape)
        self.latent = latent
        self.weight = nn.Parameter(torch.randn(dim, latent) / math.sqrt(latent))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.log_noise = nn.Parameter(torch.tensor(math.log(noise)))

    @property
    def noise(self) -> torch.Tensor:
        return self.log_noise.exp()

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None, size: int | None = None) -> None:
        register("linear_gaussian", self)
        with data_plate(x, index, size):
            z = pyro.sample("z", dist.Normal(self.bias.new_zeros(()), 1.0).expand([len(x), self.latent]).to_event(1))
            loc = z @ self.weight.T + self.bias
            pyro.sample("x", dist.Normal(loc, self.noise).to_event(1), obs=x.reshape(len(x), -1))

    def marginal(self) -> dist.MultivariateNormal:
        """p(x) = N(b, W W^T + sigma^2 I)."""
        dim = len(self.bias)
        cov = self.weight @ self.weight.T + self.noise**2 * torch.eye(dim)
        return dist.MultivariateNormal(self.bias, covariance_matrix=cov)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) per example."""
        return self.marginal().log_prob(x.reshape(len(x), -1))

    def posterior(self, x: torch.Tensor) -> dist.MultivariateNormal:
        """Exact p(z|x) = N(M^-1 W^T (x - b), sigma^2 M^-1), M = W^T W + sigma^2 I."""
        precision_factor = self.weight.T @ self.weight + self.noise**2 * torch.eye(self.latent)
        cov = self.noise**2 * torch.linalg.inv(precision_factor)
        mean = (x.reshape(len(x), -1) - self.bias) @ self.weight @ torch.linalg.inv(precision_factor).T
        return dist.MultivariateNormal(mean, covariance_matrix=cov)
