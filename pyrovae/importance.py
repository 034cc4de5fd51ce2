"""Per-example importance log-weights log p(x, z_k) - log q(z_k | x), vectorized over k.

The common core of the IWAE objective and of the importance-sampled marginal likelihood
(Kingma & Welling 2019, sec. 2.6 and 2.7; Burda et al. 2016). Pyro's own RenyiELBO puts the
minibatch scale of a subsampled plate inside its log-mean-exp (so a minibatch does not give
the per-example bound scaled up) and offers no differentiable loss; here the subsample scale
is kept apart from the weights while annealing scales (KL warm-up) stay in them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample

from pyrovae.errors import PyrovaeError
from pyrovae.files import first_line
from pyrovae.sites import DATA_PLATE

__all__ = ["LogWeights", "apply_model_masks", "log_weights", "over_particles", "per_example_log_prob"]

PARTICLES = "_particles"


class LogWeights:
    """`values[k, i]`: the log-weight of sample k for example i; `data_scale`: full size / batch."""

    def __init__(self, values: torch.Tensor, data_scale: float) -> None:
        self.values = values
        self.data_scale = data_scale

    def __iter__(self) -> Iterator[Any]:
        """``values, data_scale = log_weights(...)``."""
        return iter((self.values, self.data_scale))


def _per_example(site: dict, particle_dim: int, num: int, plate: str = DATA_PLATE) -> torch.Tensor:
    """Reduce a site's log-density to shape (num, batch), summing every other dimension."""
    frames = {f.name: f for f in site["cond_indep_stack"]}
    if plate not in frames:
        raise PyrovaeError(
            f"sample site {site['name']!r} is outside the per-example plate {plate!r}: log p(x) and the IWAE bound do not "
            "factor per example with a global latent; score such a model by its ELBO (--samples 0, objective elbo)"
        )
    log_prob = site["log_prob"]
    width = -particle_dim
    log_prob = log_prob.reshape((1,) * (width - log_prob.dim()) + log_prob.shape)
    log_prob = log_prob.movedim(width + frames[plate].dim, 1)
    return log_prob.reshape(*log_prob.shape[:2], -1).sum(-1).expand(num, -1)


def per_example_log_prob(site: Any, max_plate_nesting: int, plate: str = DATA_PLATE) -> torch.Tensor:
    """A traced site's log-density (after `compute_log_prob`) per example (B,), with no particle dim."""
    return _per_example(site, -(max_plate_nesting + 1), 1, plate)[0]


def log_weights(
    model: Callable,
    guide: Callable,
    num_samples: int,
    max_plate_nesting: int,
    *args: Any,
    plate_name: str = DATA_PLATE,
    vectorize: bool | None = None,
    **kwargs: Any,
) -> LogWeights:
    """Draw `num_samples` z ~ q(z|x) per example in one vectorized pass and weigh them.

    Site scales other than the data plate's subsample scale (e.g. KL warm-up's beta) stay in
    the weights; the subsample scale is returned apart, to multiply per-example bounds.
    `plate_name` names the per-example plate; a plate that subsamples itself (without the
    `index` pyrovae passes) is refused, since its weights would cover only part of the examples.
    A program that cannot run over a leading particle dimension is weighed one draw at a time
    (`over_particles`).
    """

    def weigh(k: int | None) -> LogWeights:
        plate = pyro.plate(PARTICLES, k, dim=-(max_plate_nesting + 1)) if k is not None else contextlib.nullcontext()
        with plate:
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        return _weights(model_trace, guide_trace, k or 1, max_plate_nesting, plate_name, "index" in kwargs)

    return over_particles(weigh, num_samples, vectorize, (model, guide))


def apply_model_masks(model_trace: Trace, guide_trace: Trace) -> bool:
    """Give each guide site the model's mask of that site (`poutine.mask`, `obs_mask`, padding),
    dropping any log-density already computed: a masked position then adds nothing to log q as
    it adds nothing to log p. A guide written for the data (an encoder of padded sequences) does
    not know the model's masks, and Pyro scores a guide site by the guide's own. True if any
    site changed."""
    changed = False
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site) or name not in model_trace.nodes:
            continue
        mask = _site_mask(model_trace.nodes[name])
        if mask is None or mask is True:
            continue
        own = site.get("mask")
        site["mask"] = mask if own is None or own is True else (own & mask)
        for key in ("log_prob", "unscaled_log_prob", "log_prob_sum", "score_parts"):
            site.pop(key, None)  # type: ignore[misc]
        changed = True
    return changed


