"""Monte Carlo EM with persistent per-example HMC chains (Kingma & Welling 2019, appendix A.2.3).

E-step: for each example of the minibatch, a few HMC transitions targeting p(z_i | x_i) from
where its chain stopped on the previous visit. M-step: one gradient step on the decoder
ascending log p(x, z) at those samples.

Why not `pyro.infer.mcmc.MCMC`/`HMC`: its kernel runs one chain over the joint latent of
whatever it is given, so a minibatch would be one chain in B * L dimensions with one step size
and one accept/reject for all examples (the acceptance rate collapses as B grows), its warm-up
adapts a single step size and mass matrix per call, and setting up a kernel and sampler every
minibatch costs far more than the few leapfrog steps we need. Here the B chains are
independent: the potential is the sum of -log p(x_i, z_i), whose gradient in z_i involves only
example i, the integrator is Pyro's `velocity_verlet` with a per-example step size, and each
example is accepted or rejected on its own energy change.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from pyro import poutine
from pyro.ops.dual_averaging import DualAveraging
from pyro.ops.integrator import potential_grad, velocity_verlet
from torch import nn

from pyrovae.batch import Data, as_batch
from pyrovae.errors import PyrovaeError
from pyrovae.guides.local import flatten
from pyrovae.handlers import scale_latents
from pyrovae.infer.base import InferenceMethod, TrainSettings, unique_parameters
from pyrovae.infer.local import refuse_discrete
from pyrovae.infer.map import log_joint
from pyrovae.objectives import make_objective
from pyrovae.registry import METHODS
from pyrovae.sites import ModelSites

__all__ = ["MCMCEM", "hmc_transition"]


def hmc_transition(potential: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, step_size: torch.Tensor, num_steps: int,
                   inverse_mass: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One HMC transition per row of z (B, D), with a diagonal mass matrix per row.

    Args:
        potential: z (B, D) -> per-example potential energies (B,).
        step_size: (B,) leapfrog step sizes.
        inverse_mass: (B, D) diagonal of each row's inverse mass matrix M^-1 (the posterior
            variances it is adapted to); None: the identity. Momenta are drawn from N(0, M).

    Returns:
        The new states and each row's acceptance probability min(1, exp(-dH)).
    """
    energies: dict[str, torch.Tensor] = {}

    def summed(state: dict[str, torch.Tensor]) -> torch.Tensor:
        energies["u"] = potential(state["z"])
        return energies["u"].sum()

    grads, _ = potential_grad(summed, {"z": z.detach().clone()})
    u0 = energies["u"].detach()
    inverse = torch.ones_like(z) if inverse_mass is None else inverse_mass
    r0 = torch.randn_like(z) / inverse.sqrt()
    kinetic_grad = lambda r: {"z": r["z"] * inverse}  # noqa: E731  (d/dr of r^T M^-1 r / 2)
    z1, r1, _, _ = velocity_verlet({"z": z.detach()}, {"z": r0}, summed, kinetic_grad, step_size[:, None], num_steps, grads)
    u1 = energies["u"].detach()
    delta = (u1 + 0.5 * (r1["z"].pow(2) * inverse).sum(-1)) - (u0 + 0.5 * (r0.pow(2) * inverse).sum(-1))
    delta = torch.where(torch.isfinite(delta), delta, torch.full_like(delta, math.inf))
    accept_prob = torch.exp(-delta.clamp_min(0))
    accept = torch.rand_like(accept_prob) < accept_prob
    return torch.where(accept[:, None], z1["z"].detach(), z.detach()), accept_prob


