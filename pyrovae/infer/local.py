"""Variational EM with local variational parameters (Kingma & Welling 2019, appendix A.2.2).

Each training example has its own q_i(z) (`pyrovae.guides.local.LocalGaussian`); one
minibatch step updates the q_i of the examples in the batch and the decoder together, on the
same bound. The semi-amortized variant (Kim et al. 2018) starts each q_i from an amortized
encoder's output and refines it for a few steps with the decoder frozen; `fit_local` is that
refinement, also used by `pyrovae.compare` to fit proposals on held-out data.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from pyrovae.batch import Data, as_batch
from pyrovae.errors import PyrovaeError
from pyrovae.guides.local import LocalGaussian
from pyrovae.handlers import ShiftLatents, scale_latents, scale_plate
from pyrovae.infer.base import InferenceMethod, TrainSettings, unique_parameters
from pyrovae.objectives import make_objective
from pyrovae.protocols import guide_traits
from pyrovae.registry import METHODS
from pyrovae.sites import ModelSites, direct_parameters, inspect_model

__all__ = ["LocalVI", "fit_local", "frozen", "model_sites", "refuse_discrete"]


@contextlib.contextmanager
def frozen(*modules: Any) -> Iterator[None]:
    """Within the block the modules' parameters take no gradient (a frozen decoder), and are not
    registered with Pyro's param store (there is nothing for an SVI optimizer to do with them)."""
    params = unique_parameters(*modules)
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        with direct_parameters(), warnings.catch_warnings():
            # a user's own pyro.module call warns that frozen parameters are not registered: intended here
            warnings.filterwarnings("ignore", message=".*was not registered in the param store because requires_grad=False")
            yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def refuse_discrete(method: str, sites: ModelSites) -> None:
    """Gaussians, points and HMC chains live on the reals: refuse discrete and enumerated sites."""
    discrete = sites.discrete  # enumerated sites are discrete too
    if discrete:
        raise PyrovaeError(
            f"the {method} method moves latents on the reals, but {', '.join(map(repr, discrete))} {'are' if len(discrete) > 1 else 'is'} discrete: "
            "use --method amortized with --objective elbo-enum (enumerated) or a guide that samples it, or --method wake-sleep"
        )


def model_sites(model: Callable, guide: Callable, x: Data | None = None) -> ModelSites:
    """The model's latent sites: the guide's record of them, else a trace of the model on `x`."""
    sites = guide_traits(guide).sites
    if sites is not None:
        return sites
    if x is None:
        raise PyrovaeError("this method needs the model's latent sites: give it a pyrovae guide, or call it on data")
    return inspect_model(model, x)


class LocalOptimizer:
    """Adam on dense (decoder/encoder) parameters, lazy Adam on the per-example tables.

    `torch.optim.SparseAdam` moves only the rows in the minibatch, so examples not seen keep
    their parameters (dense Adam would drift them with its momentum).
    """

    def __init__(self, dense: list[nn.Parameter], local: LocalGaussian, lr: float, local_lr: float) -> None:
        self.dense = torch.optim.Adam(dense, lr=lr) if dense else None
        tables = local.tables()  # none when every latent is global
        self.local = torch.optim.SparseAdam(tables, lr=local_lr) if tables else None

    def zero_grad(self) -> None:
        for opt in (self.dense, self.local):
            if opt is not None:
                opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in (self.dense, self.local):
            if opt is not None:
                opt.step()

    def state_dict(self) -> dict[str, Any]:
        return {"dense": None if self.dense is None else self.dense.state_dict(), "local": None if self.local is None else self.local.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for optimizer, saved in ((self.dense, state["dense"]), (self.local, state["local"])):
            if optimizer is not None:
                optimizer.load_state_dict(saved)


def fit_local(
    model: Callable,
    x: Data,
    sites: ModelSites,
    steps: int = 100,
    lr: float = 0.05,
    covariance: str = "diagonal",
    init: Callable | None = None,
    particles: int = 1,
    objective: str = "elbo",
) -> LocalGaussian:
    """Fit one q_i per example of `x` by maximizing its ELBO with the model frozen.

    Vectorized over the batch (each q_i's gradient involves only its own term); the learning
    rate decays on a cosine to 0 so the last iterate is not jittered by gradient noise.

    Args:
        init: an amortized guide to start from (semi-amortized VI, Kim et al. 2018), else
            q_i = N(0, I).
        particles: samples per example and step in the ELBO estimate.

    References:
        Kingma & Welling (2019), appendix A.2.2; Cremer et al. (2018), sec. 3 (q* per example).
    """
    batch = as_batch(x)
    reason = LocalGaussian.supports(model, sites)
    if reason:
        raise PyrovaeError(f"a Gaussian fitted per example cannot serve this model: {reason}")
    local = LocalGaussian(sites, num_examples=len(batch), covariance=covariance).to(batch.device)
    if init is not None:
        local.initialize_from(init, batch)
    if steps <= 0:
        return local
    if sites.enumerated and objective == "elbo":
        objective = "elbo-enum"  # the model's enumerated sites are summed, not sampled
    loss_fn = make_objective(objective, particles, sites.max_plate_nesting, plate=sites.plate)
    optimizer = torch.optim.SparseAdam(local.tables(), lr=lr)
    args, kwargs = batch.call_args()
    with frozen(model):
        for i in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * i / steps))
            optimizer.zero_grad(set_to_none=True)
            loss_fn.differentiable_loss(model, local, *args, **kwargs).backward()
            optimizer.step()
    return local


