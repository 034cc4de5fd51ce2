"""The data set's ELBO of a model with global latents, where log p(x) does not factor per example.

With a global latent w outside the per-example plate, p(x) = E_p(w)[prod_i p(x_i | w)] has no
per-example score, but the bound E_q[log p(x, w, z) - log q(w, z | x)] of the whole data set
does (Kingma & Welling 2019, sec. 2.2; the global-parameter form is Hoffman et al. 2013, sec. 2).
Each of the `num_samples` draws samples the guide's global sites once for all N examples and
the local sites per example; examples may be scored in chunks, the global draw replayed into
every chunk and its terms counted once per draw, so the estimate is exact and unbiased.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pyro import poutine
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample

from pyrovae.batch import Batch, Data, as_batch
from pyrovae.errors import PyrovaeError
from pyrovae.evaluate import default_max_elements
from pyrovae.importance import _sample_sites, apply_model_masks
from pyrovae.protocols import guide_traits, model_traits
from pyrovae.sites import ModelSites, inspect_model

__all__ = ["DatasetBound", "dataset_elbo"]


@dataclass(frozen=True)
class DatasetBound:
    """The ELBO of `examples` examples in nats (higher is better), its Monte Carlo standard error
    over `num_samples` draws (NaN for one draw), and the same per example."""

    elbo: float
    stderr: float
    examples: int
    num_samples: int

    @property
    def per_example(self) -> float:
        return self.elbo / self.examples

    def summary(self) -> dict[str, float | int | None]:
        return {
            "examples": self.examples,
            "elbo": self.elbo,
            "elbo_per_example": self.per_example,
            "stderr": None if math.isnan(self.stderr) else self.stderr,
            "num_samples": self.num_samples,
        }


@torch.no_grad()
def dataset_elbo(
    model: Callable,
    guide: Callable,
    data: Data,
    num_samples: int = 100,
    max_examples: int | None = None,
    plate: str | None = None,
) -> DatasetBound:
    """The ELBO of all of `data`, globals and locals, from `num_samples` draws of the guide.

    Args:
        model, guide: a Pyro model and guide taking the data's arguments (the param store and
            the modules hold their trained values).
        data: a tensor (N, ...), a tuple of positional or a dict of keyword arguments, or a `Batch`.
        num_samples: draws of the guide, each one global draw for the whole data set.
        max_examples: examples per chunk (memory cap); by default all at once unless N x the data
            width exceeds 2**24 floats (2**27 on a GPU).
        plate: the per-example plate (`pyrovae.sites.inspect_model`).

    Masks and scales in the programs (``poutine.mask``, ``obs_mask``) stay in the log-densities.

    References:
        Kingma & Welling (2019), sec. 2.2 (the ELBO); Hoffman, Blei, Wang & Paisley (2013), sec. 2
        (global and local latent variables).
    """
    if num_samples < 1:
        raise PyrovaeError(f"the data set's ELBO needs at least 1 sample, got {num_samples}")
    if not guide_traits(guide).gives_elbo:
        name = type(guide).__name__
        raise PyrovaeError(f"{name} is a point estimate and gives no ELBO: score its decoder with a proposal fitted per example")
    batch = as_batch(data)
    if len(batch) == 0:
        raise PyrovaeError("nothing to evaluate: the data is empty")
    sites = inspect_model(model, batch, plate=plate)
    sites.refuse_subsampled("the data set's ELBO")
    if sites.enumerated:
        raise PyrovaeError(
            f"the model sums {', '.join(map(repr, sites.enumerated))} out by enumeration: the data set's ELBO samples every latent "
            "and does not sum enumerated sites; use pyrovae.evaluate for a model without global latents"
        )
    step = _default_chunk(model, batch) if max_examples is None else max_examples
    if step < 1:
        raise PyrovaeError(f"max_examples must be at least 1, got {step}")
    chunks = [chunk for _, group in batch.groups() for chunk in group.chunks(step)]  # each chunk one call
    totals = torch.tensor([_one_draw(model, guide, chunks, sites) for _ in range(num_samples)], dtype=torch.float64)
    if not torch.isfinite(totals).all():
        raise PyrovaeError("a non-finite ELBO: the guide puts mass where the model has none, or the parameters diverged")
    stderr = (totals.std() / math.sqrt(num_samples)).item() if num_samples > 1 else math.nan
    return DatasetBound(totals.mean().item(), stderr, len(batch), num_samples)


def _default_chunk(model: Callable, batch: Batch) -> int:
    """Examples per chunk within `pyrovae.evaluate`'s memory cap for the data's device."""
    width = model_traits(model).elements_per_sample or math.prod(batch.primary.shape[1:]) or 1
    return max(1, default_max_elements(batch.device) // width)


def _one_draw(model: Callable, guide: Callable, chunks: list[Batch], sites: ModelSites) -> float:
    """log p(x, w, z) - log q(w, z | x) of one draw: w from the first chunk's guide run, replayed
    into the others; the terms outside the per-example plate counted once, from the first chunk."""
    total = 0.0
    shared: Trace | None = None
    once: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        program = guide if shared is None else poutine.replay(guide, trace=shared)
        guide_trace = chunk.call(poutine.trace(program).get_trace)
        model_trace = chunk.call(poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace)
        _check_guide(guide_trace, model_trace, sites, several=len(chunks) > 1)
        apply_model_masks(model_trace, guide_trace)
        terms = {}
        for role, trace, sign in (("model", model_trace, 1.0), ("guide", guide_trace, -1.0)):
            trace.compute_log_prob(lambda name, site: not site_is_subsample(site))
            for site in _sample_sites(trace):
                log_prob = sign * site["log_prob"].sum()
                if _in_plate(site, sites.plate):
                    total += log_prob.item()
                else:
                    terms[f"{role} site {site['name']!r}"] = log_prob
        if shared is None:
            shared = _global_part(guide_trace, sites.plate)
            once = terms
            total += sum(t.item() for t in terms.values())
        else:
            _check_shared(once, terms)
    return total


def _check_guide(guide_trace: Trace, model_trace: Trace, sites: ModelSites, several: bool) -> None:
    """Every latent of the call served, and (for chunks) no per-example site drawn outside the plate, where replaying it would copy it across chunks."""
    sampled = {s["name"]: s for s in _sample_sites(guide_trace)}
    latent = {s["name"] for s in _sample_sites(model_trace) if not s["is_observed"]}  # a label is observed where it is given
    missing = [n for n in (*sites.latents, *sites.global_latents) if n in latent and n not in sampled]
    if missing:
        missing_sites = ", ".join(map(repr, missing))
        raise PyrovaeError(f"the guide does not sample the model's latent site(s) {missing_sites}: the ELBO needs q for every latent")
    outside = [n for n in sites.latents if n in sampled and not _in_plate(sampled[n], sites.plate)]
    if several and outside:
        raise PyrovaeError(
            f"the guide samples the per-example site(s) {', '.join(map(repr, outside))} outside the plate {sites.plate!r}: "
            "score the data set in one chunk (max_examples=N), or put them in the guide's plate of that name"
        )


def _check_shared(first: dict[str, torch.Tensor], terms: dict[str, torch.Tensor]) -> None:
    """The global terms, counted once, must not depend on the chunk (a guide of w that reads the examples)."""
    for name in first.keys() | terms.keys():
        a, b = first.get(name), terms.get(name)
        if a is None or b is None or not torch.allclose(a, b, rtol=1e-4, atol=1e-4):
            raise PyrovaeError(
                f"the {name} outside the per-example plate scores differently on another chunk of examples (it depends on them): "
                "score the data set in one chunk (max_examples=N)"
            )


def _global_part(trace: Trace, plate: str) -> Trace:
    """The sites of `trace` outside the per-example plate, to replay into the other chunks."""
    part = Trace()
    for site in _sample_sites(trace):
        if not _in_plate(site, plate):
            part.add_node(site["name"], **site)
    return part


def _in_plate(site: dict[str, Any], plate: str) -> bool:
    return any(f.name == plate for f in site["cond_indep_stack"])
