"""Draws from any Pyro model: prior samples of x, and reconstructions through a guide."""

from __future__ import annotations

from typing import Callable

import torch
from pyro import poutine

from pyrovae.sites import inspect_model

__all__ = ["sample", "reconstruct"]


def _observed_mean(model: Callable, x: torch.Tensor, trace_guide=None) -> torch.Tensor:
    observed = inspect_model(model, x).observed[0]
    program = poutine.uncondition(model) if trace_guide is None else poutine.replay(model, trace=trace_guide)
    trace = poutine.trace(program).get_trace(x)
    return trace.nodes[observed]["fn"].mean.reshape(x.shape)


@torch.no_grad()
def sample(model: Callable, like: torch.Tensor, num: int) -> torch.Tensor:
    """Means of p(x|z) for `num` draws z ~ p(z); `like` is one batch of data (for shapes)."""
    template = like[:1].expand(num, *like.shape[1:]).clone()
    return _observed_mean(model, template)


@torch.no_grad()
def reconstruct(model: Callable, guide: Callable, x: torch.Tensor) -> torch.Tensor:
    """Means of p(x|z) with z ~ q(z|x): the autoencoder's reconstruction of `x`."""
    return _observed_mean(model, x, poutine.trace(guide).get_trace(x))
