"""Diagnostics of posterior collapse (Kingma & Welling 2019, sec. 2.8): active units, and the
KL of each latent site.

A latent unit u is *active* if its posterior mean moves with the data,
A_u = Cov_x(E_{q(z|x)}[z_u]) > threshold (0.01 in Burda et al. 2016); an inactive unit's
posterior is the same for every x, i.e. it carries no information about x.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from pyrovae.batch import Data, as_batch
from pyrovae.errors import PyrovaeError
from pyrovae.importance import PARTICLES, VECTORIZE_ERRORS
from pyrovae.sites import inspect_model

__all__ = ["ActiveUnits", "active_units", "kl_per_site"]


@dataclass
class ActiveUnits:
    """Active-unit counts, per latent site and in total, and each unit's activity A_u."""

    active: int
    total: int
    threshold: float
    per_site: dict[str, int] = field(default_factory=dict)
    activity: dict[str, torch.Tensor] = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        return {"active_units": self.active, "total_units": self.total, "threshold": self.threshold, "active_per_site": dict(self.per_site)}


@torch.no_grad()
def active_units(
    model: Callable,
    guide: Callable,
    x: torch.Tensor | Iterable[torch.Tensor],
    threshold: float = 0.01,
    num_samples: int = 100,
) -> ActiveUnits:
    """Count the active latent units of a guide on data `x`.

    E_{q(z|x)}[z] is estimated by the mean of `num_samples` guide draws per example (the guide
    may be a flow with no closed-form mean); A_u is the variance of that over the examples
    (population variance). Sites keep their event shape: every element is one unit.

    Args:
        model: the model (for its plate nesting).
        guide: the guide q(z|x).
        x: data (N, ...), or an iterable of batches.
        threshold: a unit is active if A_u > threshold.
        num_samples: guide draws per example for the posterior mean.

    References:
        Burda, Grosse & Salakhutdinov (2016), Importance Weighted Autoencoders, sec. 5.2;
        Kingma & Welling (2019), sec. 2.8.
    """
    batches = [x] if torch.is_tensor(x) else list(x)
    if not batches or sum(len(b) for b in batches) < 2:
        raise PyrovaeError("active units need at least two examples")
    if num_samples < 1:
        raise PyrovaeError(f"num_samples must be positive, got {num_samples}")
    nesting = inspect_model(model, batches[0]).max_plate_nesting
    means: dict[str, list[torch.Tensor]] = {}
    for batch in batches:
        for name, mean in _posterior_means(guide, batch, num_samples, nesting).items():
            means.setdefault(name, []).append(mean)
    activity = {name: torch.cat(parts).var(0, unbiased=False) for name, parts in means.items()}
    per_site = {name: int((a > threshold).sum()) for name, a in activity.items()}
    total = sum(a.numel() for a in activity.values())
    return ActiveUnits(sum(per_site.values()), total, threshold, per_site, activity)


def _posterior_means(guide: Callable, batch: torch.Tensor, num_samples: int, nesting: int) -> dict[str, torch.Tensor]:
    """The mean of `num_samples` guide draws per example, per latent site: in one pass over a
    particle plate, or one draw at a time for a guide that cannot broadcast over it."""
    try:
        with pyro.plate(PARTICLES, num_samples, dim=-(nesting + 1)):
            traces = [poutine.trace(guide).get_trace(batch)]
    except VECTORIZE_ERRORS:
        traces = [poutine.trace(guide).get_trace(batch) for _ in range(num_samples)]
    draws: dict[str, list[torch.Tensor]] = {}
    for trace in traces:
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site) or site["is_observed"]:
                continue
            value, event = site["value"], site["fn"].event_shape
            draws.setdefault(name, []).append(value.reshape((-1, len(batch)) + event))
    return {name: torch.cat(values).float().mean(0) for name, values in draws.items()}


@torch.no_grad()
def kl_per_site(model: Callable, guide: Callable, x: Data) -> dict[str, float]:
    """E_q[log q(z_s|...) - log p(z_s|...)] for each latent site s the guide samples, nats per
    example, from one draw per example (masks and scales as the traces apply them).

    Their sum is the KL term of the ELBO; a site near 0 carries no information about x
    (posterior collapse, sec. 2.8). Enumerated sites, which the guide does not sample, are left out.
    """
    batch = as_batch(x)
    kl: dict[str, float] = {}
    for _, part in batch.groups():
        guide_trace = part.call(poutine.trace(guide).get_trace)
        model_trace = part.call(poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace)
        guide_trace.compute_log_prob(), model_trace.compute_log_prob()
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site) and name in model_trace.nodes:
                kl[name] = kl.get(name, 0.0) + (site["log_prob"].sum() - model_trace.nodes[name]["log_prob"].sum()).item() / len(batch)
    return kl
