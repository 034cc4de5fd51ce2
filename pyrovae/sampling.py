"""Draws from any Pyro model: prior samples of x, reconstructions through a guide, the guide's
posterior means (encode), decodings of given latents, and interpolations between two examples
(Kingma & Welling 2019, sec. 2.1)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyro import poutine

from pyrovae.batch import Batch, Data, as_batch
from pyrovae.errors import PyrovaeError
from pyrovae.sites import ModelSites, inspect_model

__all__ = ["data_site", "decode", "decode_mean", "draw", "encode", "interpolate", "moments", "prior_latents", "reconstruct", "sample", "sample_sequences", "traverse", "why_no_images"]

Latents = dict[str, torch.Tensor]  # site name -> (B, *event shape)


def _observed_mean(model: Callable, x: Batch, trace_guide=None, given: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    observed = data_site(model, x)
    program = poutine.uncondition(model) if trace_guide is None else poutine.replay(model, trace=trace_guide)
    program = poutine.condition(program, data=given) if given else program
    trace = x.call(poutine.trace(program).get_trace)
    return trace.nodes[observed]["fn"].mean.reshape(x.primary.shape)


def _repeated(like: Data, num: int) -> Batch:
    """The first example of `like`, repeated `num` times: shapes and a model's other arguments for draws."""
    return as_batch(like)[:1].map(lambda v: v.expand(num, *v.shape[1:]).clone())


def data_site(model: Callable, x: Batch) -> str:
    """The observed site that scores the data tensor (not a label or a condition observed beside it)."""
    with torch.no_grad():
        trace = x.call(poutine.trace(model).get_trace)
    observed = inspect_model(model, x).observed
    for name in observed:
        if trace.nodes[name]["value"] is x.primary:
            return name
    same = [n for n in observed if trace.nodes[n]["value"].numel() == x.primary.numel()]
    if len(same) == 1:
        return same[0]
    names = ", ".join(map(repr, observed))
    if not same:  # e.g. Pyro's CVAE example observes only the pixels it predicts
        raise PyrovaeError(f"no observed site of the model ({names}) scores the whole data tensor {tuple(x.primary.shape)}: there are no images of x to draw")
    raise PyrovaeError(f"the model observes {len(observed)} sites ({names}) and none is the data tensor itself: which one is x is ambiguous")


def why_no_images(model: Callable, x: Data) -> str | None:
    """Why draws of x cannot be shown for `model` (no observed site scores the data tensor), or None."""
    try:
        data_site(model, as_batch(x)[:2])
    except PyrovaeError as error:
        return str(error)
    return None


