"""The guide of M2 (Kingma et al. 2014): q(y|x) q(z|x,y), with y proposed exactly where it is
known and summed over where it is not (`pyrovae.models.semi_supervised`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn.functional import one_hot, softplus

from pyrovae.nets import MLP, broadcast_cat
from pyrovae.registry import GUIDES
from pyrovae.sites import ModelSites, register

__all__ = ["ADGMGuide", "M2Guide"]


@GUIDES.register("m2", "M2's q(y|x) q(z|x,y): the label where given, else the model's classifier, enumerated (Kingma et al. 2014)")
class M2Guide(nn.Module):
    """q(y|x) is a point mass on the label of a labelled example and the model's classifier on an
    unlabelled one; y is enumerated in parallel (`elbo-enum` sums it exactly); q(z|x,y) is a
    diagonal Gaussian from an MLP of [x, onehot(y)].

    References:
        Kingma, Rezende, Mohamed & Welling (2014), sec. 3.1.2, eq. 7-8.
    """

    latent_shapes: ClassVar[str] = "M2's z and y"
    gives_elbo: ClassVar[bool] = True
    min_scale = 1e-4

    def __init__(self, sites: ModelSites, data_shape: Sequence[int], model: Any, hidden: Sequence[int] = (500,), activation: str = "softplus") -> None:
        super().__init__()
        self.sites, self.classes, self.latent = sites, model.classes, model.latent
        self.classify = model.classify  # the model's classifier, not a copy: it trains with the model
        self.encoder = MLP(math.prod(data_shape) + model.classes, list(hidden), 2 * model.latent, activation)

    @classmethod
    def supports(cls, model: Callable, sites: ModelSites) -> str | None:
        if callable(getattr(model, "classify", None)) and hasattr(model, "classes") and {"y", "z"} <= set(sites.latents):
            return None
        return "it is the guide of M2-like models (a classify(x) method, sites y and z): --model m2"

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None, size: int | None = None) -> None:
        register("m2_guide", self)
        with self.sites.plate_for(x, index, size):
            known = one_hot(y.clamp(min=0), self.classes).to(x.dtype)
            probs = torch.where((y >= 0).unsqueeze(-1), known, self.classify(x).probs)
            label = pyro.sample("y", dist.Categorical(probs), infer={"enumerate": "parallel"})
            loc, raw = self.encoder(broadcast_cat(x.reshape(len(x), -1).float(), one_hot(label, self.classes).to(x.dtype))).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, softplus(raw) + self.min_scale).to_event(1))


@GUIDES.register("adgm", "ADGM's q(a|x) q(y|a,x) q(z|a,y,x): a drawn first, y the label or enumerated (Maaloe et al. 2016)")
class ADGMGuide(nn.Module):
    """a ~ q(a|x) (the model's), y a point mass on the label where given and the model's
    q(y|a,x) where not, enumerated in parallel, z ~ q(z|a,y,x) a diagonal Gaussian from an MLP
    of [x, a, onehot(y)].

    References:
        Maaloe, Sonderby, Sonderby & Winther (2016), sec. 3, eq. 9-10.
    """

    latent_shapes: ClassVar[str] = "ADGM's a, y and z"
    gives_elbo: ClassVar[bool] = True
    min_scale = 1e-4

    def __init__(self, sites: ModelSites, data_shape: Sequence[int], model: Any, hidden: Sequence[int] = (500, 500), activation: str = "relu") -> None:
        super().__init__()
        self.sites, self.classes, self.latent = sites, model.classes, model.latent
        self.auxiliary_posterior, self.classify_given = model.auxiliary_posterior, model.classify_given  # the model's: they train with it
        self.encoder = MLP(math.prod(data_shape) + model.auxiliary + model.classes, list(hidden), 2 * model.latent, activation)

    @classmethod
    def supports(cls, model: Callable, sites: ModelSites) -> str | None:
        if callable(getattr(model, "classify_given", None)) and hasattr(model, "classes") and {"a", "y", "z"} <= set(sites.latents):
            return None
        return "it is the guide of ADGM-like models (classify_given(x, a), auxiliary_posterior(x), sites a, y and z): --model adgm"

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None, size: int | None = None) -> None:
        register("adgm_guide", self)
        flat = x.reshape(len(x), -1).float()
        with self.sites.plate_for(x, index, size):
            a = pyro.sample("a", self.auxiliary_posterior(x))
            known = one_hot(y.clamp(min=0), self.classes).to(flat.dtype)
            probs = torch.where((y >= 0).unsqueeze(-1), known, self.classify_given(x, a).probs)
            label = pyro.sample("y", dist.Categorical(probs), infer={"enumerate": "parallel"})
            loc, raw = self.encoder(broadcast_cat(flat, a, one_hot(label, self.classes).to(flat.dtype))).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, softplus(raw) + self.min_scale).to_event(1))
