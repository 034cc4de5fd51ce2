"""The amortized point estimate z = f(x): the autoencoder / MAP limit of a guide."""

from __future__ import annotations

import math
from typing import ClassVar

import pyro.distributions as dist
import torch
from torch import nn

from pyrovae.guides.base import AmortizedGuide, _key
from pyrovae.registry import GUIDES

__all__ = ["DeltaGuide"]


@GUIDES.register("delta", "amortized point estimate z = f(x) (Delta); no valid ELBO or likelihood")
class DeltaGuide(AmortizedGuide):
    """q(z|x) = Delta(z - f(x)): an encoder emitting one point per example.

    This gives NO valid ELBO and NO likelihood estimate: a Delta has no entropy (its
    log-density 0 is w.r.t. counting measure, not Lebesgue), so "ELBO" training maximizes
    log p(x|f(x)) + log p(f(x)), i.e. amortized MAP / a regularized deterministic
    autoencoder, and importance weights p(x, z) / q(z|x) do not estimate p(x). Use it for
    point estimates, not for scoring.

    References:
        Kingma & Welling (2019), sec. 2.2 (the ELBO's entropy term, which a point mass lacks)
        and sec. 2.5 (the encoder); Vincent et al. (2008) for the deterministic autoencoder.
    """

    latent_shapes: ClassVar[str] = "any event shape"
    gives_elbo: ClassVar[bool] = False

    def make_head(self, name: str, shape: torch.Size) -> nn.Module:
        return nn.Linear(self.features, math.prod(shape))

    def distribution(self, name: str, features: torch.Tensor) -> dist.Distribution:
        shape = self.sites.real_shape(name)
        value = self.heads[_key(name)](features)
        return dist.Delta(value.reshape(features.shape[:-1] + shape), event_dim=len(shape))
