"""Training objectives: the ELBO (sec. 2.2), its analytic-KL, enumerated and graph (baselined
score-function) forms, the IWAE bound, and the beta-TCVAE and DIP-VAE objectives.

Every objective offers ``differentiable_loss(model, guide, *args, **kwargs)``: a scalar
estimate of minus the bound for the whole data set (minibatches scaled up exactly).
"""

from __future__ import annotations

import inspect
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

from pyrovae.config import check_number
from pyrovae.errors import PyrovaeError
from pyrovae.files import first_line
from pyrovae.importance import PARTICLES, VECTORIZE_ERRORS, _per_example, apply_model_masks, log_weights
from pyrovae.registry import OBJECTIVES
from pyrovae.sites import DATA_PLATE

__all__ = ["DIPVAE", "FreeBitsELBO", "IWAE", "MaskedGraphELBO", "TCVAE", "make_objective", "total_correlation"]


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


class _WrapsELBO:
    """An objective around a Pyro ELBO ``self.elbo``: its plate nesting is the ELBO's (a method's
    `prepare` may raise it), and `loss` is the value of `differentiable_loss`."""

    elbo: Any

    @property
    def max_plate_nesting(self) -> int:
        return self.elbo.max_plate_nesting

    @max_plate_nesting.setter
    def max_plate_nesting(self, value: int) -> None:
        self.elbo.max_plate_nesting = value

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()


class ParticlesOrLoop(_WrapsELBO):
    """Pyro's ELBO over K particles in one vectorized pass; for a program whose code cannot
    broadcast over the extra particle dimension, Pyro's own loop over the K particles from then
    on (the same estimator, K passes), said once through the logger ``"pyrovae"``."""

    def __init__(self, cls: type, num_particles: int, max_plate_nesting: int) -> None:
        self.cls, self.num_particles = cls, num_particles
        self.elbo = cls(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=max_plate_nesting)
        self.looped = False

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


def total_correlation(pairs: torch.Tensor) -> torch.Tensor:
    """Per-example minibatch estimate of log q(z_i) - sum_d log q(z_id), the total correlation
    of the aggregate posterior q(z) = (1/N) sum_n q(z|x_n) at each sample z_i.

    `pairs[i, j, d]` is log q(z_id | x_j) for the B samples z_i of a minibatch of B examples;
    q(z_i) ~ (1/B) sum_j q(z_i | x_j), and likewise each marginal: exact for the whole data
    set as one batch, consistent as B grows (biased up by the sample's own term). Chen et al.'s
    code divides by N B instead of B, which moves the TC by the constant (D - 1) log N (the
    same gradients, but a TC of a factorized q(z) no longer 0): here the value is the TC's.

    References:
        Chen, Li, Grosse & Duvenaud (2018), Isolating Sources of Disentanglement in VAEs, sec. 3
        and appendix C.1 (minibatch-weighted sampling).
    """
    log_b = math.log(pairs.shape[1])
    joint = torch.logsumexp(pairs.sum(-1), dim=1) - log_b
    marginals = (torch.logsumexp(pairs, dim=1) - log_b).sum(-1)
    return joint - marginals


class _ShapedELBO(_WrapsELBO):
    """The ELBO (one draw per example) plus a term read off the guide's trace at the ELBO's own
    draw: `term(guide_trace)` returns it for the minibatch and the plate's N / B."""

    name = ""

    def __init__(self, num_particles: int, max_plate_nesting: int, plate: str) -> None:
        if num_particles != 1:
            raise PyrovaeError(f"--objective {self.name} takes one sample per example (its term is a minibatch statistic of the draws), "
                               f"got --particles {num_particles}")
        self.plate = plate
        self.elbo = MaskedTraceELBO(num_particles=1, max_plate_nesting=max_plate_nesting)

    def term(self, guide_trace: Any) -> tuple[torch.Tensor, float]:
        raise NotImplementedError

    def latent_sites(self, guide_trace: Any) -> list[tuple[str, dict, Any]]:
        """(name, site, its frame of the per-example plate) of every latent site of the guide."""
        sites = [(name, site, next((f for f in site["cond_indep_stack"] if f.name == self.plate), None))
                 for name, site in guide_trace.nodes.items()
                 if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)]
        if not sites:
            raise PyrovaeError(f"--objective {self.name}: the guide samples no latent site")
        return sites

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        loss = self.elbo.differentiable_loss(model, poutine.replay(guide, trace=guide_trace), *args, **kwargs)
        term, scale = self.term(guide_trace)
        return loss + scale * term


