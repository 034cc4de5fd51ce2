"""Training objectives: the ELBO (sec. 2.2), its analytic-KL form, and the IWAE bound.

Every objective offers ``differentiable_loss(model, guide, *args, **kwargs)``: a scalar
estimate of minus the bound for the whole data set (minibatches scaled up exactly).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import pyro.infer
import torch

from pyrovae.errors import PyrovaeError
from pyrovae.importance import log_weights
from pyrovae.registry import OBJECTIVES

__all__ = ["IWAE", "make_objective"]


class IWAE:
    """The importance-weighted bound of Burda et al. (2016), per example, with K samples.

    log p(x) >= E[log (1/K) sum_k p(x, z_k) / q(z_k|x)]; equals the ELBO at K = 1 and tightens
    with K (Kingma & Welling 2019, sec. 2.7). Gradients are pathwise, so every guide site must
    be reparameterizable.
    """

    def __init__(self, num_particles: int = 5, max_plate_nesting: int = 1) -> None:
        self.num_particles = num_particles
        self.max_plate_nesting = max_plate_nesting

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        weights = log_weights(model, guide, self.num_particles, self.max_plate_nesting, *args, **kwargs)
        bound = torch.logsumexp(weights.values, 0) - math.log(self.num_particles)
        return -weights.data_scale * bound.sum()

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()


def _elbo(cls: type) -> Callable[..., Any]:
    def make(num_particles: int = 1, max_plate_nesting: int = 1) -> Any:
        return cls(
            num_particles=num_particles,
            vectorize_particles=num_particles > 1,
            max_plate_nesting=max_plate_nesting,
        )

    return make


OBJECTIVES.register("elbo", "Trace_ELBO: Monte Carlo ELBO with reparameterized samples (sec. 2.3)")(
    _elbo(pyro.infer.Trace_ELBO)
)
OBJECTIVES.register("elbo-analytic", "TraceMeanField_ELBO: the ELBO with the KL term in closed form where known (sec. 2.4)")(
    _elbo(pyro.infer.TraceMeanField_ELBO)
)
OBJECTIVES.register("iwae", "importance-weighted bound with K = --particles samples (Burda et al. 2016)")(IWAE)


def make_objective(name: str, num_particles: int = 1, max_plate_nesting: int = 1, free_bits: float = 0.0) -> Any:
    """The objective registered as `name`, ready for `differentiable_loss`."""
    if num_particles < 1:
        raise PyrovaeError(f"--particles must be at least 1, got {num_particles}")
    if free_bits:
        raise PyrovaeError("--free-bits is not available yet")
    return OBJECTIVES.get(name)(num_particles=num_particles, max_plate_nesting=max_plate_nesting)

