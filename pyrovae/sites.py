"""What a Pyro program declares: its latent sites, their event shapes, its plate nesting.

Guides are built from this, so any program with a ``"data"`` plate works, including a
user's own model with other site names and no pyrovae base class.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from pyrovae.errors import PyrovaeError

__all__ = ["DATA_PLATE", "ModelSites", "call_kwargs", "data_plate", "direct_parameters", "inspect_model", "register"]

DATA_PLATE = "data"
_REGISTER = ContextVar("pyrovae_register_params", default=True)


def register(name: str, module: torch.nn.Module) -> None:
    """`pyro.module(name, module)`: puts its parameters in the trace for Pyro's SVI and optimizers.

    Skipped inside `direct_parameters()`, where a pyrovae method optimizes the module's own
    parameters with torch and the per-step registration would be pure overhead.
    """
    if _REGISTER.get():
        pyro.module(name, module)


@contextmanager
def direct_parameters() -> Iterator[None]:
    """Within this block, `register` does nothing (see there)."""
    token = _REGISTER.set(False)
    try:
        yield
    finally:
        _REGISTER.reset(token)


@dataclass(frozen=True)
class ModelSites:
    """Latent sites (name -> event shape, in execution order), observed sites, plate nesting."""

    latents: dict[str, torch.Size]
    observed: tuple[str, ...]
    max_plate_nesting: int

    def describe(self) -> str:
        return ", ".join(f"{k}{tuple(v)}" for k, v in self.latents.items())


def data_plate(x: torch.Tensor, index: torch.Tensor | None = None, size: int | None = None) -> pyro.plate:
    """The per-example plate: subsampled by `index` out of `size` examples, scaling exactly."""
    if index is None:
        if size not in (None, len(x)):
            raise ValueError("a minibatch of a larger data set needs its `index`")
        return pyro.plate(DATA_PLATE, len(x))
    return pyro.plate(DATA_PLATE, size if size is not None else len(x), subsample=index)


def call_kwargs(fn: Callable, **kwargs: Any) -> dict[str, Any]:
    """The keyword arguments among `kwargs` that `fn` accepts."""
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def inspect_model(model: Callable, x: torch.Tensor) -> ModelSites:
    """Trace `model` once on a small batch of `x` and read off its sites."""
    with poutine.block(), torch.no_grad():
        try:
            trace = poutine.trace(model).get_trace(x[:2])
        except PyrovaeError:
            raise
        except Exception as error:  # a user's program failing on our batch
            raise PyrovaeError(f"running the model on a batch of shape {tuple(x[:2].shape)} failed: {error}") from error
    latents: dict[str, torch.Size] = {}
    observed: list[str] = []
    nesting = 0
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        frames = [f for f in site["cond_indep_stack"] if f.vectorized]
        nesting = max([nesting] + [-f.dim for f in frames])
        if site["is_observed"]:
            observed.append(name)
            continue
        if not any(f.name == DATA_PLATE for f in frames):
            raise PyrovaeError(f"latent site {name!r} is outside the {DATA_PLATE!r} plate: put every per-example site in pyro.plate('data', ...)")
        latents[name] = site["fn"].event_shape
    if not observed:
        raise PyrovaeError("the model observes nothing: pass the data as obs= of a sample site")
    return ModelSites(latents, tuple(observed), nesting)