@OBJECTIVES.register("tcvae", "beta-TCVAE: the ELBO less (beta - 1) times the total correlation of q(z) (Chen et al. 2018); "
                     "--objective-option beta=6")
class TCVAE(_ShapedELBO):
    """The ELBO with the total-correlation term of its KL decomposition weighted by `beta`:
    E[log p(x|z)] - I(x; z) - beta TC(z) - sum_d KL(q(z_d) || p(z_d)) = ELBO - (beta - 1) TC,
    with TC estimated by minibatch-weighted sampling (`total_correlation`) at the ELBO's own
    sample. beta = 1 is the ELBO exactly. Every latent site must be per-example, continuous and
    factorized in the guide (an ``Independent`` of univariate distributions, as the diagonal
    guide's), since the estimator needs each dimension's density under every example's q.

    References:
        Chen, Li, Grosse & Duvenaud (2018), Isolating Sources of Disentanglement in Variational
        Autoencoders, NeurIPS, sec. 3 (the decomposition, beta-TCVAE).
    """

    name = "tcvae"

    def __init__(self, num_particles: int = 1, max_plate_nesting: int = 1, plate: str = DATA_PLATE, beta: float = 6.0) -> None:
        super().__init__(num_particles, max_plate_nesting, plate)
        self.beta = check_number("tcvae", "beta", beta, positive=False)

    def pairs(self, guide_trace: Any) -> tuple[torch.Tensor, float]:
        """log q(z_id | x_j) ``(B, B, D)`` over the guide's latent sites, and the plate's N / B."""
        columns, scale = [], 1.0
        for name, site, frame in self.latent_sites(guide_trace):
            fn = site["fn"]
            base = fn.base_dist if isinstance(fn, torch.distributions.Independent) else fn
            if frame is None or base.event_shape != () or not fn.has_rsample or site.get("mask") is not None:
                raise PyrovaeError(f"--objective tcvae needs every latent site per-example, unmasked and factorized in the guide "
                                   f"(an Independent of univariate, reparameterized distributions); {name!r} is {type(fn).__name__}")
            batch = site["value"].shape[: site["value"].dim() - fn.event_dim]
            if batch != (frame.size,):
                raise PyrovaeError(f"--objective tcvae: site {name!r} has batch shape {tuple(batch)}, not the plate's ({frame.size},)")
            value = site["value"].reshape(frame.size, 1, *site["value"].shape[1:])
            columns.append(base.log_prob(value).reshape(frame.size, frame.size, -1))
            scale = frame.full_size / frame.size
        return torch.cat(columns, -1), scale

    def term(self, guide_trace: Any) -> tuple[torch.Tensor, float]:
        if self.beta == 1.0:
            return torch.zeros(()), 1.0
        pairs, scale = self.pairs(guide_trace)
        return (self.beta - 1.0) * total_correlation(pairs).sum(), scale


@OBJECTIVES.register("dip-vae", "DIP-VAE-I: the ELBO less a penalty pulling the covariance of the encoder's means to the identity "
                     "(Kumar et al. 2018); --objective-option lambda_od=10")
