"""Training objectives: the ELBO (sec. 2.2), its analytic-KL, enumerated and graph (baselined
score-function) forms, and the IWAE bound.

Every objective offers ``differentiable_loss(model, guide, *args, **kwargs)``: a scalar
estimate of minus the bound for the whole data set (minibatches scaled up exactly).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import pyro
import pyro.infer
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence

from pyrovae.errors import PyrovaeError
from pyrovae.files import first_line
from pyrovae.importance import PARTICLES, VECTORIZE_ERRORS, _per_example, apply_model_masks, log_weights
from pyrovae.registry import OBJECTIVES
from pyrovae.sites import DATA_PLATE

__all__ = ["FreeBitsELBO", "IWAE", "MaskedGraphELBO", "make_objective"]


class IWAE:
    """The importance-weighted bound of Burda et al. (2016), per example, with K samples.

    log p(x) >= E[log (1/K) sum_k p(x, z_k) / q(z_k|x)]; equals the ELBO at K = 1 and tightens
    with K (Kingma & Welling 2019, sec. 2.7). Gradients are pathwise, so every guide site must
    be reparameterizable.
    """

    def __init__(self, num_particles: int = 5, max_plate_nesting: int = 1, plate: str = DATA_PLATE) -> None:
        self.num_particles = num_particles
        self.max_plate_nesting = max_plate_nesting
        self.plate = plate

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        weights = log_weights(model, guide, self.num_particles, self.max_plate_nesting, *args, plate_name=self.plate, **kwargs)
        bound = torch.logsumexp(weights.values, 0) - math.log(self.num_particles)
        return -weights.data_scale * bound.sum()

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()


class ParticlesOrLoop:
    """Pyro's ELBO over K particles in one vectorized pass; for a program whose code cannot
    broadcast over the extra particle dimension, Pyro's own loop over the K particles from then
    on (the same estimator, K passes), said once through the logger ``"pyrovae"``."""

    def __init__(self, cls: type, num_particles: int, max_plate_nesting: int) -> None:
        self.cls, self.num_particles = cls, num_particles
        self.elbo = cls(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=max_plate_nesting)
        self.looped = False

    @property
    def max_plate_nesting(self) -> int:
        return self.elbo.max_plate_nesting

    @max_plate_nesting.setter
    def max_plate_nesting(self, value: int) -> None:
        self.elbo.max_plate_nesting = value

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.looped:
            return self.elbo.differentiable_loss(model, guide, *args, **kwargs)
        try:
            return self.elbo.differentiable_loss(model, guide, *args, **kwargs)
        except VECTORIZE_ERRORS as error:
            logging.getLogger("pyrovae").warning(
                "the program cannot run over a vectorized particle dimension (%s): its %d particles run one at a time",
                first_line(error), self.num_particles,
            )
            self.elbo = self.cls(num_particles=self.num_particles, vectorize_particles=False, max_plate_nesting=self.elbo.max_plate_nesting)
            self.looped = True
            return self.elbo.differentiable_loss(model, guide, *args, **kwargs)

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()


def _elbo(cls: type) -> Callable[..., Any]:
    def make(num_particles: int = 1, max_plate_nesting: int = 1, plate: str = DATA_PLATE) -> Any:
        if num_particles > 1:
            return ParticlesOrLoop(cls, num_particles, max_plate_nesting)
        return cls(num_particles=1, vectorize_particles=False, max_plate_nesting=max_plate_nesting)

    return make


class _ModelMasks:
    """Pyro's ELBO, with each guide site scored under the model's mask of it (`apply_model_masks`):
    on padded sequences a guide's entropy over the padding would otherwise enter the bound."""

    def _get_trace(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> tuple[Any, Any]:
        model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)  # type: ignore[misc]
        if apply_model_masks(model_trace, guide_trace):
            guide_trace.compute_score_parts()
        return model_trace, guide_trace


class MaskedTraceELBO(_ModelMasks, pyro.infer.Trace_ELBO):
    """`Trace_ELBO` honouring the model's masks on guide sites."""


class MaskedMeanFieldELBO(_ModelMasks, pyro.infer.TraceMeanField_ELBO):
    """`TraceMeanField_ELBO` honouring the model's masks on guide sites (its KL terms too)."""


class MaskedEnumELBO(_ModelMasks, pyro.infer.TraceEnum_ELBO):
    """`TraceEnum_ELBO` honouring the model's masks on guide sites."""


class MaskedGraphELBO(_ModelMasks, pyro.infer.TraceGraph_ELBO):
    """`TraceGraph_ELBO` honouring the model's masks on guide sites, as a differentiable loss.

    Its value is minus the ELBO; its gradient is that of Pyro's surrogate loss: each
    non-reparameterizable guide site's score function times its downstream cost only (Schulman
    et al. 2015), less the site's baseline (``infer={"baseline": ...}``: ``nn_baseline``,
    ``baseline_value``, ``use_decaying_avg_baseline``), plus the baselines' squared-error
    regression on those costs (Mnih & Gregor 2014). Pyro's class offers only
    ``loss_and_grads``, which steps no optimizer of ours; this exposes the same surrogate.
    """

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        elbo, surrogate = self._loss_and_surrogate_loss(model, guide, args, kwargs)
        return -torch.as_tensor(elbo).detach() + (surrogate - surrogate.detach())