@METHODS.register("local", "variational EM: a Gaussian q_i per training example and the decoder, one bound (appendix A.2.2)")
class LocalVI(InferenceMethod):
    """SGD on the bound in the decoder and per-example variational parameters jointly.

    Options (keyword arguments after the common four):
        covariance: ``"diagonal"`` (default) or ``"full"``; used when the given guide is not
            already a `LocalGaussian` (then one is made with `num_examples` rows).
        local_lr: Adam learning rate of the per-example parameters (default 5e-2; each row
            is updated only once an epoch, so it wants a higher rate than the decoder: at 1e-2
            the q_i lag the decoder and local VI needs about three times the steps to reach the
            pPCA maximum likelihood, tests/test_ppca_mle.py).
        init_scale: initial standard deviation of every q_i (default 1.0).
        semi_amortized_steps: if > 0 (needs an amortized guide), each minibatch's q_i start
            from the encoder and are refined this many steps, decoder frozen; the decoder then
            steps on the refined bound and the encoder on its own ELBO (Kim et al. 2018,
            without backpropagating through the refinement). Default 0: persistent q_i.
        backprop_refinement: with semi_amortized_steps > 0, refine instead a per-example affine
            map of each of the encoder's latents (`pyrovae.handlers.ShiftLatents`, from the
            identity) by that many steps of gradient ascent at rate `local_lr`, keeping the
            graph, and train encoder and decoder on the refined bound, so the encoder's
            gradient runs back through the refinement steps (the SA-VAE of Kim et al. 2018,
            Algorithm 1; Hessian-vector products by autograd). Real-valued latents only.

    References:
        Kingma & Welling (2019), appendix A.2.2 (variational EM); Hoffman et al. (2013).
    """

    name = "local"
    covariance_default = "diagonal"
    checks_guide = False  # the per-example tables are the guide trained; an encoder only starts them

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        settings: TrainSettings,
        num_examples: int,
        *,
        covariance: str | None = None,
        local_lr: float = 5e-2,
        init_scale: float = 1.0,
        semi_amortized_steps: int = 0,
        backprop_refinement: bool = False,
        sites: ModelSites | None = None,
    ) -> None:
        super().__init__(model, guide, settings, num_examples, sites=sites)
        if backprop_refinement and semi_amortized_steps < 1:
            raise PyrovaeError("backprop_refinement needs semi_amortized_steps >= 1 (the refinement it backpropagates through)")
        self.backprop_refinement = backprop_refinement
        self.objective = make_objective(settings.objective, settings.particles, settings.max_plate_nesting, plate=self.plate,
                                        options=settings.objective_options)
        self.semi_amortized_steps = semi_amortized_steps
        self.local_lr = local_lr
        if isinstance(guide, LocalGaussian) and covariance in (None, guide.covariance):
            self.local, self.encoder = guide, None
        else:
            sites = self.sites or model_sites(model, guide)
            covariance = covariance or self.covariance_default
            device = next(iter(unique_parameters(model)), torch.empty(0)).device
            self.local = LocalGaussian(sites, num_examples=num_examples, covariance=covariance, init_scale=init_scale).to(device)
            self.encoder = guide
        if semi_amortized_steps > 0 and self.encoder is None:
            raise PyrovaeError("semi-amortized local VI needs an amortized guide to start from (e.g. --guide diagonal)")
        dense = unique_parameters(model) + self.local.global_parameters()
        if semi_amortized_steps > 0:
            dense = unique_parameters(model, guide) + self.local.global_parameters()
        self.optimizer = LocalOptimizer(dense, self.local, settings.lr, local_lr)

    def check_sites(self, sites: ModelSites) -> None:
        """Per-example Gaussians (or points) serve continuous per-example latents only."""
        refuse_discrete(self.name, sites)
        sites.refuse_subsampled(f"the {self.name} method")
        super().check_sites(sites)
        constrained = list(sites.unservable(discrete=False, constrained=True))
        if self.backprop_refinement and constrained:
            raise PyrovaeError(f"backprop_refinement shifts real-valued latents; {', '.join(map(repr, constrained))} is constrained: use semi_amortized_steps alone")
        if sites.global_latents and self.semi_amortized_steps > 0:
            raise PyrovaeError(
                f"semi-amortized local VI refines per-example q_i only, but the model has global latent(s) "
                f"{', '.join(map(repr, sites.global_latents))}: use persistent local VI (semi_amortized_steps=0) or --method amortized"
            )

    def add_parameters(self, model: list[torch.Tensor], guide: list[torch.Tensor]) -> None:
        dense = model + (guide if self.semi_amortized_steps > 0 else [])
        if self.optimizer.dense is None:
            self.optimizer.dense = torch.optim.Adam(dense, lr=self.settings.lr)
        else:
            self.optimizer.dense.add_param_group({"params": dense})

    @property
    def trains_guide(self) -> bool:
        """Semi-amortized training leaves a trained encoder; persistent local VI does not."""
        return self.semi_amortized_steps > 0

    def bound_loss(self, guide: Callable, x: Data, index: torch.Tensor | None, beta: float = 1.0) -> torch.Tensor:
        """Minus the data set's bound divided by its size (nats per example)."""
        batch = as_batch(x)
        kwargs, factor = self.minibatch_kwargs(batch, index)
        model, guide = scale_latents(self.model, beta), scale_latents(guide, beta)
        if factor != 1.0 and self.sites is not None and self.sites.global_latents:
            # global latents count once, per-example sites N / B times (as in AmortizedVI.loss)
            model, guide, factor = scale_plate(model, self.plate, factor), scale_plate(guide, self.plate, factor), 1.0
        args, call_kwargs = batch.call_args()
        total = factor * self.objective.differentiable_loss(model, guide, *args, **call_kwargs, **kwargs)
        return total / (self.num_examples if index is not None else len(batch))

    def loss(self, x: Data, index: torch.Tensor | None = None, beta: float = 1.0) -> torch.Tensor:
        batch = as_batch(x)
        rows = index if index is not None else torch.arange(len(batch), device=batch.device)
        return self.bound_loss(functools.partial(self.local, rows=rows), batch, index, beta)

    def step(self, x: Data, index: torch.Tensor, beta: float = 1.0) -> float:
        first = not self.prepared
        self.prepare(x)
        if self.semi_amortized_steps > 0:
            return self._semi_amortized_step(x, index, beta)
        self.optimizer.zero_grad()
        loss = self.loss(x, index, beta)
        if first:
            self.check_complete(loss)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def parameters(self) -> list[torch.Tensor]:
        return [*super().parameters(), *self.local.parameters()]

    def _unrolled_step(self, x: Data, index: torch.Tensor, beta: float) -> float:
        """SA-VAE: K ascent steps on per-example affine offsets of the encoder's latents, graph
        kept, then one step of encoder and decoder on the refined bound."""
        batch = as_batch(x)
        sites = self.sites
        assert sites is not None and self.encoder is not None
        offsets = {name: (batch.primary.new_zeros(sites.example_shape(len(batch)) + shape, requires_grad=True),
                          batch.primary.new_zeros(sites.example_shape(len(batch)) + shape, requires_grad=True))
                   for name, shape in sites.latents.items()}
        for _ in range(self.semi_amortized_steps):
            # the batch's bound summed over its examples: each example's offsets take its own gradient
            loss = len(batch) * self.bound_loss(ShiftLatents(offsets)(self.encoder), batch, None, beta)
            leaves = [t for pair in offsets.values() for t in pair]
            grads = iter(torch.autograd.grad(loss, leaves, create_graph=True))
            offsets = {name: (loc - self.local_lr * next(grads), log_scale - self.local_lr * next(grads)) for name, (loc, log_scale) in offsets.items()}
        self.optimizer.zero_grad()
        loss = self.bound_loss(ShiftLatents(offsets)(self.encoder), batch, index, beta)
        loss.backward()
        self.optimizer.dense.step()
        return loss.item()

    def _semi_amortized_step(self, x: Data, index: torch.Tensor, beta: float) -> float:
        if self.backprop_refinement:
            return self._unrolled_step(x, index, beta)
        batch = as_batch(x)
        sites = model_sites(self.model, self.encoder)
        refined = fit_local(self.model, batch, sites, self.semi_amortized_steps, self.local_lr, self.local.covariance, init=self.encoder)
        self.optimizer.zero_grad()
        loss = self.bound_loss(functools.partial(refined, rows=torch.arange(len(batch), device=batch.device)), batch, index, beta)
        loss.backward()
        with frozen(self.model):
            self.bound_loss(self.encoder, batch, index, beta).backward()
        self.optimizer.dense.step()
        return loss.item()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "local": self.local.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.local.load_state_dict(state["local"])
        self.optimizer.load_state_dict(state["optimizer"])
