"""Draws from any Pyro model: prior samples of x, and reconstructions through a guide."""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyro import poutine

from pyrovae.batch import Batch, Data, as_batch
from pyrovae.errors import PyrovaeError
from pyrovae.sites import inspect_model

__all__ = ["data_site", "reconstruct", "sample"]


def _observed_mean(model: Callable, x: Batch, trace_guide=None) -> torch.Tensor:
    observed = data_site(model, x)
    program = poutine.uncondition(model) if trace_guide is None else poutine.replay(model, trace=trace_guide)
    trace = x.call(poutine.trace(program).get_trace)
    return trace.nodes[observed]["fn"].mean.reshape(x.primary.shape)


def data_site(model: Callable, x: Batch) -> str:
    """The observed site that scores the data tensor (not a label or a condition observed beside it)."""
    with torch.no_grad():
        trace = x.call(poutine.trace(model).get_trace)
    observed = inspect_model(model, x).observed
    for name in observed:
        if trace.nodes[name]["value"] is x.primary:
            return name
    same = [n for n in observed if trace.nodes[n]["value"].numel() == x.primary.numel()]
    if len(observed) == 1 or len(same) == 1:
        return (same or list(observed))[0]
    raise PyrovaeError(f"the model observes {len(observed)} sites ({', '.join(map(repr, observed))}) and none is the data tensor itself: "
                       "which one is x is ambiguous")


@torch.no_grad()
def sample(model: Callable, like: Data, num: int) -> torch.Tensor:
    """Means of p(x|z) for `num` draws z ~ p(z); `like` is one batch of data (for shapes, and the
    other arguments: a conditional model's condition is the first example's, repeated)."""
    template = as_batch(like)[:1].map(lambda v: v.expand(num, *v.shape[1:]).clone())
    return _observed_mean(model, template)


@torch.no_grad()
def reconstruct(model: Callable, guide: Callable, x: Data) -> torch.Tensor:
    """Means of p(x|z) with z ~ q(z|x): the autoencoder's reconstruction of `x`."""
    batch = as_batch(x)
    return _observed_mean(model, batch, batch.call(poutine.trace(guide).get_trace))
