"""Wake-sleep and reweighted wake-sleep, with minibatches scaled exactly.

Wake-sleep (Hinton et al. 1995; Dayan et al. 1995, the Helmholtz machine): the wake phase
steps the decoder on log p(x, z) at z ~ q(z|x); the sleep phase steps the encoder on
log q(z|x) at (x, z) dreamed from the model. Reweighted wake-sleep (Bornschein & Bengio 2015)
draws K particles z_k ~ q(z|x) and uses self-normalized weights w_k ∝ p(x, z_k) / q(z_k|x)
for both the decoder (sum_k w_k grad log p(x, z_k)) and the encoder (wake-phase phi:
sum_k w_k grad log q(z_k|x)). Neither needs reparameterized samples, so discrete latents work.

Pyro's `ReweightedWakeSleep` does not subsample a plate with exact scaling; the per-example
log-weights here come from `pyrovae.importance.log_weights`, which keeps the subsample scale
apart (Kingma & Welling 2019, sec. 2.6-2.7 for the importance weights).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyrovae.batch import Data, as_batch
from pyrovae.enumeration import weights_for
from pyrovae.errors import PyrovaeError
from pyrovae.handlers import scale_latents
from pyrovae.importance import PARTICLES, VECTORIZE_ERRORS, LogWeights, log_weights, over_particles
from pyrovae.infer.base import InferenceMethod, TrainSettings, unique_parameters
from pyrovae.registry import METHODS
from pyrovae.sites import ModelSites

__all__ = ["WakeSleep", "detached_guide", "sleep_log_q"]

VARIANTS = ("ws", "rws")


def _grads(loss: torch.Tensor, params: list[torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
    """d loss / d params, None for the parameters the loss does not reach."""
    if not loss.requires_grad or not params:
        return (None,) * len(params)
    return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)


def _no_model(*args: Any, **kwargs: Any) -> None:
    """A program with no sites: `log_weights(_no_model, guide)` is -log q(z|x)."""


def detached_guide(guide: Callable, particles: int | None, nesting: int, *args: Any, **kwargs: Any) -> Callable:
    """`guide` replayed at K draws made without gradient: log q(z|x) is differentiable in the
    guide's parameters, the values z are not (the score-function form of wake-sleep). With
    `particles` None, one draw and no particle plate (a program that cannot broadcast over one)."""
    plate = pyro.plate(PARTICLES, particles, dim=-(nesting + 1)) if particles is not None else contextlib.nullcontext()
    with plate, torch.no_grad():
        trace = poutine.trace(guide).get_trace(*args, **kwargs)
    return poutine.replay(guide, trace=trace)


def sleep_log_q(model: Callable, guide: Callable, x: torch.Tensor, observed: str) -> torch.Tensor:
    """log q(z|x') per example, on (x', z) dreamed from the model (B draws shaped like `x`)."""
    with torch.no_grad():
        dream = poutine.trace(poutine.uncondition(model)).get_trace(x)
    x_dream = dream.nodes[observed]["value"].reshape(x.shape).to(x.dtype)
    latents = {name: site["value"] for name, site in dream.nodes.items() if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)}
    trace = poutine.trace(poutine.condition(guide, data=latents)).get_trace(x_dream)
    trace.compute_log_prob()
    total = x.new_zeros(len(x))
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and name in latents:
            total = total + site["log_prob"].reshape(len(x), -1).sum(-1)
    return total


@METHODS.register("wake-sleep", "wake-sleep (Helmholtz machine) or reweighted wake-sleep with K particles (Bornschein & Bengio 2015)")
class WakeSleep(InferenceMethod):
    """Separate decoder and encoder updates, each on its own objective.

    Options (keyword arguments after the common four):
        variant: ``"ws"`` (default): wake-phase decoder step at one z ~ q(z|x), sleep-phase
            encoder step; ``"rws"``: K self-normalized particles for the decoder and the
            wake-phase encoder step.
        particles: K (default: the settings' particles if > 1, else 1 for ws and 5 for rws).
        sleep: add the sleep-phase encoder step (default: True for ws, False for rws).
        guide_lr: encoder learning rate (default: the settings' lr).
        vectorize: for K > 1, True draws the K particles in one pass over a particle plate and
            refuses, in one line, a program that cannot run over one; False draws them one at a
            time; None (default) tries one pass and falls back to one at a time, said once
            (`pyrovae.importance.over_particles`). The estimate is the same either way.

    The returned loss is minus the IWAE-K bound of the minibatch (the ELBO for K = 1), in
    nats per example, computed from the same weights.

    References:
        Dayan, Hinton, Neal & Zemel (1995); Bornschein & Bengio (2015), sec. 3-4;
        Kingma & Welling (2019), sec. 2.6 (importance weights).
    """

    name = "wake-sleep"
    own_objectives = True
    trains_guide = True

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        settings: TrainSettings,
        num_examples: int,
        *,
        variant: str = "ws",
        particles: int | None = None,
        sleep: bool | None = None,
        guide_lr: float | None = None,
        vectorize: bool | None = None,
        sites: ModelSites | None = None,
    ) -> None:
        super().__init__(model, guide, settings, num_examples, sites=sites)
        if variant not in VARIANTS:
            raise PyrovaeError(f"unknown wake-sleep variant {variant!r}: choose from {', '.join(VARIANTS)}")
        self.variant = variant
        self.particles = particles or (settings.particles if settings.particles > 1 else (5 if variant == "rws" else 1))
        self.sleep = (variant == "ws") if sleep is None else sleep
        self.guide_lr = guide_lr
        self.vectorize = vectorize
        self.theta = unique_parameters(model)
        theta_ids = {id(p) for p in self.theta}
        self.phi = [p for p in unique_parameters(guide) if id(p) not in theta_ids]
        if not self.phi:
            # model and guide are methods of one module (Pyro's examples): both optimizers hold
            # its parameters, and each phase's loss reaches only the ones its program uses
            self.phi = unique_parameters(guide)
        self.model_optimizer = torch.optim.Adam(self.theta or [nn.Parameter(torch.empty(0))], lr=settings.lr)  # see base.adam
        self.guide_optimizer = torch.optim.Adam(self.phi, lr=guide_lr or settings.lr) if self.phi else None
        self.observed: str | None = None

    def add_parameters(self, model: list[torch.Tensor], guide: list[torch.Tensor]) -> None:
        if model:
            self.theta += model
            self.model_optimizer.add_param_group({"params": model})
        if guide:
            self.phi += guide
            if self.guide_optimizer is None:
                self.guide_optimizer = torch.optim.Adam(guide, lr=self.model_optimizer.defaults["lr"] if self.guide_lr is None else self.guide_lr)
            else:
                self.guide_optimizer.add_param_group({"params": guide})

    def step(self, x: Data, index: torch.Tensor, beta: float = 1.0) -> float:
        batch = as_batch(x)
        first = not self.prepared
        self.prepare(batch)
        kwargs, factor = self.minibatch_kwargs(batch, index)
        args, call_kwargs = batch.call_args()
        kwargs = {**call_kwargs, **kwargs}
        model, guide = scale_latents(self.model, beta), scale_latents(self.guide, beta)
        k = self.particles
        weights, log_q = self._particles(model, guide, args, kwargs)
        scale = factor * weights.data_scale / self.num_examples  # to nats per example of the data set
        w = torch.softmax(weights.values.detach(), 0)
        model_loss = -scale * (w * weights.values).sum()  # its theta-gradient is -sum_k w_k grad log p
        guide_loss = batch.primary.new_zeros(())
        if log_q is not None:
            guide_loss = guide_loss - scale * (w * log_q).sum()
        if self.sleep:
            if not batch.is_tensor:
                raise PyrovaeError("the sleep phase dreams the one data tensor of a model(x); with several arguments use variant 'rws' (--method-option variant=rws)")
            if self.observed is None:
                observed = self.sites.observed
                if len(observed) != 1:
                    raise PyrovaeError(f"the sleep phase needs one observed site to dream, the model has {len(observed)}")
                self.observed = observed[0]
            guide_loss = guide_loss - sleep_log_q(model, guide, batch.primary, self.observed).mean()
        if first:
            self.check_complete(model_loss + guide_loss)
        # both phases' gradients before either step: model and guide may share a module's tensors
        steps = [(self.model_optimizer, self.theta, _grads(model_loss, self.theta))]
        if self.guide_optimizer is not None and guide_loss.requires_grad:
            steps.append((self.guide_optimizer, self.phi, _grads(guide_loss, self.phi)))
        for optimizer, params, grads in steps:
            for p, g in zip(params, grads):
                p.grad = g
            optimizer.step()
        bound = torch.logsumexp(weights.values.detach(), 0) - math.log(k)
        return -(scale * bound.sum()).item()

    def _particles(self, model: Callable, guide: Callable, args: tuple, kwargs: dict[str, Any]) -> tuple[LogWeights, torch.Tensor | None]:
        """The log-weights (K, B) of K guide draws and, for rws, their log q (K, B): in one pass over
        a particle plate, or K passes of one draw each where the program cannot take that plate."""
        nesting, k = self.settings.max_plate_nesting, self.particles
        weights_of = weights_for(self.sites)
        log_qs: list[torch.Tensor] = []

        def weigh(particles: int | None) -> LogWeights:
            replayed = detached_guide(guide, particles, nesting, *args, **kwargs)
            n, one_pass = particles or 1, particles is not None
            try:
                weights = weights_of(model, replayed, n, nesting, *args, plate_name=self.plate, vectorize=one_pass, **kwargs)
                log_q = None
                if self.variant == "rws":
                    log_q = -log_weights(_no_model, replayed, n, nesting, *args, plate_name=self.plate, vectorize=one_pass, **kwargs).values
            except PyrovaeError as error:
                if one_pass and isinstance(error.__cause__, VECTORIZE_ERRORS):  # the weights' own refusal: over_particles below decides
                    raise error.__cause__ from None
                raise
            if log_q is not None:
                log_qs.append(log_q)  # only for a pass that succeeded, in the order of its weights
            return weights

        # the key is the user's programs, whose ids are stable across steps: tried vectorized once
        weights = over_particles(weigh, k, self.vectorize if k > 1 else False, (self.model, self.guide))
        return weights, torch.cat(log_qs) if log_qs else None

    def state_dict(self) -> dict[str, Any]:
        state = {**super().state_dict(), "model_optimizer": self.model_optimizer.state_dict()}
        if self.guide_optimizer is not None:
            state["guide_optimizer"] = self.guide_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.model_optimizer.load_state_dict(state["model_optimizer"])
        if self.guide_optimizer is not None:
            self.guide_optimizer.load_state_dict(state["guide_optimizer"])
