"""The factorized Gaussian posterior q(z|x) = N(mu(x), diag sigma(x)^2) (sec. 2.5)."""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn.functional import softplus

from pyrovae.guides.base import AmortizedGuide, _key
from pyrovae.registry import GUIDES

__all__ = ["DiagonalGaussian"]


@GUIDES.register("diagonal", "factorized Gaussian N(mu(x), diag sigma(x)^2), the VAE encoder of sec. 2.5")
class DiagonalGaussian(AmortizedGuide):
    """An MLP encoder emitting a mean and a positive scale (softplus) per latent dimension.

    References:
        Kingma & Welling (2019), sec. 2.5 (factorized Gaussian posteriors).
    """

    min_scale = 1e-4

    def make_head(self, name: str, shape: torch.Size) -> nn.Module:
        return nn.Linear(self.features, 2 * math.prod(shape))

    def distribution(self, name: str, features: torch.Tensor) -> dist.Distribution:
        shape = self.sites.real_shape(name)
        loc, raw_scale = self.heads[_key(name)](features).chunk(2, dim=-1)
        scale = softplus(raw_scale) + self.min_scale
        batch = features.shape[:-1]
        return dist.Normal(loc.reshape(batch + shape), scale.reshape(batch + shape)).to_event(len(shape))