def _site_mask(site: Any) -> Any:
    """A site's mask over its batch shape: from `poutine.mask` (the site's "mask") and from
    `dist.mask` (a MaskedDistribution's own). A `dist.mask` applied before `.to_event(r)` masks
    elements of the event; it becomes a mask of the site's batch only where it is constant across
    those r dims (a time step's mask broadcast over its latent's coordinates), and is refused
    where it is not: a guide cannot be given part of an event's mask."""
    mask, fn, inner = site.get("mask"), site["fn"], 0
    while isinstance(fn, (dist.Independent, dist.MaskedDistribution)):
        if isinstance(fn, dist.Independent):
            inner += fn.reinterpreted_batch_ndims
        elif fn._mask is not None:
            own = fn._mask
            kept = max(own.dim() - inner, 0)
            if inner and all(size == 1 for size in own.shape[kept:]):  # broadcast over the event (a time step's mask)
                own = own.reshape(own.shape[:kept])
            elif inner:  # it may vary within an event: check, at the cost of reading it on the host
                elements = own.expand(fn.batch_shape).flatten(-inner)
                own = elements.all(-1)
                if not torch.equal(own, elements.any(-1)):
                    raise PyrovaeError(f"site {site['name']!r} masks part of its event (dist.mask before to_event, varying within it): "
                                       "mask whole events, e.g. with poutine.mask or a mask that broadcasts over the event dims")
            mask = own if mask is None or mask is True else (mask & own)
        fn = fn.base_dist
    return mask


def _weights(model_trace: Trace, guide_trace: Trace, num: int, nesting: int, plate_name: str, indexed: bool) -> LogWeights:
    apply_model_masks(model_trace, guide_trace)
    particle_dim = -(nesting + 1)
    total: torch.Tensor | float = 0.0
    data_scale = 1.0
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        trace.compute_log_prob(lambda name, site: not site_is_subsample(site))
        for site in _sample_sites(trace):
            frame = next((f for f in site["cond_indep_stack"] if f.name == plate_name), None)
            if frame is not None:
                data_scale = frame.full_size / frame.size
                if data_scale != 1 and not indexed:
                    raise PyrovaeError(
                        f"the program subsamples its plate {plate_name!r} itself ({frame.size} of {frame.full_size}): "
                        "pyrovae draws the minibatches; remove subsample_size, or take index=/size= and pass subsample=index"
                    )
            # log_prob carries every scale and mask; the subsample scale comes out again
            total = total + sign / data_scale * _per_example(site, particle_dim, num, plate_name)
    if not torch.is_tensor(total):
        raise PyrovaeError("the model and guide have no sample sites")
    return LogWeights(total, data_scale)


# Programs seen failing over a particle dimension, by identity: weighed one draw at a time from
# then on, without trying again. A stale id costs speed only, never a number.
_SEQUENTIAL: set[tuple[int, ...]] = set()
VECTORIZE_ERRORS = (RuntimeError, IndexError, ValueError, TypeError, AssertionError)


def _identity(program: Callable) -> tuple[int, ...]:
    return (id(getattr(program, "__func__", program)), id(getattr(program, "__self__", None)))


def over_particles(weigh: Callable[[int | None], LogWeights], num_samples: int, vectorize: bool | None, programs: tuple[Callable, ...]) -> LogWeights:
    """`weigh(K)`, the K draws in one pass over a particle plate, or, for a program whose code
    cannot broadcast over that extra leading dimension (``torch.cat`` of a latent with a data
    tensor, boolean-mask indexing, reshapes by the batch size), K calls of `weigh(None)`, each
    one draw with no particle plate: the same estimate, K times slower. Said once per program
    (logger ``"pyrovae"``). With `vectorize` True the fallback is refused in one line; with
    False the program is never tried vectorized.
    """
    key = tuple(i for p in programs for i in _identity(p))
    if vectorize or (vectorize is None and key not in _SEQUENTIAL):  # asked to vectorize: tried (and refused) every time
        try:
            return weigh(num_samples)
        except VECTORIZE_ERRORS as error:
            where = first_line(error)
            if vectorize:
                raise PyrovaeError(f"the program cannot run over a vectorized particle dimension: {where}") from error
            logging.getLogger("pyrovae").warning(
                "the program cannot run over a vectorized particle dimension (%s): weighing its %d draws one at a time", where, num_samples
            )
            _SEQUENTIAL.add(key)
    parts = [weigh(None) for _ in range(num_samples)]
    return LogWeights(torch.cat([p.values for p in parts]), parts[0].data_scale)


def _sample_sites(trace: Trace) -> list[Any]:
    return [s for s in trace.nodes.values() if s["type"] == "sample" and not site_is_subsample(s)]
