"""Per-example importance log-weights log p(x, z_k) - log q(z_k | x), vectorized over k.

The common core of the IWAE objective and of the importance-sampled marginal likelihood
(Kingma & Welling 2019, sec. 2.6 and 2.7; Burda et al. 2016). Pyro's own RenyiELBO puts the
minibatch scale of a subsampled plate inside its log-mean-exp (so a minibatch does not give
the per-example bound scaled up) and offers no differentiable loss; here the subsample scale
is kept apart from the weights while annealing scales (KL warm-up) stay in them.
"""

from __future__ import annotations

from typing import Any, Callable

import pyro
import torch
from pyro import poutine
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample

from pyrovae.errors import PyrovaeError
from pyrovae.sites import DATA_PLATE

__all__ = ["LogWeights", "log_weights"]

PARTICLES = "_particles"


class LogWeights:
    """`values[k, i]`: the log-weight of sample k for example i; `data_scale`: full size / batch."""

    def __init__(self, values: torch.Tensor, data_scale: float) -> None:
        self.values = values
        self.data_scale = data_scale


def _per_example(site: dict, particle_dim: int, num: int) -> torch.Tensor:
    """Reduce a site's log-density to shape (num, batch), summing every other dimension."""
    frames = {f.name: f for f in site["cond_indep_stack"]}
    if DATA_PLATE not in frames:
        raise PyrovaeError(f"sample site {site['name']!r} is outside the {DATA_PLATE!r} plate: per-example weights need every site in it")
    log_prob = site["log_prob"]
    width = -particle_dim
    log_prob = log_prob.reshape((1,) * (width - log_prob.dim()) + log_prob.shape)
    log_prob = log_prob.movedim(width + frames[DATA_PLATE].dim, 1)
    return log_prob.reshape(*log_prob.shape[:2], -1).sum(-1).expand(num, -1)


def log_weights(
    model: Callable,
    guide: Callable,
    num_samples: int,
    max_plate_nesting: int,
    *args: Any,
    **kwargs: Any,
) -> LogWeights:
    """Draw `num_samples` z ~ q(z|x) per example in one vectorized pass and weigh them.

    Site scales other than the data plate's subsample scale (e.g. KL warm-up's beta) stay in
    the weights; the subsample scale is returned apart, to multiply per-example bounds.
    """
    particle_dim = -(max_plate_nesting + 1)
    with pyro.plate(PARTICLES, num_samples, dim=particle_dim):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    total: torch.Tensor | float = 0.0
    data_scale = 1.0
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        trace.compute_log_prob(lambda name, site: not site_is_subsample(site))
        for site in _sample_sites(trace):
            frame = next((f for f in site["cond_indep_stack"] if f.name == DATA_PLATE), None)
            if frame is not None:
                data_scale = frame.full_size / frame.size
            # log_prob carries every scale and mask; the subsample scale comes out again
            total = total + sign / data_scale * _per_example(site, particle_dim, num_samples)
    if not torch.is_tensor(total):
        raise PyrovaeError("the model and guide have no sample sites")
    return LogWeights(total, data_scale)


def _sample_sites(trace: Trace) -> list[dict]:
    return [s for s in trace.nodes.values() if s["type"] == "sample" and not site_is_subsample(s)]
