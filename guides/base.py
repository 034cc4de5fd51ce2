"""The amortized-guide pattern shared by every recognition model q(z|x).

A guide is built for a model from the model's declared sites (`pyrovae.sites.ModelSites`),
so it works on any Pyro program with a ``"data"`` plate. Subclasses say how one latent site's
distribution is computed from the encoder's features.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae.batch import Data, as_batch
from pyrovae.conv import ConvEncoder
from pyrovae.errors import PyrovaeError
from pyrovae.nets import MLP, activation
from pyrovae.protocols import model_traits
from pyrovae.registry import GUIDES
from pyrovae.sites import ModelSites, call_kwargs, inspect_model, primary, register

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
            trunk: nn.Module = ConvEncoder(self.data_shape, hidden[-1])
        else:
            trunk = MLP(math.prod(self.data_shape), hidden[:-1], hidden[-1], activation)
        self.trunk = nn.Sequential(trunk, _act(activation))
        self.heads = nn.ModuleDict(
            {_key(name): self.make_head(name, sites.real_shape(name)) for name in sites.latents}
        )

    @classmethod
    def supports(cls, model: Callable, sites: ModelSites) -> str | None:
        """Why this guide cannot serve `model`, or None if it can: it serves real-valued sites, and
        constrained continuous ones (positive, unit interval, simplex) through `biject_to`, in the
        per-example plate: a global latent it would leave unsampled."""
        if sites.global_latents:
            names = ", ".join(map(repr, sites.global_latents))
            return (f"it is amortized over examples, but {names} are global (outside the per-example plate): sample them in a guide "
                    "of your own (a Pyro autoguide serves them), or train with --method local")
        discrete = sites.unservable()
        if discrete:
            what = ", ".join(f"{k!r} is {v}" for k, v in discrete.items())
            return f"it serves continuous latents, but {what}: sample it in a guide of your own, or enumerate it (--objective elbo-enum)"
        bad = {k: tuple(sites.real_shape(k)) for k in sites.latents if len(sites.real_shape(k)) != 1}
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
        x = x if x.is_floating_point() else x.float()  # counts and categories are data too
        return self.trunk(x.reshape(len(x), -1))

    def forward(self, *args: Any, index: torch.Tensor | None = None, size: int | None = None, **kwargs: Any) -> None:
        """Takes the model's arguments; encodes the first data tensor among them."""
        register("guide", self)
        x = primary(args, kwargs)
        features = self.encode(x)
        features = features.reshape(self.sites.example_shape(len(x)) + features.shape[-1:])
        with self.sites.plate_for(x, index, size):
            for name in self.sites.latents:
                pyro.sample(name, self.sites.constrain(name, self.distribution(name, features)))


def _act(name: str) -> nn.Module:
    return activation(name)


def _key(site: str) -> str:
    """ModuleDict keys may not contain dots."""
    return site.replace(".", "_")


def build_guide(name: str, model: Callable, example: Data, plate: str | None = None, **options: Any) -> nn.Module:
    """The guide registered as `name`, built for `model` from a batch `example` of its data.

    `hidden`, `activation` and `num_examples` are offered to every guide and passed where
    taken; any other option must be one the guide takes.
    """
    guide_cls = GUIDES.get(name)
    batch = as_batch(example)
    sites = inspect_model(model, batch, plate=plate)
    sites.refuse_subsampled(f"guide {name!r}")
    reason = guide_cls.supports(model, sites)
    if reason:
        raise PyrovaeError(f"guide {name!r} cannot serve this model: {reason}")
    data_shape = model_traits(model).data_shape or batch.primary.shape[1:]
    common = {k: options.pop(k) for k in ("hidden", "activation", "num_examples") if k in options}
    kwargs = call_kwargs(guide_cls.__init__, model=model, **common, **options)
    refused = [k for k in options if k not in kwargs]
    if refused:
        raise PyrovaeError(f"guide {name!r} does not take the option(s) {', '.join(refused)}")
    try:
        return guide_cls(sites=sites, data_shape=data_shape, **kwargs)
    except TypeError as error:
        raise PyrovaeError(f"guide {name!r}: {error}") from error