@METHODS.register("mcmc-em", "Monte Carlo EM: persistent per-example HMC chains (E) and decoder steps on log p(x, z) (appendix A.2.3)")
class MCMCEM(InferenceMethod):
    """Stochastic Monte Carlo EM with one warm-started HMC chain per training example.

    Options (keyword arguments after the common four):
        hmc_steps: HMC transitions per example per visit (default 1).
        leapfrog_steps: leapfrog steps per transition (default 10).
        step_size: initial leapfrog step size (default 0.1).
        target_accept: acceptance probability the step sizes are adapted to (default 0.8).
        adapt: ``"example"`` (default): each example's step size follows its own acceptance;
            ``"batch"``: the minibatch's mean acceptance moves all of its examples' step sizes.
        adapt_until: transitions per adaptation window (default 100). Within a window an
            example's log step size follows Pyro's `DualAveraging` (Hoffman & Gelman 2014,
            sec. 3.2; Nesterov 2009); at its end the step size is frozen at the window's average,
            so the chain targets p(z | x) exactly while the decoder stands still.
        band: (low, high) acceptance band (default (0.6, 0.9)). The decoder moves under the
            chains, so a frozen step size drifts out of tune: when an example's running
            acceptance (an exponential average over its recent transitions) leaves the band,
            its window reopens, centred on ten times its current step size.
        burn_in: extra transitions on an example's first visit (default 5).
        mass: ``"identity"`` (default) or ``"diagonal"``: each example's diagonal mass matrix is
            adapted to the variances of its chain's first `adapt_until` states after its first
            visit (Welford, with Stan's regularization, as Pyro's `WelfordCovariance`), after
            which that example's step-size window opens again under the new mass (Stan's
            windowed adaptation, with one slow window).
        init: where an example's chain starts on its first visit: ``"prior"`` (default), a
            draw from p(z); or ``"encoder"``, a draw from the guide, trained alongside on its
            own ELBO with the decoder held fixed for it (Hoffman 2017, sec. 3): the chains start
            near the posterior, so few burn-in transitions are needed, at the cost of one
            encoder step per minibatch.

    The chain states, step sizes, adaptation states and transition counts are per-example
    buffers in `state_dict`. The loss is minus log p(x, z) at the samples (nats per example),
    not a bound.

    References:
        Kingma & Welling (2019), appendix A.2.3; Neal (2011), MCMC using Hamiltonian dynamics;
        Hoffman & Gelman (2014), the No-U-Turn sampler, sec. 3.2 (dual averaging of the step size);
        Hoffman (2017), Learning deep latent Gaussian models with Markov chain Monte Carlo.
    """

    name = "mcmc-em"
    own_objectives = True
    gives_elbo = False
    trains_guide = False

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        settings: TrainSettings,
        num_examples: int,
        *,
        hmc_steps: int = 1,
        leapfrog_steps: int = 10,
        step_size: float = 0.1,
        target_accept: float = 0.8,
        adapt: str = "example",
        adapt_until: int = 100,
        band: tuple[float, float] = (0.6, 0.9),
        burn_in: int = 5,
        init: str = "prior",
        mass: str = "identity",
        sites: ModelSites | None = None,
    ) -> None:
        super().__init__(model, guide, settings, num_examples, sites=sites)
        if adapt not in ("example", "batch"):
            raise PyrovaeError(f"adapt must be 'example' or 'batch', got {adapt!r}")
        low, high = band
        if not 0 <= low < target_accept < high <= 1 or step_size <= 0 or adapt_until < 1:
            raise PyrovaeError(f"mcmc-em needs 0 <= band low < target_accept < band high <= 1, a positive step size and window (got band={band}, "
                               f"target_accept={target_accept}, step_size={step_size}, adapt_until={adapt_until})")
        self.hmc_steps, self.leapfrog_steps, self.target_accept = hmc_steps, leapfrog_steps, target_accept
        self.adapt, self.adapt_until, self.band, self.burn_in = adapt, adapt_until, (float(low), float(high)), burn_in
        if init not in ("prior", "encoder") or (init == "encoder" and guide is None):
            raise PyrovaeError(f"init must be 'prior' or 'encoder' (which needs a guide), got {init!r}")
        self.init = init
        if mass not in ("identity", "diagonal"):
            raise PyrovaeError(f"mass must be 'identity' or 'diagonal', got {mass!r}")
        self.mass = mass
        self.mass_state: dict[str, torch.Tensor] | None = None  # per example: inverse mass, Welford count, mean, M2 (built with the chains)
        self.optimizer = torch.optim.Adam(unique_parameters(model) or [nn.Parameter(torch.empty(0))], lr=settings.lr)  # see base.adam
        theta = {id(p) for p in unique_parameters(model)}
        self.phi = [p for p in unique_parameters(guide) if id(p) not in theta] if init == "encoder" else []
        self.encoder_optimizer = torch.optim.Adam(self.phi, lr=settings.lr) if self.phi else None
        self.encoder_objective = make_objective("elbo", 1, settings.max_plate_nesting, plate=self.plate) if init == "encoder" else None
        self.chains: torch.Tensor | None = None
        self.log_step = torch.full((num_examples,), math.log(step_size))
        self.transitions = torch.zeros(num_examples, dtype=torch.long)
        # per-example dual-averaging state: transitions in the window, mean statistic, averaged
        # iterate and proximal centre (Pyro's DualAveraging fields), and the running acceptance
        self.window = torch.zeros(num_examples)
        self.g_avg = torch.zeros(num_examples)
        self.x_avg = torch.zeros(num_examples)
        self.centre = torch.full((num_examples,), math.log(10 * step_size))
        self.accept_avg = torch.full((num_examples,), target_accept)
        self.accept_rate = float("nan")

    def _adapt(self, index: torch.Tensor, log_step: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
        """One dual-averaging step for the examples of `index` whose window is open; frozen at
        the window's average when it closes; reopened where the running acceptance left the band."""
        window = self.window[index]
        active = window < self.adapt_until
        averaging = DualAveraging(prox_center=self.centre[index])  # the examples' states, stepped elementwise
        averaging._t, averaging._g_avg, averaging._x_avg = window, self.g_avg[index], self.x_avg[index]
        accept = prob if self.adapt == "example" else prob.mean().expand_as(prob)
        averaging.step(self.target_accept - accept)
        x_t, x_avg = averaging.get_state()
        closing = active & (window + 1 >= self.adapt_until)
        log_step = torch.where(closing, x_avg, torch.where(active, x_t, log_step))
        self.window[index] = torch.where(active, window + 1, window)
        self.g_avg[index] = torch.where(active, averaging._g_avg, self.g_avg[index])
        self.x_avg[index] = torch.where(active, x_avg, self.x_avg[index])
        running = 0.9 * self.accept_avg[index] + 0.1 * prob
        low, high = self.band
        reopen = ~active & ((running < low) | (running > high))
        if reopen.any():
            self._reopen(index[reopen], log_step[reopen])
        self.accept_avg[index] = torch.where(reopen, torch.full_like(running, self.target_accept), running)
        return log_step

    def _reopen(self, index: torch.Tensor, log_step: torch.Tensor) -> None:
        """A fresh step-size window for the examples of `index`, centred on ten times their step size."""
        zero = torch.zeros_like(log_step)
        self.window[index], self.g_avg[index], self.x_avg[index] = zero, zero, zero
        self.centre[index] = log_step + math.log(10)

    def _adapt_mass(self, index: torch.Tensor, z: torch.Tensor, log_step: torch.Tensor, fresh: torch.Tensor) -> None:
        """Welford's update of each example's variance estimate over its first `adapt_until`
        transitions after its first visit (whose burn-in is left out); then the regularized
        variance becomes its inverse mass and its step-size window opens again. Pyro's
        `WelfordCovariance` keeps one sample count for all; here each example has its own."""
        state = self.mass_state
        assert state is not None
        learning = (state["count"][index] >= 0) & ~fresh  # count -1: this example's mass is set
        count = state["count"][index] + learning.to(z.dtype)
        mean, m2 = state["mean"][index], state["m2"][index]
        delta = z - mean
        new_mean = torch.where(learning[:, None], mean + delta / count.clamp_min(1)[:, None], mean)
        new_m2 = torch.where(learning[:, None], m2 + delta * (z - new_mean), m2)
        done = learning & (count >= max(self.adapt_until, 2))
        n = count[:, None]
        variance = (n / (n + 5)) * new_m2 / (n - 1).clamp_min(1) + 1e-3 * 5 / (n + 5)
        state["inverse_mass"][index] = torch.where(done[:, None], variance, state["inverse_mass"][index])
        state["count"][index], state["mean"][index], state["m2"][index] = torch.where(done, torch.full_like(count, -1), count), new_mean, new_m2
        if done.any():
            self._reopen(index[done], log_step[done])

    @property
    def checks_guide(self) -> bool:  # type: ignore[override]
        """The chains are the posterior; a guide is used (and must serve the model) only to start them."""
        return self.init == "encoder"

    BUFFERS = ("log_step", "transitions", "window", "g_avg", "x_avg", "centre", "accept_avg")

    def check_sites(self, sites: ModelSites) -> None:
        """HMC moves real-valued per-example latents."""
        refuse_discrete(self.name, sites)
        sites.refuse_subsampled(f"the {self.name} method")
        super().check_sites(sites)
        constrained = list(sites.unservable(discrete=False, constrained=True))
        if sites.global_latents or constrained:
            bad = [*sites.global_latents, *constrained]
            raise PyrovaeError(
                f"the {self.name} method runs one HMC chain per example on the reals; {', '.join(map(repr, bad))} is global or "
                "constrained: use --method amortized or local"
            )

    def add_parameters(self, model: list[torch.Tensor], guide: list[torch.Tensor]) -> None:
        if model:
            self.optimizer.add_param_group({"params": model})
        if guide and self.init == "encoder":
            self.phi += guide
            if self.encoder_optimizer is None:
                self.encoder_optimizer = torch.optim.Adam(guide, lr=self.optimizer.defaults["lr"])
            else:
                self.encoder_optimizer.add_param_group({"params": guide})

    def _setup(self, x: Data) -> None:
        batch = as_batch(x)
        self.prepare(batch)
        if self.chains is None:
            width = sum(math.prod(s) for s in self.sites.latents.values())
            self.chains = torch.zeros(self.num_examples, width, device=batch.device)
            if self.mass == "diagonal" and self.mass_state is None:
                table = lambda: torch.zeros(self.num_examples, width, device=batch.device)  # noqa: E731
                self.mass_state = {"inverse_mass": torch.ones(self.num_examples, width, device=batch.device),
                                   "count": torch.zeros(self.num_examples, device=batch.device), "mean": table(), "m2": table()}
            for name in ("log_step", "transitions", "window", "g_avg", "x_avg", "centre", "accept_avg"):
                setattr(self, name, getattr(self, name).to(batch.device))

    @torch.no_grad()
    def _first_draw(self, x: Data, kwargs: dict[str, Any]) -> torch.Tensor:
        """Where fresh chains start: a draw from the prior, or from the encoder."""
        program = self.model if self.init == "prior" else self.guide
        trace = as_batch(x).call(poutine.trace(program).get_trace, **kwargs)
        return flatten({name: trace.nodes[name]["value"] for name in self.sites.latents}, self.sites)

    def _encoder_step(self, x: Data, index: torch.Tensor, beta: float) -> None:
        """One Adam step of the guide on its ELBO of the minibatch; the decoder takes no gradient from it."""
        if self.encoder_optimizer is None or self.encoder_objective is None:
            return
        batch = as_batch(x)
        kwargs, _ = self.minibatch_kwargs(batch, index)
        args, call_kwargs = batch.call_args()
        model, guide = scale_latents(self.model, beta), scale_latents(self.guide, beta)
        self.encoder_objective.plate = self.plate  # as found by `prepare`
        loss = self.encoder_objective.differentiable_loss(model, guide, *args, **call_kwargs, **kwargs) / len(batch)
        grads = torch.autograd.grad(loss, self.phi, allow_unused=True)
        self.encoder_optimizer.zero_grad(set_to_none=True)
        for p, g in zip(self.phi, grads):
            p.grad = g
        self.encoder_optimizer.step()

    def e_step(self, x: Data, index: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
        """Advance the chains of `index` (a minibatch of `x`) and return their states (B, D)."""
        self._setup(x)
        kwargs, _ = self.minibatch_kwargs(x, index)
        model = scale_latents(self.model, beta)
        fresh = self.transitions[index] == 0
        z = self.chains[index]
        if fresh.any():
            z = torch.where(fresh[:, None], self._first_draw(x, kwargs), z)
        steps = self.hmc_steps + (self.burn_in if fresh.any() else 0)
        log_step = self.log_step[index]
        accepted = []
        inverse_mass = self.mass_state["inverse_mass"][index] if self.mass_state is not None else None
        for _i in range(steps):
            z, prob = hmc_transition(lambda v: -log_joint(model, self.sites, v, x, **kwargs), z, log_step.exp(), self.leapfrog_steps, inverse_mass)
            log_step = self._adapt(index, log_step, prob)
            if self.mass_state is not None:
                self._adapt_mass(index, z, log_step, fresh)
                inverse_mass = self.mass_state["inverse_mass"][index]
            accepted.append(prob.mean().item())
        self.chains[index], self.log_step[index], self.transitions[index] = z, log_step, self.transitions[index] + steps
        self.accept_rate = sum(accepted) / len(accepted)
        return z

    def step(self, x: Data, index: torch.Tensor, beta: float = 1.0) -> float:
        first = not self.prepared
        self._setup(x)
        self._encoder_step(x, index, beta)
        z = self.e_step(x, index, beta)
        kwargs, _ = self.minibatch_kwargs(x, index)
        self.optimizer.zero_grad(set_to_none=True)
        loss = -log_joint(scale_latents(self.model, beta), self.sites, z, x, **kwargs).mean()
        if first and loss.requires_grad:
            self.check_complete(loss)
        if loss.requires_grad:  # a frozen model: the E-step alone
            loss.backward()
            self.optimizer.step()
        return loss.item()

    def per_example_state(self) -> list[torch.Tensor]:
        return [*([self.chains] if self.chains is not None else []), *(getattr(self, name) for name in self.BUFFERS),
                *(self.mass_state.values() if self.mass_state is not None else ())]

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(), "optimizer": self.optimizer.state_dict(), "chains": self.chains,
            **({"mass_state": self.mass_state} if self.mass_state is not None else {}),
            **{name: getattr(self, name) for name in self.BUFFERS},
            **({"encoder_optimizer": self.encoder_optimizer.state_dict()} if self.encoder_optimizer is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.encoder_optimizer is not None and "encoder_optimizer" in state:
            self.encoder_optimizer.load_state_dict(state["encoder_optimizer"])
        self.chains = None if state["chains"] is None else state["chains"].clone()
        if self.mass == "diagonal":
            saved = state.get("mass_state")
            if saved is None and self.chains is not None:
                raise KeyError("mass_state")
            self.mass_state = None if saved is None else {k: v.clone() for k, v in saved.items()}
        for name in self.BUFFERS:
            if name in state:  # a checkpoint from before dual averaging keeps the fresh adaptation state
                setattr(self, name, state[name].clone())