@torch.no_grad()
def sample(model: Callable, like: Data, num: int, given: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Means of p(x|z) for `num` draws z ~ p(z); `like` is one batch of data (for shapes, and the
    other arguments: a conditional model's condition is the first example's, repeated). Latent
    sites in `given` take those values (one per draw: M2's class y) instead of being drawn."""
    template = _repeated(like, num)
    return _observed_mean(model, template, given=given)


@torch.no_grad()
def draw(model: Callable, like: Data, num: int) -> torch.Tensor:
    """`num` draws of x itself (not its mean) from the model, z ~ p(z) then x ~ p(x|z); `like` as for `sample`."""
    template = _repeated(like, num)
    observed = data_site(model, template)
    trace = template.call(poutine.trace(poutine.uncondition(model)).get_trace)
    return trace.nodes[observed]["value"].reshape(template.primary.shape)


@torch.no_grad()
def sample_sequences(model: Callable, like: Data, num: int) -> torch.Tensor:
    """`num` draws of a sequence model's observed steps x_1, x_2, ... from the prior, stacked on
    dim 1, (num, T, *step shape); `like` gives the shapes and the other arguments (the first
    example's, repeated: its length)."""
    template = _repeated(like, num)
    observed = inspect_model(model, template).observed
    trace = template.call(poutine.trace(poutine.uncondition(model)).get_trace)
    return torch.stack([trace.nodes[name]["value"].reshape(num, -1) for name in observed], 1)


@torch.no_grad()
def prior_latents(model: Callable, sites: ModelSites, like: Data, num: int) -> Latents:
    """`num` draws of every latent site from the model's prior, (num, *shape) each; `like` as for `sample`."""
    template = _repeated(like, num)
    trace = template.call(poutine.trace(poutine.uncondition(model)).get_trace)
    return {name: trace.nodes[name]["value"].reshape((num,) + shape) for name, shape in sites.latents.items()}


@torch.no_grad()
def reconstruct(model: Callable, guide: Callable, x: Data) -> torch.Tensor:
    """Means of p(x|z) with z ~ q(z|x): the autoencoder's reconstruction of `x`."""
    batch = as_batch(x)
    return _observed_mean(model, batch, batch.call(poutine.trace(guide).get_trace))


@torch.no_grad()
def moments(guide: Callable, sites: ModelSites, x: Data, samples: int = 100) -> tuple[Latents, Latents]:
    """The guide's posterior mean and elementwise standard deviation of each latent site, each
    (B, *shape): its distribution's where it has them (Gaussian guides; a full-covariance one's
    marginal deviations), else those of `samples` draws (flows)."""
    batch = as_batch(x)
    trace = batch.call(poutine.trace(guide).get_trace)
    means: dict[str, torch.Tensor] = {}
    deviations: dict[str, torch.Tensor] = {}
    for name, shape in sites.latents.items():
        fn, drawn = trace.nodes[name]["fn"], None
        for result, closed, empirical in ((means, "mean", torch.mean), (deviations, "stddev", torch.std)):
            try:
                value = getattr(fn, closed)
            except NotImplementedError:
                if drawn is None:
                    drawn = torch.stack([batch.call(poutine.trace(guide).get_trace).nodes[name]["value"] for _ in range(samples)])
                value = empirical(drawn, 0)
            result[name] = value.reshape((-1,) + shape)
    return means, deviations


def encode(guide: Callable, sites: ModelSites, x: Data, samples: int = 100) -> Latents:
    """The guide's posterior mean of each latent site, (B, *shape) (`moments`)."""
    return moments(guide, sites, x, samples)[0]


@torch.no_grad()
def decode(model: Callable, sites: ModelSites, z: Latents, like: Data) -> torch.Tensor:
    """The mean of p(x | z) for each row of `z`; a model's other arguments (a label, a condition)
    come from the rows of `like`, repeated where `z` has more rows."""
    return decode_mean(model, sites, z, like)


def decode_mean(model: Callable, sites: ModelSites, z: Latents, like: Data) -> torch.Tensor:
    """`decode`, differentiable in the model's parameters and in `z` (for fine-tuning a decoder)."""
    rows = len(next(iter(z.values())))
    template = as_batch(like)
    if len(template) < rows:
        template = template[torch.arange(rows) % len(template)]
    template = template[:rows]
    conditioned = {name: v.reshape(sites.example_shape(rows) + sites.latents[name]) for name, v in z.items()}
    trace = template.call(poutine.trace(poutine.condition(model, data=conditioned)).get_trace)
    return trace.nodes[data_site(model, template)]["fn"].mean.reshape(template.primary.shape)


def interpolate(model: Callable, guide: Callable, sites: ModelSites, x1: torch.Tensor, x2: torch.Tensor, steps: int = 8) -> torch.Tensor:
    """Decodings of the straight line between the encodings of two examples, (steps, *x.shape)."""
    if steps < 2:
        raise PyrovaeError(f"an interpolation needs at least 2 steps, got {steps}")
    ends = encode(guide, sites, torch.stack([x1, x2]))
    weights = torch.linspace(0.0, 1.0, steps, device=x1.device)

    def line(z: torch.Tensor) -> torch.Tensor:
        w = weights.reshape((steps,) + (1,) * (z.dim() - 1))
        return z[0] * (1 - w) + z[1] * w

    return decode(model, sites, {name: line(v) for name, v in ends.items()}, like=x1[None].expand(steps, *x1.shape))


def traverse(model: Callable, guide: Callable, sites: ModelSites, x: torch.Tensor, steps: int = 9, span: float = 2.5,
             dims: int | None = None) -> torch.Tensor:
    """Latent traversals of one example (Higgins et al. 2017, fig. 1): its encoding with one
    coordinate of the (one, flat) latent site at a time moved over ``[-span, span]`` (the
    standard prior's bulk), the others kept; the decodings ``(dims, steps, *x.shape)`` of the
    first `dims` coordinates (all by default)."""
    (name,) = sites.latents
    if len(sites.latents[name]) != 1 or steps < 2:
        raise PyrovaeError(f"a traversal needs one flat latent site and at least 2 steps, got {sites.describe()} and {steps}")
    (size,) = sites.latents[name]
    dims = size if dims is None else min(dims, size)
    centre = encode(guide, sites, x[None])[name][0]
    z = centre.repeat(dims, steps, 1)
    values = torch.linspace(-span, span, steps, device=centre.device)
    for d in range(dims):
        z[d, :, d] = values
    return decode(model, sites, {name: z.reshape(dims * steps, size)}, like=x[None].expand(dims * steps, *x.shape)).reshape(dims, steps, *x.shape)