class DIPVAE(_ShapedELBO):
    """The ELBO less lambda_od sum_{i != j} C_ij^2 + lambda_d sum_i (C_ii - 1)^2 for every
    example, C the covariance over the minibatch of the guide's means E_q[z|x] (all latent
    sites, flattened): the aggregate posterior's moments are matched to the standard prior's.
    The penalty is a minibatch statistic, so its gradient is that of a minibatch estimate.

    References:
        Kumar, Sattigeri & Balakrishnan (2018), Variational Inference of Disentangled Latent
        Concepts from Unlabeled Observations, ICLR, sec. 3 (DIP-VAE-I, lambda_d = 10 lambda_od).
    """

    name = "dip-vae"

    def __init__(self, num_particles: int = 1, max_plate_nesting: int = 1, plate: str = DATA_PLATE, lambda_od: float = 10.0,
                 lambda_d: float | None = None) -> None:
        super().__init__(num_particles, max_plate_nesting, plate)
        self.lambda_od = check_number("dip-vae", "lambda_od", lambda_od, positive=False)
        self.lambda_d = 10.0 * self.lambda_od if lambda_d is None else check_number("dip-vae", "lambda_d", lambda_d, positive=False)

    def penalty(self, guide_trace: Any) -> tuple[torch.Tensor, float, int]:
        """The penalty, the plate's N / B and B, from the means of the guide's latent sites."""
        means, scale, batch = [], 1.0, 0
        for name, site, frame in self.latent_sites(guide_trace):
            try:
                mean = site["fn"].mean
            except NotImplementedError:
                mean = None
            if frame is None or mean is None or mean.shape[: mean.dim() - site["fn"].event_dim] != (frame.size,):
                raise PyrovaeError(f"--objective dip-vae needs a per-example latent site with a mean in the guide; {name!r} has none")
            means.append(mean.reshape(frame.size, -1))
            scale, batch = frame.full_size / frame.size, frame.size
        centred = torch.cat(means, -1)
        centred = centred - centred.mean(0)
        cov = centred.T @ centred / batch
        off = cov - torch.diag_embed(cov.diagonal())
        return self.lambda_od * off.pow(2).sum() + self.lambda_d * (cov.diagonal() - 1).pow(2).sum(), scale, batch

    def term(self, guide_trace: Any) -> tuple[torch.Tensor, float]:
        penalty, scale, batch = self.penalty(guide_trace)
        return batch * penalty, scale  # the penalty counts once per example


def _masked(site: dict, value: torch.Tensor) -> torch.Tensor:
    """`value` with the model site's masked positions zeroed: they add nothing to any bound."""
    mask = site.get("mask")
    return value if mask is None or mask is True else torch.where(mask, value, torch.zeros_like(value))


def make_objective(name: str, num_particles: int = 1, max_plate_nesting: int = 1, free_bits: float = 0.0, plate: str = DATA_PLATE,
                   options: dict[str, Any] | None = None) -> Any:
    """The objective registered as `name`, ready for `differentiable_loss`.

    With `free_bits` > 0 the ELBO objectives become `FreeBitsELBO` (the analytic KL per site
    where known for ``elbo-analytic``); the IWAE bound has no KL term to clamp and refuses.
    `options` are the objective's own (``--objective-option``: tcvae's ``beta``).
    """
    if num_particles < 1:
        raise PyrovaeError(f"--particles must be at least 1, got {num_particles}")
    if free_bits < 0:
        raise PyrovaeError(f"--free-bits must be >= 0, got {free_bits}")
    options = options or {}
    if options:
        factory = OBJECTIVES.get(name)
        own = [p for p in inspect.signature(factory).parameters if p not in ("num_particles", "max_plate_nesting", "plate")]
        unknown = [k for k in options if k not in own]
        if unknown:
            raise PyrovaeError(f"unknown --objective-option {unknown[0]!r} for {name!r}; it takes: {', '.join(own) or 'no options'}")
    if free_bits > 0:
        OBJECTIVES.get(name)  # unknown names fail as usual
        if name not in ("elbo", "elbo-analytic"):
            raise PyrovaeError(f"--free-bits clamps the KL terms of the ELBO: use --objective elbo or elbo-analytic, not {name!r}")
        return FreeBitsELBO(free_bits, num_particles, max_plate_nesting, analytic=name == "elbo-analytic", plate=plate)
    return OBJECTIVES.get(name)(num_particles=num_particles, max_plate_nesting=max_plate_nesting, plate=plate, **options)

