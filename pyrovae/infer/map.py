"""MAP estimation of per-example latents jointly with the decoder (Kingma & Welling 2019, A.2.1).

z_i are parameters; every minibatch step ascends log p(x_i, z_i) = log p(x_i | z_i) + log p(z_i)
in the z_i of the batch and in the decoder. It is local VI whose q_i is a point mass: the
ELBO of a Delta guide is exactly log p(x, z), so the step is `LocalVI`'s with
``covariance="point"``. `log_joint` (log p(x_i, z_i) per example, differentiable in z and the
model) is also the potential of MCMC-EM's HMC chains and its M-step objective.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
import torch

from pyrovae.batch import Data, as_batch
from pyrovae.errors import PyrovaeError
from pyrovae.guides.local import flatten, unflatten
from pyrovae.importance import log_weights
from pyrovae.infer.base import TrainSettings
from pyrovae.infer.local import LocalVI, fit_local
from pyrovae.registry import METHODS
from pyrovae.sites import ModelSites, primary

__all__ = ["MAP", "fit_map", "log_joint"]


def log_joint(model: Callable, sites: ModelSites, z: torch.Tensor, x: Data, **kwargs: Any) -> torch.Tensor:
    """log p(x_i, z_i) per example (B,), for flat latents z (B, D); differentiable in z and the model.

    A point-mass guide at z is weighed by `pyrovae.importance.log_weights` (log q = 0), which
    takes the data plate's subsample scale out and works for any program with a data plate.

    Args:
        sites: the model's latent sites; z holds them flattened in this order
            (`pyrovae.guides.local.flatten`).
        kwargs: the model's minibatch arguments (index/size), if it takes them.
    """
    values = unflatten(z, sites)

    def point(*args: Any, index: torch.Tensor | None = None, size: int | None = None, **rest: Any) -> None:
        with sites.plate_for(primary(args, rest), index, size):
            for name, shape in sites.latents.items():
                value = values[name].reshape(sites.example_shape(len(values[name])) + shape)
                pyro.sample(name, dist.Delta(value, event_dim=len(shape)))

    args, call_kwargs = as_batch(x).call_args()
    return log_weights(model, point, 1, sites.max_plate_nesting, *args, plate_name=sites.plate, **call_kwargs, **kwargs).values[0]


def fit_map(model: Callable, x: Data, sites: ModelSites, steps: int = 200, lr: float = 0.05) -> dict[str, torch.Tensor]:
    """Per-example MAP latents argmax_z log p(x_i, z) of a batch, decoder frozen.

    What the MAP method would assign to held-out examples; e.g. reconstructions of new data.
    """
    points = fit_local(model, x, sites, steps, lr, covariance="point")
    with torch.no_grad():
        batch = as_batch(x)
        return points.means(torch.arange(len(batch), device=batch.device))


@METHODS.register("map", "per-example point estimates z_i maximizing log p(x_i, z_i), with the decoder (appendix A.2.1)")
class MAP(LocalVI):
    """Joint maximization of sum_i log p(x_i, z_i) over the decoder and the points z_i.

    The loss is minus log p(x, z) in nats per example: not a bound on log p(x) (a point has no
    entropy), so `gives_elbo` is False; score the decoder with `pyrovae.compare`. The prior
    term log p(z_i) keeps the codes from growing while the decoder shrinks its weights.

    Options:
        local_lr: Adam (lazy, per row) learning rate of the z_i (default 1e-2).
        objective: forced to the plain ELBO (the others need a density, a point has none).

    References:
        Kingma & Welling (2019), appendix A.2.1 (MAP estimation of the latents).
    """

    name = "map"
    gives_elbo = False
    own_objectives = True
    covariance_default = "point"

    def __init__(self, model: Callable, guide: Callable, settings: TrainSettings, num_examples: int, *, local_lr: float = 1e-2,
                 sites: ModelSites | None = None) -> None:
        self.refuse_objective(settings)
        settings = dataclasses.replace(settings, objective="elbo", particles=1)
        super().__init__(model, guide, settings, num_examples, covariance="point", local_lr=local_lr, sites=sites)

    def check_sites(self, sites: ModelSites) -> None:
        """A point's density depends on the parameterization: MAP keeps to real-valued latents."""
        super().check_sites(sites)
        constrained = sites.unservable(discrete=False, constrained=True)
        if constrained:
            raise PyrovaeError(
                f"MAP of {', '.join(map(repr, constrained))} ({', '.join(constrained.values())}) would depend on how the "
                "support is mapped to the reals: use --method local or amortized"
            )

    def points(self, index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The current MAP latents {site: (B, *shape)} of training examples `index` (all if None)."""
        rows = index if index is not None else torch.arange(self.num_examples)
        with torch.no_grad():
            return self.local.means(rows.to(self.local.loc[next(iter(self.local.loc))].weight.device))

    def log_joint(self, x: Data, index: torch.Tensor) -> torch.Tensor:
        """log p(x_i, z_i) at the current points of training examples `index` (rows of `x`)."""
        kwargs, _ = self.minibatch_kwargs(x, index)
        sites = self.local.sites
        return log_joint(self.model, sites, flatten(self.points(index), sites), x, **kwargs)

