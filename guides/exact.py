"""The exact posterior of a model that has one in closed form (the linear-Gaussian model)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import pyro
import torch
from torch import nn

from pyrovae.registry import GUIDES
from pyrovae.sites import ModelSites, primary

__all__ = ["ExactPosterior"]


@GUIDES.register("exact", "the exact posterior p(z|x), for models that know it (linear-gaussian)")
class ExactPosterior(nn.Module):
    """q(z|x) = p(z|x) computed by the model's `posterior(x)`: the ELBO then equals log p(x).

    References:
        Kingma & Welling (2019), sec. 2.2: log p(x) - ELBO = KL(q(z|x) || p(z|x)).
    """

    latent_shapes: ClassVar[str] = "the model's own"
    gives_elbo: ClassVar[bool] = True

    def __init__(self, sites: ModelSites, data_shape: Sequence[int], model: Callable) -> None:
        super().__init__()
        self.sites = sites
        self.posterior = model.posterior  # the model's parameters, not copies
        (self.site,) = sites.latents

    @classmethod
    def supports(cls, model: Callable, sites: ModelSites) -> str | None:
        if not callable(getattr(model, "posterior", None)):
            return "the model has no closed-form posterior(x)"
        if len(sites.latents) != 1:
            return "it needs exactly one latent site"
        return None

    def forward(self, *args: Any, index: torch.Tensor | None = None, size: int | None = None, **kwargs: Any) -> None:
        x = primary(args, kwargs)
        with self.sites.plate_for(x, index, size):
            pyro.sample(self.site, self.posterior(x))
