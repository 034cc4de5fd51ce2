"""Importance log-weights with the model's enumerated discrete latents summed out exactly.

For a model whose discrete sites are marked ``infer={"enumerate": "parallel"}`` (or
``config_enumerate``) and not sampled by the guide, the weight of particle k for example i is

    log sum_y p(x_i, y, z_ik) - log q(z_ik | x_i),

the discrete sites summed out as in Pyro's TraceEnum_ELBO, importance sampling only over what
the guide samples. The model runs under ``poutine.enum`` with its enumeration dims to the left
of the particle dim, and its log-density factors are contracted with Pyro's plated tensor
variable elimination (``pyro.ops.contract.contract_to_tensor``, the factors collected by
TraceEnum_ELBO's ``_compute_model_factors``), down to the (particle, data) plates: a discrete
site inside the per-example plate is summed per example, independently of the others.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer.traceenum_elbo import _compute_model_factors
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from pyro.ops.rings import LogRing
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites, site_is_subsample

from pyrovae.errors import PyrovaeError
from pyrovae.importance import PARTICLES, LogWeights, _sample_sites, apply_model_masks, log_weights, over_particles
from pyrovae.sites import DATA_PLATE, ModelSites

__all__ = ["enumerated_sites", "log_weights_enum", "weights_for"]


def enumerated_sites(model: Callable, *args: Any, **kwargs: Any) -> list[str]:
    """Names of the model's latent sites whose ``infer`` sets ``enumerate`` (one blocked run)."""
    with torch.no_grad(), poutine.block():
        trace = poutine.trace(model).get_trace(*args, **kwargs)
    return [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not site_is_subsample(site)
        and (site["infer"] or {}).get("enumerate")
    ]


def log_weights_enum(
    model: Callable,
    guide: Callable,
    num_samples: int,
    max_plate_nesting: int,
    *args: Any,
    plate_name: str = DATA_PLATE,
    vectorize: bool | None = None,
    **kwargs: Any,
) -> LogWeights:
    """Like `importance.log_weights`, with the model's enumerated sites summed out exactly.

    `values[k, i]` keeps the particle and per-example dims (every other plate is summed);
    the per-example plate's subsample scale is divided out and returned as `data_scale`,
    other scales (e.g. KL warm-up) stay in. Differentiable: no `no_grad` inside.
    """
    def weigh(k: int | None) -> LogWeights:
        return _enumerated(model, guide, k, max_plate_nesting, plate_name, args, kwargs)

    return over_particles(weigh, num_samples, vectorize, (model, guide))


def weights_for(sites: ModelSites) -> Callable[..., LogWeights]:
    """The log-weights of a model: summed over its enumerated sites where it has any."""
    return log_weights_enum if sites.enumerated else log_weights


def _enumerated(model: Callable, guide: Callable, num_samples: int | None, max_plate_nesting: int, plate_name: str, args: tuple, kwargs: dict) -> LogWeights:
    """The weights of `num_samples` draws over a particle plate, or of one draw without it (None)."""
    particle_dim = -(max_plate_nesting + 1)
    plate = pyro.plate(PARTICLES, num_samples, dim=particle_dim) if num_samples is not None else contextlib.nullcontext()
    with plate:
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        # replay outside enum, as in TraceEnum_ELBO: enum must see the replayed sites to record
        # the enumerated dims their densities depend on (z ~ p(z | y) with y enumerated)
        enum_model = poutine.enum(model, first_available_dim=particle_dim - 1)
        model_trace = poutine.trace(poutine.replay(enum_model, trace=guide_trace)).get_trace(*args, **kwargs)
    guide_trace = prune_subsample_sites(guide_trace)
    model_trace = prune_subsample_sites(model_trace)
    data_scale = _check_sites(model_trace, guide_trace, plate_name)
    if not _sample_sites(model_trace):
        raise PyrovaeError("the model has no sample sites")

    apply_model_masks(model_trace, guide_trace)
    try:
        model_trace.compute_log_prob()
        guide_trace.compute_log_prob()
        guide_trace.pack_tensors()
        model_trace.pack_tensors(guide_trace.plate_to_symbol)
        costs, log_factors, ordering, sum_dims, scale = _compute_model_factors(model_trace, guide_trace)
    except ValueError as e:  # Pyro's multi-line shape and scale messages
        raise PyrovaeError(f"enumerated model: {' '.join(str(e).split())}") from e

    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample":
            costs.setdefault(ordering[name], []).append(packed.neg(site["packed"]["log_prob"]))
    symbols = model_trace.plate_to_symbol
    target = frozenset(symbols[p] for p in (PARTICLES, plate_name) if p in symbols)

    # sizes of the target plates for the final broadcast (a plate of size 1 is packed away)
    dim_to_size = dict.fromkeys(target, 1)
    for term in (t for tree in (costs, log_factors) for terms in tree.values() for t in terms):
        dim_to_size.update(zip(term._pyro_dims, term.shape))
    parts = []
    if costs:
        parts.append(contract_to_tensor(costs, set(), target_ordinal=target, ring=LogRing(dim_to_size=dim_to_size)))
    if log_factors:
        # the discrete sites summed out: mask inside the log-sum-exp, the common scale outside
        ring = LogRing(dim_to_size=dim_to_size)
        marginal = contract_to_tensor(log_factors, sum_dims, target_ordinal=target, ring=ring)
        parts.append(packed.scale_and_mask(marginal, scale=scale))
    frame = next(f for s in _sample_sites(model_trace) for f in s["cond_indep_stack"] if f.name == plate_name)
    width = -particle_dim
    values: torch.Tensor | None = None
    for part in parts:
        part = packed.unpack(part, model_trace.symbol_to_dim)
        part = part.reshape((1,) * (width - part.dim()) + part.shape).movedim(width + frame.dim, 1)
        part = part.reshape(*part.shape[:2], -1).sum(-1)  # the other plates are contracted: size 1
        values = part if values is None else values + part
    assert values is not None  # the model has sample sites (checked above)
    return LogWeights(values.expand(num_samples or 1, frame.size) / data_scale, data_scale)


def _check_sites(model_trace: Trace, guide_trace: Trace, plate: str) -> float:
    """Refuse what the weights cannot be exact for; return the per-example subsample scale."""
    data_scale = 1.0
    for trace in (model_trace, guide_trace):
        for site in _sample_sites(trace):
            name = site["name"]
            frame = next((f for f in site["cond_indep_stack"] if f.name == plate), None)
            if frame is None:
                raise PyrovaeError(f"sample site {name!r} is outside the {plate!r} plate: per-example weights need every site in it")
            data_scale = frame.full_size / frame.size if frame.full_size else 1.0
            if trace is guide_trace or site["is_observed"] or name in guide_trace.nodes:
                continue
            how = (site["infer"] or {}).get("enumerate")
            if how == "sequential":
                raise PyrovaeError(f"model site {name!r} asks for sequential enumeration: only 'parallel' is summed out, mark it infer={{'enumerate': 'parallel'}}")
            if site["infer"].get("_enumerate_dim") is not None:
                continue
            if site["fn"].has_enumerate_support:
                raise PyrovaeError(f"discrete model site {name!r} is neither enumerated nor sampled by the guide: mark it infer={{'enumerate': 'parallel'}} or sample it in the guide")
            raise PyrovaeError(f"latent model site {name!r} is not sampled by the guide")
    return data_scale



