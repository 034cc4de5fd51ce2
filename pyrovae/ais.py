"""Annealed importance sampling of log p(x) per example, and bidirectional Monte Carlo.

AIS (Neal 2001) moves K chains per example along the geometric path

    log g_b(z) = log q0(z) + b [log p(x, z) - log q0(z)],   0 = b_0 < b_1 < ... < b_T = 1,

from a normalized start q0 (the prior p(z), or a guide q(z|x)) to the posterior, one HMC
transition leaving g_{b_t} invariant per step, and weighs each chain by
sum_t (b_t - b_{t-1}) [log p(x, z_{t-1}) - log q0(z_{t-1})]. The log of the mean weight is a
stochastic lower bound on log p(x) that tightens as T grows, whatever the decoder; it scores
decoders trained by any method with one estimator (Wu et al. 2017, "On the quantitative
analysis of decoder-based generative models").

Bidirectional Monte Carlo (Grosse, Ghahramani & Adams 2015) sandwiches log p(x) on data
simulated from the model: forward AIS bounds it from below, and AIS run backward from the
exact z that generated x (an exact posterior sample) gives -log of an unbiased estimate of
1 / p(x), a stochastic upper bound. The width of the sandwich says how tight AIS is there.

Why not Pyro's `HMC` kernel: it runs one chain over the joint latent of whatever it is given
(one step size and one accept/reject for all examples), and its adaptation runs inside each
call. Here every example's chains are accepted on their own energies with Pyro's
`velocity_verlet` integrator, vectorized over examples and chains; step sizes are adapted per
example in a separate warm-up run and then frozen, so the kernels of the scoring run depend on
no state of its own chains and the weights stay unbiased.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.ops.integrator import potential_grad, velocity_verlet
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to

from pyrovae.batch import Batch, Data, as_batch
from pyrovae.enumeration import weights_for
from pyrovae.errors import PyrovaeError
from pyrovae.guides.local import LocalGaussian
from pyrovae.importance import per_example_log_prob
from pyrovae.infer.local import frozen
from pyrovae.protocols import model_traits
from pyrovae.sampling import data_site
from pyrovae.sites import ModelSites, inspect_model, primary

__all__ = ["AISResult", "AISSettings", "BDMCResult", "ais", "bdmc", "sigmoid_schedule", "simulate", "unannealable"]


@dataclass(frozen=True)
class AISSettings:
    """T annealing steps, K chains per example, L leapfrog steps per HMC transition.

    `warmup` steps of a separate AIS run adapt each example's step size towards
    `target_accept` (Robbins-Monro on the log step size); the scoring run then uses the step
    size the warm-up had at the nearest temperature. `start` is ``"prior"`` or ``"guide"``.
    """

    steps: int = 500
    chains: int = 16
    leapfrog: int = 10
    warmup: int = 100
    step_size: float = 0.1
    target_accept: float = 0.65
    adapt_rate: float = 0.5
    start: str = "prior"
    max_elements: int = 2**22

    def check(self) -> None:
        if self.steps < 1 or self.chains < 1 or self.leapfrog < 1 or self.warmup < 0:
            raise PyrovaeError(f"--ais-steps, --chains and --leapfrog must be positive and the warm-up not negative (got {self.steps}, {self.chains}, {self.leapfrog}, {self.warmup})")
        if self.start not in ("prior", "guide"):
            raise PyrovaeError(f"--ais-start must be 'prior' or 'guide', got {self.start!r}")
        if not 0 < self.target_accept < 1 or self.step_size <= 0:
            raise PyrovaeError(f"the AIS target acceptance must lie in (0, 1) and the step size be positive (got {self.target_accept}, {self.step_size})")


@dataclass
class AISResult:
    """`log_weights[i, k]`: chain k's log-weight for example i; `log_likelihood`: their log-mean-exp."""

    log_weights: torch.Tensor
    accept_rate: float
    step_size: torch.Tensor
    settings: AISSettings

    @property
    def log_likelihood(self) -> torch.Tensor:
        return torch.logsumexp(self.log_weights, -1) - math.log(self.log_weights.shape[-1])

    @property
    def stderr(self) -> torch.Tensor:
        """Per-example Monte Carlo standard error of `log_likelihood` (delta method on the mean
        weight; 0 with one chain, where it cannot be estimated)."""
        k = self.log_weights.shape[-1]
        if k < 2:
            return torch.zeros(len(self.log_weights))
        w = torch.exp(self.log_weights - self.log_weights.max(-1, keepdim=True).values)
        return w.std(-1) / w.mean(-1) / math.sqrt(k)

    def summary(self) -> dict[str, Any]:
        ll = self.log_likelihood
        return {
            "examples": len(ll), "log_likelihood": ll.mean().item(),
            "stderr": (self.stderr.pow(2).sum().sqrt() / len(ll)).item(),
            "ais_steps": self.settings.steps, "chains": self.settings.chains, "leapfrog": self.settings.leapfrog,
            "start": self.settings.start, "accept_rate": self.accept_rate,
        }