OBJECTIVES.register("elbo", "Trace_ELBO: Monte Carlo ELBO with reparameterized samples (sec. 2.3)")(_elbo(MaskedTraceELBO))
OBJECTIVES.register("elbo-analytic", "TraceMeanField_ELBO: the ELBO with the KL term in closed form where known (sec. 2.4)")(
    _elbo(MaskedMeanFieldELBO)
)
OBJECTIVES.register("elbo-enum", "TraceEnum_ELBO: the ELBO with the model's enumerated discrete sites summed exactly (infer={'enumerate': 'parallel'})")(
    _elbo(MaskedEnumELBO)
)
OBJECTIVES.register("elbo-graph", "TraceGraph_ELBO: the ELBO with Rao-Blackwellized score-function gradients and the guide's baselines (infer={'baseline': ...}) for discrete guide sites")(
    _elbo(MaskedGraphELBO)
)
OBJECTIVES.register("iwae", "importance-weighted bound with K = --particles samples (Burda et al. 2016)")(IWAE)


class FreeBitsELBO:
    """The ELBO with free bits: each latent site's KL is replaced by max(lambda, its minibatch mean).

    Per minibatch of B examples, the bound is
    sum_i E_q[log p(x_i|z)] - B sum_s max(lambda, (1/B) sum_i KL_s(x_i)),
    where KL_s(x_i) is log q(z_s|.) - log p(z_s|.) at the guide's sample (a Monte Carlo estimate,
    averaged over the particles), or the closed form KL(q_s || p_s) given the other sites'
    samples when `analytic` and torch knows it. A group (site) whose KL is below lambda gets no
    gradient from its KL term, so the encoder is not pushed to switch it off (posterior
    collapse, Kingma & Welling 2019, sec. 2.8). Groups are latent sites. Minibatches are
    scaled to the data set exactly (the data plate's N / B); site scales other than the
    subsample scale (KL warm-up's beta) multiply the clamped KL terms.

    References:
        Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling (2016), Improving Variational
        Inference with Inverse Autoregressive Flow, appendix C.8 ("free bits");
        Kingma & Welling (2019), sec. 2.8.
    """

    def __init__(self, free_bits: float, num_particles: int = 1, max_plate_nesting: int = 1, analytic: bool = False, plate: str = DATA_PLATE) -> None:
        if free_bits < 0:
            raise PyrovaeError(f"--free-bits must be >= 0, got {free_bits}")
        self.free_bits = float(free_bits)
        self.num_particles = num_particles
        self.max_plate_nesting = max_plate_nesting
        self.analytic = analytic
        self.plate = plate

    def terms(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float], float]:
        """Per-example reconstruction (B,), per-site per-example KL (B,), per-site scales, and N / B."""
        k, particle_dim = self.num_particles, -(self.max_plate_nesting + 1)
        with pyro.plate(PARTICLES, k, dim=particle_dim):
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        data_scale = 1.0
        for site in model_trace.nodes.values():
            frame = next((f for f in site.get("cond_indep_stack", ()) if f.name == self.plate), None)
            if site["type"] == "sample" and frame is not None:
                data_scale = frame.full_size / frame.size

        def per_example(site: dict, value: torch.Tensor) -> torch.Tensor:
            return _per_example({**site, "log_prob": value}, particle_dim, k, self.plate).mean(0)

        reconstruction: torch.Tensor | float = 0.0
        kls: dict[str, torch.Tensor] = {}
        scales: dict[str, float] = {}
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            scale = site["scale"] / data_scale
            if site["is_observed"]:
                reconstruction = reconstruction + scale * per_example(site, _masked(site, site["fn"].log_prob(site["value"])))
                continue
            q_site = guide_trace.nodes[name]
            kl = None
            if self.analytic:
                try:
                    kl = kl_divergence(q_site["fn"], site["fn"])
                except NotImplementedError:
                    kl = None
            if kl is None:
                kl = q_site["fn"].log_prob(q_site["value"]) - site["fn"].log_prob(site["value"])
            kls[name] = per_example(site, _masked(site, kl))
            scales[name] = float(scale)
        if not torch.is_tensor(reconstruction):
            raise PyrovaeError("the model observes nothing")
        return reconstruction, kls, scales, data_scale

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        reconstruction, kls, scales, data_scale = self.terms(model, guide, *args, **kwargs)
        batch = len(reconstruction)
        bound = reconstruction.sum()
        for name, kl in kls.items():
            bound = bound - batch * scales[name] * torch.clamp(kl.mean(), min=self.free_bits)
        return -data_scale * bound

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()


def _masked(site: dict, value: torch.Tensor) -> torch.Tensor:
    """`value` with the model site's masked positions zeroed: they add nothing to any bound."""
    mask = site.get("mask")
    return value if mask is None or mask is True else torch.where(mask, value, torch.zeros_like(value))


def make_objective(name: str, num_particles: int = 1, max_plate_nesting: int = 1, free_bits: float = 0.0, plate: str = DATA_PLATE) -> Any:
    """The objective registered as `name`, ready for `differentiable_loss`.

    With `free_bits` > 0 the ELBO objectives become `FreeBitsELBO` (the analytic KL per site
    where known for ``elbo-analytic``); the IWAE bound has no KL term to clamp and refuses.
    """
    if num_particles < 1:
        raise PyrovaeError(f"--particles must be at least 1, got {num_particles}")
    if free_bits < 0:
        raise PyrovaeError(f"--free-bits must be >= 0, got {free_bits}")
    if free_bits > 0:
        OBJECTIVES.get(name)  # unknown names fail as usual
        if name not in ("elbo", "elbo-analytic"):
            raise PyrovaeError(f"--free-bits clamps the KL terms of the ELBO: use --objective elbo or elbo-analytic, not {name!r}")
        return FreeBitsELBO(free_bits, num_particles, max_plate_nesting, analytic=name == "elbo-analytic", plate=plate)
    return OBJECTIVES.get(name)(num_particles=num_particles, max_plate_nesting=max_plate_nesting, plate=plate)

