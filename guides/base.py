"""The amortized-guide pattern shared by every recognition model q(z|x).

A guide is built for a model from the model's declared sites (`pyrovae.sites.ModelSites`),
so it works on any Pyro program with a ``"data"`` plate. Subclasses say how one latent site's
distribution is computed from the encoder's features.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae.errors import PyrovaeError
from pyrovae.nets import MLP, activation
from pyrovae.registry import GUIDES
from pyrovae.sites import ModelSites, call_kwargs, data_plate, inspect_model, register

__all__ = ["AmortizedGuide", "build_guide"]


class AmortizedGuide(nn.Module):
    """q(z|x) = prod_sites q(z_s | x): one encoder trunk, one head per latent site.

    Args:
        sites: the model's latent sites and plate nesting.
        data_shape: the event shape of one example.
        hidden: encoder hidden sizes, nearest x first.
        activation: nonlinearity name.
        encoder: ``"mlp"``, or ``"conv"`` for square images.

    References:
        Kingma & Welling (2019), sec. 2.1 (amortized inference) and 2.5 (the encoder).
    """

    latent_shapes: ClassVar[str] = "any event shape"
    gives_elbo: ClassVar[bool] = True
    vector_latents_only: ClassVar[bool] = False

    def __init__(
        self,
        sites: ModelSites,
        data_shape: Sequence[int],
        hidden: Sequence[int] = (200, 200),
        activation: str = "tanh",
        encoder: str = "mlp",
    ) -> None:
        super().__init__()
        self.sites = sites
        self.data_shape = torch.Size(data_shape)
        hidden = list(hidden) or [math.prod(self.data_shape)]
        self.features = hidden[-1]
        if encoder not in ("mlp", "conv"):
            raise PyrovaeError(f"unknown encoder {encoder!r}: choose mlp or conv")
        if encoder == "conv":
            from pyrovae.conv import ConvEncoder

            trunk: nn.Module = ConvEncoder(self.data_shape, hidden[-1])
        else:
            trunk = MLP(math.prod(self.data_shape), hidden[:-1], hidden[-1], activation)
        self.trunk = nn.Sequential(trunk, _act(activation))
        self.heads = nn.ModuleDict(
            {_key(name): self.make_head(name, shape) for name, shape in sites.latents.items()}
        )

    @classmethod
    def supports(cls, model: Callable, sites: ModelSites) -> str | None:
        """Why this guide cannot serve `model`, or None if it can."""
        bad = {k: tuple(v) for k, v in sites.latents.items() if len(v) != 1}
        if cls.vector_latents_only and bad:
            shapes = ", ".join(f"{k}{v}" for k, v in bad.items())
            return f"it needs vector latents (event dim 1), but the model has {shapes}"
        return None

    def make_head(self, name: str, shape: torch.Size) -> nn.Module:
        raise NotImplementedError

    def distribution(self, name: str, features: torch.Tensor) -> dist.Distribution:
        """q(z_name | x) for a batch of encoder features."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x.reshape(len(x), -1))

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None, size: int | None = None, **_: Any) -> None:
        register("guide", self)
        features = self.encode(x)
        with data_plate(x, index, size):
            for name in self.sites.latents:
                pyro.sample(name, self.distribution(name, features))


def _act(name: str) -> nn.Module:
    return activation(name)


def _key(site: str) -> str:
    """ModuleDict keys may not contain dots."""
    return site.replace(".", "_")


def build_guide(name: str, model: Callable, example: torch.Tensor, **options: Any) -> nn.Module:
    """The guide registered as `name`, built for `model` from a batch `example` of its data.

    `hidden`, `activation` and `num_examples` are offered to every guide and passed where
    taken; any other option must be one the guide takes.
    """
    guide_cls = GUIDES.get(name)
    sites = inspect_model(model, example)
    reason = guide_cls.supports(model, sites)
    if reason:
        raise PyrovaeError(f"guide {name!r} cannot serve this model: {reason}")
    data_shape = getattr(model, "data_shape", example.shape[1:])
    common = {k: options.pop(k) for k in ("hidden", "activation", "num_examples") if k in options}
    kwargs = call_kwargs(guide_cls.__init__, model=model, **common, **options)
    refused = [k for k in options if k not in kwargs]
    if refused:
        raise PyrovaeError(f"guide {name!r} does not take the option(s) {', '.join(refused)}")
    try:
        return guide_cls(sites=sites, data_shape=data_shape, **kwargs)
    except TypeError as error:
        raise PyrovaeError(f"guide {name!r}: {error}") from error