@dataclass
class BDMCResult:
    """Per-example stochastic lower (forward AIS) and upper (reverse AIS) bounds on log p(x) of simulated data."""

    lower: torch.Tensor
    upper: torch.Tensor
    settings: AISSettings

    @property
    def width(self) -> torch.Tensor:
        return self.upper - self.lower

    def summary(self) -> dict[str, Any]:
        return {
            "examples": len(self.lower), "lower": self.lower.mean().item(), "upper": self.upper.mean().item(),
            "width": self.width.mean().item(), "ais_steps": self.settings.steps, "chains": self.settings.chains,
        }


def sigmoid_schedule(steps: int, delta: float = 4.0) -> torch.Tensor:
    """b_0 = 0 < ... < b_T = 1, dense at both ends (Grosse et al. 2015, sec. 4.1), float64."""
    if steps == 1:
        return torch.tensor([0.0, 1.0], dtype=torch.float64)
    s = torch.sigmoid(delta * torch.linspace(-1.0, 1.0, steps + 1, dtype=torch.float64))
    return (s - s[0]) / (s[-1] - s[0])


class _Unobserved(Messenger):
    """Masks the observed sites: the model's log-density becomes its prior's, log p(z)."""

    def _process_message(self, msg: Any) -> None:
        if msg["type"] == "sample" and msg["is_observed"]:
            msg["mask"] = False


