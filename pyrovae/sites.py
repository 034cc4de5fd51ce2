"""What a Pyro program declares: its latent sites, their event shapes and supports, its
per-example plate and plate nesting.

Guides are built from this, so any program with a per-example plate works, including a
user's own model with other site and plate names and no pyrovae base class.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to, constraints

from pyrovae.batch import Data, as_batch
from pyrovae.capture import leaves_no_trace
from pyrovae.errors import PyrovaeError
from pyrovae.files import first_line
from pyrovae.programs import program_modules

__all__ = ["DATA_PLATE", "ModelSites", "call_kwargs", "data_plate", "direct_parameters", "inspect_model", "is_real", "primary", "register"]

DATA_PLATE = "data"
_REGISTER = ContextVar("pyrovae_register_params", default=True)


def register(name: str, module: torch.nn.Module) -> None:
    """`pyro.module(name, module)`: puts its parameters in the trace for Pyro's SVI and optimizers.

    Skipped inside `direct_parameters()`, where a pyrovae method optimizes the module's own
    parameters with torch and the per-step registration would be pure overhead.
    """
    if _REGISTER.get():
        with warnings.catch_warnings():  # a module its user froze is left out of the store: what freezing asks for
            warnings.filterwarnings("ignore", message=".*was not registered in the param store because requires_grad=False")
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
    """What a guide must serve: the per-example latent sites (name -> event shape, in execution
    order) and their supports; the observed sites; the per-example plate's name and dim; the
    plate nesting; the enumerated sites (summed out, sampled by no guide) and the latents
    outside the per-example plate (global)."""

    latents: dict[str, torch.Size]
    observed: tuple[str, ...]
    max_plate_nesting: int
    plate: str = DATA_PLATE
    plate_dim: int | None = None
    supports: dict[str, Any] = field(default_factory=dict)
    enumerated: tuple[str, ...] = ()
    global_latents: dict[str, torch.Size] = field(default_factory=dict)
    discrete: tuple[str, ...] = ()
    subsampled: str | None = None  # why, when the model subsamples its plate itself (AIR's subsample_size)
    label: str | None = None  # the site observed where a label is given and latent where it is left out (`Batch.omit`)

    def refuse_subsampled(self, what: str) -> None:
        """One line for the uses a self-subsampling program cannot have: per-example scores, tables, built-in guides."""
        if self.subsampled:
            raise PyrovaeError(f"{self.subsampled}: {what} needs every example it is given; remove subsample_size, or take index=/size= and pass subsample=index")

    def describe(self) -> str:
        return ", ".join(f"{k}{tuple(v)}" for k, v in self.latents.items())

    def real_shape(self, name: str) -> torch.Size:
        """The event shape a guide's real-valued distribution has for site `name`: the site's
        own, or its unconstrained shape (a simplex of K is K - 1 reals, Pyro's `biject_to`)."""
        shape = self.latents[name] if name in self.latents else self.global_latents[name]
        support = self.supports.get(name)
        if support is None or support.is_discrete or is_real(support):  # a discrete site is refused, not served
            return shape
        return torch.Size(biject_to(support).inverse_shape(shape))

    def constrain(self, name: str, q: Any) -> Any:
        """`q`, a distribution on `real_shape(name)`, carried onto the site's support by `biject_to`
        (as Pyro's autoguides serve positive, unit-interval and simplex sites)."""
        support = self.supports.get(name)
        if support is None or is_real(support):
            return q
        return dist.TransformedDistribution(q, biject_to(support))

    def unservable(self, discrete: bool = True, constrained: bool = False) -> dict[str, str]:
        """Latent sites a real-valued guide cannot serve, with why: discrete ones, and (if asked)
        constrained ones."""
        out = {}
        for name in (*self.latents, *self.global_latents):
            support = self.supports.get(name)
            if support is None:
                continue
            if support.is_discrete and discrete:
                out[name] = f"discrete ({type(support).__name__.lstrip('_')})"
            elif not support.is_discrete and not is_real(support) and constrained:
                out[name] = f"constrained ({type(support).__name__.lstrip('_')})"
        return out

    def example_shape(self, batch: int) -> tuple[int, ...]:
        """The batch shape of one site's distribution over `batch` examples: the examples at
        the plate's dim, singletons right of it (a pixel plate inside the per-example one)."""
        inner = -(self.plate_dim or -1) - 1
        return (batch,) + (1,) * inner

    def plate_for(self, x: torch.Tensor, index: torch.Tensor | None = None, size: int | None = None) -> pyro.plate:
        """The model's per-example plate, for a guide: same name and dim."""
        return data_plate(x, index, size, name=self.plate, dim=self.plate_dim)


def data_plate(x: torch.Tensor, index: torch.Tensor | None = None, size: int | None = None,
               name: str = DATA_PLATE, dim: int | None = None) -> pyro.plate:
    """The per-example plate: subsampled by `index` out of `size` examples, scaling exactly."""
    if index is None:
        if size not in (None, len(x)):
            raise ValueError("a minibatch of a larger data set needs its `index`")
        return pyro.plate(name, len(x), dim=dim)
    return pyro.plate(name, size if size is not None else len(x), subsample=index, dim=dim)


def is_real(support: Any) -> bool:
    """True for a support of unconstrained reals (of any event dim)."""
    while hasattr(support, "base_constraint"):  # independent(...), a mixture's support
        support = support.base_constraint
    return support is constraints.real


def primary(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """The first tensor argument of a call: what built-in guides encode."""
    for value in (*args, *kwargs.values()):
        if torch.is_tensor(value) and value.dim() > 0:
            return value
    raise PyrovaeError("the program was called without a data tensor")


def call_kwargs(fn: Callable, named: bool = False, **kwargs: Any) -> dict[str, Any]:
    """The keyword arguments among `kwargs` that `fn` accepts; with `named`, only those its
    signature names (a ``**kwargs`` catch-all does not ask for them)."""
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return {}
    if not named and any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


# Examples traced to read a program's sites: a prime, unlikely to be the size of another plate
# (pixels, channels, time steps), and large enough to see most programs subsampling their own plate.
INSPECT_EXAMPLES = 67


def inspect_model(model: Callable, data: Data, plate: str | None = None, **kwargs: Any) -> ModelSites:
    """Trace `model` once on a few examples of `data` (once per call of `Batch.groups`) and read off its sites.

    The per-example plate is `plate` if given, else ``"data"`` if the model has one, else the
    one plate whose size is the number of examples traced.
    """
    batch = as_batch(data)
    modules = torch.nn.ModuleList(program_modules(model))
    store = pyro.get_param_store()
    sites: list[dict[str, Any]] = []
    names: set[str] = set()
    for _, group in batch.groups():  # a program called on labelled and unlabelled examples apart: the sites of both calls
        part = group[: min(len(group), INSPECT_EXAMPLES)]
        # inspecting changes nothing a run sees: modules, random state, and no param-store entries made
        with poutine.block(), torch.no_grad(), leaves_no_trace(modules, part.device), store.scope(store.get_state()):
            try:
                trace = part.call(poutine.trace(model).get_trace, **kwargs)
            except PyrovaeError:
                raise
            except Exception as error:  # a user's program failing on our batch
                raise PyrovaeError(f"running the model on {len(part)} examples (first argument of shape {tuple(part.primary.shape)}) failed: {type(error).__name__}: {first_line(error)}") from error
        found = [s for s in trace.nodes.values() if s["type"] == "sample" and not site_is_subsample(s)]
        frames = {f.name: f for s in found for f in s["cond_indep_stack"] if f.vectorized}
        name = _find_plate(frames, plate, len(part))
        if names and name not in names:
            raise PyrovaeError(f"the model's per-example plate is {name!r} on unlabelled examples but {names.pop()!r} on labelled ones: name it with plate= (--plate NAME)")
        names.add(name)
        frame = frames[name]
        sites += found
    # a label observed in one call and latent in the other (model(xs, ys=None)) is a latent; each site once
    latent_names = {s["name"] for s in sites if not s["is_observed"]}
    labels = sorted({s["name"] for s in sites if s["is_observed"] and s["name"] in latent_names})
    sites = list({s["name"]: s for s in sites if not (s["is_observed"] and s["name"] in latent_names)}.values())
    # Pyro scales a plate that subsamples itself exactly, so amortized VI with a guide that
    # subsamples it too trains as under SVI; what needs every example refuses (`refuse_subsampled`)
    subsampled = f"the model subsamples its plate {name!r} itself ({frame.size} of {frame.full_size} examples)" if frame.size != frame.full_size else None
    latents: dict[str, torch.Size] = {}
    global_latents: dict[str, torch.Size] = {}
    supports: dict[str, Any] = {}
    observed: list[str] = []
    enumerated: list[str] = []
    discrete: list[str] = []
    nesting = 0
    for site in sites:
        vectorized = [f for f in site["cond_indep_stack"] if f.vectorized]
        nesting = max([nesting] + [-f.dim for f in vectorized])
        if site["is_observed"]:
            observed.append(site["name"])
            continue
        fn = site["fn"]
        supports[site["name"]] = fn.support
        if fn.support.is_discrete:
            discrete.append(site["name"])
        if site["infer"].get("enumerate"):
            enumerated.append(site["name"])
        elif any(f.name == name for f in vectorized):
            latents[site["name"]] = fn.event_shape
        else:
            global_latents[site["name"]] = fn.event_shape
    if not observed:
        raise PyrovaeError("the model observes nothing: pass the data as obs= of a sample site")
    return ModelSites(latents, tuple(observed), nesting, name, frame.dim, supports, tuple(enumerated), global_latents, tuple(discrete), subsampled,
                      labels[0] if len(labels) == 1 else None)


def _find_plate(frames: dict[str, Any], plate: str | None, n: int) -> str:
    if plate is not None:
        if plate not in frames:
            have = ", ".join(repr(p) for p in frames) or "none"
            raise PyrovaeError(f"the model has no plate named {plate!r} (its plates: {have})")
        return plate
    if DATA_PLATE in frames:
        return DATA_PLATE
    sized = [f.name for f in frames.values() if f.full_size in (n, -1)]  # -1: a plate without a size
    if len(sized) == 1:
        return sized[0]
    if not sized:
        have = ", ".join(f"{f.name!r} ({f.full_size})" for f in frames.values()) or "none"
        raise PyrovaeError(f"no plate of the model has one entry per example ({n} traced; its plates: {have}): put the per-example sites in a pyro.plate over the examples")
    raise PyrovaeError(f"several plates have one entry per example ({', '.join(map(repr, sized))}): name the per-example one with plate= (--plate NAME)")