class _Path:
    """The annealing path's two terms for the rows of one chunk (examples repeated K times):
    `terms(u) = (log p(x, z) - log q0(z), log q0(z) + log|dz/du|)` per row, for the flat
    unconstrained latents u (R, D), z = biject_to(support)(u) per site."""

    def __init__(self, model: Callable, guide: Callable | None, sites: ModelSites, batch: Batch) -> None:
        self.model, self.guide, self.sites, self.batch = model, guide, sites, batch
        self.args, self.kwargs = batch.call_args()
        self.names = list(sites.latents)
        self.shapes = [sites.real_shape(name) for name in self.names]
        self.transforms = [biject_to(sites.supports[name]) if name in sites.supports else None for name in self.names]
        self.weights = weights_for(sites) if sites.enumerated else None
        self.guide_shapes: dict[str, torch.Size] = {}

    def constrained(self, u: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        values, log_det, start = {}, u.new_zeros(len(u)), 0
        for name, shape, transform in zip(self.names, self.shapes, self.transforms):
            size = math.prod(shape)
            part = u[:, start : start + size].reshape((len(u),) + shape)
            start += size
            z = part if transform is None else transform(part)
            if transform is not None:
                log_det = log_det + transform.log_abs_det_jacobian(part, z).reshape(len(u), -1).sum(-1)
            values[name] = z
        return values, log_det

    def unconstrained(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        flat, rows = [], len(self.batch)
        for name, transform in zip(self.names, self.transforms):
            shape = self.sites.latents[name]
            if values[name].numel() != rows * math.prod(shape):
                raise PyrovaeError(f"latent {name!r} has {values[name].numel() // rows} values per example beside its event shape {tuple(shape)} (a plate inside the per-example one): AIS anneals one event per example")
            z = values[name].reshape((rows,) + shape)
            flat.append((z if transform is None else transform.inv(z)).reshape(len(z), -1))
        return torch.cat(flat, -1)

    def _point(self, values: dict[str, torch.Tensor]) -> Callable:
        sites = self.sites

        def point(*args: Any, **kwargs: Any) -> None:
            with sites.plate_for(primary(args, kwargs)):
                for name, value in values.items():
                    shape = sites.latents[name]
                    pyro.sample(name, dist.Delta(value.reshape(sites.example_shape(len(value)) + shape), event_dim=len(shape)))

        return point

    def _log_densities(self, values: dict[str, torch.Tensor], prior: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log p(x, z) and, if asked, log p(z), per row."""
        nesting, plate = self.sites.max_plate_nesting, self.sites.plate
        point = self._point(values)
        if self.weights is not None:  # enumerated sites summed out: two contractions
            def summed(model: Callable) -> torch.Tensor:
                assert self.weights is not None
                return self.weights(model, point, 1, nesting, *self.args, plate_name=plate, vectorize=False, **self.kwargs).values[0]

            return summed(self.model), (summed(_Unobserved()(self.model)) if prior else None)
        guide_trace = poutine.trace(point).get_trace(*self.args, **self.kwargs)
        trace = poutine.trace(poutine.replay(self.model, trace=guide_trace)).get_trace(*self.args, **self.kwargs)
        trace.compute_log_prob(lambda name, site: not site_is_subsample(site))
        joint: torch.Tensor | float = 0.0
        latent: torch.Tensor | float = 0.0
        for site in trace.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            term = per_example_log_prob(site, nesting, plate)
            joint = joint + term
            if not site["is_observed"]:
                latent = latent + term
        return torch.as_tensor(joint), (torch.as_tensor(latent) if prior else None)

    def _guide_log_prob(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        assert self.guide is not None
        shaped = {name: v.reshape(self.guide_shapes[name]) for name, v in values.items()}
        trace = poutine.trace(poutine.condition(self.guide, data=shaped)).get_trace(*self.args, **self.kwargs)
        trace.compute_log_prob(lambda name, site: not site_is_subsample(site))
        total: torch.Tensor | float = 0.0
        for site in trace.nodes.values():
            if site["type"] == "sample" and not site_is_subsample(site) and site["name"] in values:
                total = total + per_example_log_prob(site, self.sites.max_plate_nesting, self.sites.plate)
        return torch.as_tensor(total)

    def terms(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, log_det = self.constrained(u)
        if self.guide is None:
            joint, latent = self._log_densities(values, prior=True)
            assert latent is not None
            return joint - latent, latent + log_det
        joint, _ = self._log_densities(values, prior=False)
        start = self._guide_log_prob(values)
        return joint - start, start + log_det

    @torch.no_grad()
    def initial(self) -> torch.Tensor:
        """u_0 ~ q0 for every row."""
        if self.guide is None:
            trace = poutine.trace(self.model).get_trace(*self.args, **self.kwargs)
        else:
            trace = poutine.trace(self.guide).get_trace(*self.args, **self.kwargs)
            extra = [n for n, s in trace.nodes.items() if s["type"] == "sample" and not site_is_subsample(s) and n not in self.sites.latents]
            missing = [n for n in self.names if n not in trace.nodes]
            if extra or missing:
                raise PyrovaeError(
                    f"AIS from the guide needs a guide over exactly the model's latents (it has {', '.join(map(repr, extra)) or 'none'} beside them, "
                    f"misses {', '.join(map(repr, missing)) or 'none'}): its density q(z|x) must be computable at any z; use --ais-start prior"
                )
        values: dict[str, torch.Tensor] = {name: trace.nodes[name]["value"] for name in self.names}  # type: ignore[misc]
        if self.guide is not None:
            self.guide_shapes = {name: value.shape for name, value in values.items()}
        return self.unconstrained(values)


def _transition(path: _Path, beta: float, u: torch.Tensor, terms: tuple[torch.Tensor, torch.Tensor], step: torch.Tensor, leapfrog: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One HMC transition per row leaving g_beta invariant (identity mass matrix); returns the
    new states, their path terms and the acceptance probabilities."""
    last: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def potential(state: dict[str, torch.Tensor]) -> torch.Tensor:
        a, b = path.terms(state["u"])
        last["terms"] = (a.detach(), b.detach())
        return -(b + beta * a).sum()

    # the gradient in u is needed also where the caller scores under no_grad; a leapfrog path that
    # overflows (Pyro warns of NaN log-densities) is rejected below, as HMC rejects any divergence
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Encountered NaN")
        grads, _ = potential_grad(potential, {"u": u.detach()})
        r0 = torch.randn_like(u)
        u1, r1, _, _ = velocity_verlet({"u": u.detach()}, {"u": r0}, potential, lambda r: r, step[:, None], leapfrog, grads)
    a1, b1 = last["terms"]
    h0 = -(terms[1] + beta * terms[0]) + 0.5 * r0.pow(2).sum(-1)
    h1 = -(b1 + beta * a1) + 0.5 * r1["u"].pow(2).sum(-1)
    delta = torch.where(torch.isfinite(h1 - h0), h1 - h0, torch.full_like(h0, math.inf))
    prob = torch.exp(-delta.clamp_min(0))
    accept = torch.rand_like(prob) < prob
    new_u = torch.where(accept[:, None], u1["u"].detach(), u)
    new_terms = (torch.where(accept, a1, terms[0]), torch.where(accept, b1, terms[1]))
    return new_u, new_terms, prob


def _anneal(path: _Path, u: torch.Tensor, betas: torch.Tensor, log_step: Callable[[float], torch.Tensor], settings: AISSettings,
            adapt: torch.Tensor | None = None) -> tuple[torch.Tensor, float, list[torch.Tensor]]:
    """Run the chains u (R, D) along `betas`; returns the log-weights (R,), the mean acceptance
    and, if `adapt` (per-example log step sizes, updated in place) is given, its value at each step."""
    k = settings.chains
    with torch.no_grad():
        terms = path.terms(u)
    log_w = torch.zeros(len(u), dtype=torch.float64, device=u.device)
    accepted, trail = [], []
    for t in range(1, len(betas)):
        log_w = log_w + (betas[t] - betas[t - 1]) * terms[0].double()
        if t == len(betas) - 1 and adapt is None:
            break  # the last transition changes no weight
        step = (adapt if adapt is not None else log_step(float(betas[t]))).exp().repeat_interleave(k)
        u, terms, prob = _transition(path, float(betas[t]), u, terms, step, settings.leapfrog)
        accepted.append(prob.mean().item())
        if adapt is not None:
            per_example = prob.reshape(-1, k).mean(-1)
            adapt += settings.adapt_rate * (per_example - settings.target_accept)
            trail.append(adapt.clone())
    if not torch.isfinite(log_w).all():
        raise PyrovaeError("non-finite AIS weights: the model gives no density at the start's draws, or its parameters diverged")
    return log_w, (sum(accepted) / len(accepted) if accepted else float("nan")), trail


def _warmed_step_sizes(path: _Path, examples: int, settings: AISSettings) -> Callable[[float], torch.Tensor]:
    """Per-example log step sizes as a function of the temperature, from a warm-up AIS run."""
    log_step = torch.full((examples,), math.log(settings.step_size), device=path.batch.device)
    if settings.warmup == 0:
        return lambda beta: log_step
    betas = sigmoid_schedule(settings.warmup)
    _, _, trail = _anneal(path, path.initial(), betas, lambda beta: log_step, settings, adapt=log_step)
    grid = betas[1:]
    return lambda beta: trail[int((grid - beta).abs().argmin())]


def unannealable(sites: ModelSites) -> str | None:
    """Why AIS cannot score a model with these sites, in one line; None where it can."""
    if sites.subsampled:
        return f"{sites.subsampled}: AIS needs every example it is given; remove subsample_size"
    if sites.global_latents:
        return f"the model has global latent(s) {', '.join(map(repr, sites.global_latents))}: log p(x) does not factor per example, so AIS has no per-example target"
    bad = {n: why for n, why in sites.unservable(discrete=True).items() if n in sites.latents}
    if bad:
        return f"AIS moves continuous latents by HMC; {', '.join(f'{n!r} is {w}' for n, w in bad.items())}: mark it infer={{'enumerate': 'parallel'}} to sum it out"
    if not sites.latents:
        return "the model has no continuous latents to anneal over: its log p(x) is exact (use --estimator is)"
    return None


def _prepare(model: Callable, guide: Callable | None, data: Data, settings: AISSettings, plate: str | None) -> tuple[Batch, ModelSites, Callable | None]:
    settings.check()
    batch = as_batch(data)
    if len(batch) == 0:
        raise PyrovaeError("nothing to evaluate: the data split is empty")
    sites = inspect_model(model, batch, plate=plate)
    why = unannealable(sites)
    if why:
        raise PyrovaeError(why)
    if settings.start == "guide":
        if guide is None:
            raise PyrovaeError("AIS from the guide needs a guide: this run has none (use --ais-start prior)")
        if isinstance(guide, LocalGaussian):
            raise PyrovaeError("AIS from the guide needs an amortized guide q(z|x); a per-example guide is tied to its training rows (use --ais-start prior)")
    return batch, sites, (guide if settings.start == "guide" else None)


def _chunks(model: Callable, batch: Batch, settings: AISSettings) -> int:
    width = model_traits(model).elements_per_sample or math.prod(batch.primary.shape[1:]) or 1
    return max(1, settings.max_elements // (width * settings.chains))


def ais(model: Callable, data: Data, guide: Callable | None = None, settings: AISSettings = AISSettings(), plate: str | None = None,
        progress: Callable[[int], None] | None = None) -> AISResult:
    """AIS estimates of log p(x_i) for each example of `data` (nats; higher is better).

    Args:
        model: any Pyro model whose continuous latents sit in the per-example plate (sites on
            constrained supports are annealed on the reals through `biject_to`; discrete sites
            must be enumerated, and are then summed out exactly in every density).
        data: a tensor, a tuple of positional or a dict of keyword arguments, or a `Batch`.
        guide: the start q0(z|x) when ``settings.start == "guide"``: an amortized guide over
            exactly the model's latents, whose density can be evaluated anywhere.
        plate: the per-example plate (`pyrovae.sites.inspect_model`).
        progress: called with the number of examples finished after each chunk.

    Model parameters are not changed; the chains run in chunks of examples sized by
    `settings.max_elements`.
    """
    batch, sites, start = _prepare(model, guide, data, settings, plate)
    per_chunk = _chunks(model, batch, settings)
    parts, steps, rates = [], [], []
    betas = sigmoid_schedule(settings.steps)
    with frozen(model, start):  # gradients in z only: none through the parameters
        for first in range(0, len(batch), per_chunk):
            chunk = batch[first : first + per_chunk]
            path = _Path(model, start, sites, _repeat(chunk, settings.chains))
            log_step = _warmed_step_sizes(path, len(chunk), settings)
            log_w, rate, _ = _anneal(path, path.initial(), betas, log_step, settings)
            parts.append(log_w.reshape(len(chunk), settings.chains))
            steps.append(log_step(1.0).exp())
            rates.append(rate * len(chunk))
            if progress:
                progress(len(chunk))
    return AISResult(torch.cat(parts).float(), sum(rates) / len(batch), torch.cat(steps), settings)


def _repeat(batch: Batch, k: int) -> Batch:
    """Each example's rows repeated K times, example-major: the chains of example i are rows i*K .. i*K + K - 1."""
    return batch[torch.arange(len(batch), device=batch.device).repeat_interleave(k)]


@torch.no_grad()
def simulate(model: Callable, like: Data, plate: str | None = None) -> tuple[Batch, dict[str, torch.Tensor]]:
    """(x, z) ~ p(x, z): the batch `like` with its data tensor replaced by the model's draw, and
    the latents that drew it (an exact posterior sample for that x). The other arguments (a
    condition, a label) are kept as they are."""
    batch = as_batch(like)
    sites = inspect_model(model, batch, plate=plate)
    trace = batch.call(poutine.trace(poutine.uncondition(model)).get_trace)
    observed = data_site(model, batch)
    x = trace.nodes[observed]["value"].reshape(batch.primary.shape).to(batch.primary.dtype)
    return batch.with_primary(x), {name: trace.nodes[name]["value"] for name in sites.latents}


def bdmc(model: Callable, like: Data, guide: Callable | None = None, settings: AISSettings = AISSettings(), plate: str | None = None) -> BDMCResult:
    """Bidirectional Monte Carlo on data simulated from `model` with the other arguments of `like`.

    Forward AIS gives a stochastic lower bound on each simulated example's log p(x), AIS run
    backward from the latents that simulated it a stochastic upper bound (Grosse et al. 2015,
    sec. 3). Both use the same step sizes, adapted by a forward warm-up on the simulated data.
    """
    simulated, exact = simulate(model, like, plate)
    batch, sites, start = _prepare(model, guide, simulated, settings, plate)
    per_chunk = _chunks(model, batch, settings)
    betas = sigmoid_schedule(settings.steps)
    lowers, uppers = [], []
    with frozen(model, start):
        for first in range(0, len(batch), per_chunk):
            rows = slice(first, first + per_chunk)
            chunk = batch[rows]
            path = _Path(model, start, sites, _repeat(chunk, settings.chains))
            log_step = _warmed_step_sizes(path, len(chunk), settings)
            forward, _, _ = _anneal(path, path.initial(), betas, log_step, settings)
            z = {name: value.reshape((len(batch),) + sites.latents[name])[rows].repeat_interleave(settings.chains, 0) for name, value in exact.items()}
            backward, _, _ = _anneal(path, path.unconstrained(z), betas.flip(0), log_step, settings)
            lowers.append(torch.logsumexp(forward.reshape(len(chunk), -1), -1) - math.log(settings.chains))
            uppers.append(math.log(settings.chains) - torch.logsumexp(backward.reshape(len(chunk), -1), -1))
    return BDMCResult(torch.cat(lowers).float(), torch.cat(uppers).float(), settings)
