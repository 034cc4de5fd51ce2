"""Amortized variational inference: SVI on model and guide together (sec. 2.1-2.4)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from pyro import poutine
from torch import nn

from pyrovae import distributed
from pyrovae.batch import Data, as_batch
from pyrovae.capture import CapturedLoss
from pyrovae.errors import PyrovaeError
from pyrovae.handlers import scale_latents, scale_plate
from pyrovae.infer.base import InferenceMethod, TrainSettings, adam, unique_parameters
from pyrovae.objectives import make_objective
from pyrovae.protocols import guide_traits
from pyrovae.registry import METHODS
from pyrovae.sites import ModelSites

__all__ = ["AmortizedVI"]


@METHODS.register("amortized", "SVI of model and amortized guide on one objective (Kingma & Welling sec. 2.4)")
class AmortizedVI(InferenceMethod):
    """Stochastic gradient ascent on a bound, jointly in the decoder and encoder parameters.

    The loss is the objective's `differentiable_loss` (Pyro's Trace_ELBO and friends), which
    is scaled to the whole data set by the subsampled ``"data"`` plate; we divide by the data
    set size so that the optimizer sees nats per example. Adam comes from torch directly, so
    the optimizer state is one `state_dict` for checkpoints. With ``clip_norm`` (``--method-option
    clip_norm=10``) the gradient is rescaled to at most that norm over all parameters before
    each step (Pyro's DMM example trains with clipped Adam). A guide's ``baseline`` module (AIR's
    score-function baseline) learns at ``baseline_lr`` (``--method-option baseline_lr=...``;
    by default the guide's own ``baseline_lr``, else the run's rate).

    References:
        Kingma & Welling (2019), Algorithm 1 (SGD on the ELBO with the reparameterization trick).
    """

    name = "amortized"
    trains_baselines = True
    scores_groups = True

    def __init__(self, model: Callable, guide: Callable, settings: TrainSettings, num_examples: int, *, sites: ModelSites | None = None,
                 clip_norm: float | None = None, baseline_lr: float | None = None) -> None:
        super().__init__(model, guide, settings, num_examples, sites=sites)
        if clip_norm is not None and not (math.isfinite(clip_norm) and clip_norm > 0):
            raise PyrovaeError(f"clip_norm must be a positive number, got {clip_norm}")
        self.clip_norm = clip_norm
        # TraceMeanField_ELBO's per-site closed-form KLs are only the chain rule of the joint KL
        # when the guide samples each site's model parents before it and independently of it
        # (see guides/hierarchical.py); guides that break this say so with analytic_kl = False.
        if settings.objective == "elbo-analytic" and not guide_traits(guide).analytic_kl:
            raise PyrovaeError(
                f"--objective elbo-analytic is not valid with the {type(guide).__name__}: it samples a site's model "
                "parents after and dependent on the site, so per-site analytic KLs are biased; use --objective elbo or iwae"
            )
        self.objective = make_objective(settings.objective, settings.particles, settings.max_plate_nesting, settings.free_bits, self.plate,
                                        settings.objective_options)
        baseline = getattr(guide, "baseline", None)
        baselines = list(baseline.parameters()) if isinstance(baseline, nn.Module) else []
        held = {id(p) for p in baselines}
        self.optimizer = adam([p for p in unique_parameters(model, guide) if id(p) not in held], settings.lr)
        if baselines:  # a score-function baseline regresses on costs of hundreds of nats: it learns at its own rate
            rate = baseline_lr if baseline_lr is not None else getattr(guide, "baseline_lr", settings.lr)
            if not (math.isfinite(rate) and rate > 0):
                raise PyrovaeError(f"baseline_lr must be a positive number, got {rate}")
            self.optimizer.add_param_group({"params": baselines, "lr": rate})
        modules = isinstance(model, nn.Module) and isinstance(guide, nn.Module)
        # elbo-graph's provenance-tracked values and baselines run eagerly: no captured graph
        capture = settings.capture and modules and settings.objective != "elbo-graph"
        self.captured = CapturedLoss(self.loss, nn.ModuleList([model, guide])) if capture else None

    def add_parameters(self, model: list[torch.Tensor], guide: list[torch.Tensor]) -> None:
        self.optimizer.add_param_group({"params": model + guide})
        self.captured = None  # the store's tensors are not module state a graph could take as inputs

    def loss(self, x: Data, index: torch.Tensor | None = None, beta: float = 1.0, weights: torch.Tensor | None = None,
             guide: Callable | None = None) -> torch.Tensor:
        """Minus the bound on the whole data set, divided by its size: nats per example. `weights`
        (one per example, from `stratified_minibatches`) scale each example's terms; `guide`
        stands in for the method's (the same guide under a handler that records its draw)."""
        batch = as_batch(x)
        if batch.omit is not None:  # each call scored as a minibatch of its own, weighted by its share: the minibatch's loss
            with warnings.catch_warnings():  # the labelled call has nothing to enumerate, as TraceEnum_ELBO would say
                warnings.filterwarnings("ignore", message="TraceEnum_ELBO found no sample sites configured for enumeration")
                return sum(len(part) / len(batch) * self.loss(part, _rows(index, rows), beta, _rows(weights, rows), guide) for rows, part in batch.groups())
        kwargs, factor = self.minibatch_kwargs(batch, index)
        model, guide = scale_latents(self.model, beta), scale_latents(guide or self.guide, beta)
        if weights is not None:
            assert self.sites is not None and not self.sites.global_latents  # refused when the run is built
            weights = weights.reshape(self.sites.example_shape(len(weights)))
            model, guide = poutine.scale(model, scale=weights), poutine.scale(guide, scale=weights)
        if factor != 1.0 and self.sites is not None and self.sites.global_latents:
            # global latents count once, per-example sites N / B times: scale inside the plate only
            model, guide, factor = scale_plate(model, self.plate, factor), scale_plate(guide, self.plate, factor), 1.0
        args, call_kwargs = batch.call_args()
        total = factor * self.objective.differentiable_loss(model, guide, *args, **call_kwargs, **kwargs)
        return total / (self.num_examples if index is not None else len(batch))

    def step(self, x: Data, index: torch.Tensor, beta: float = 1.0, weights: torch.Tensor | None = None) -> torch.Tensor:
        """One Adam step. The loss at full KL weight is replayed from a captured graph
        (`pyrovae.capture`) where the program allows it (modules, one data tensor); the steps
        that capture or check a graph are the program's own, so the first step runs Pyro's
        shape and support checks. The loss comes back as a tensor on the device: reading it
        would make the host wait."""
        first = not self.prepared
        self.prepare(x)
        self.optimizer.zero_grad(set_to_none=True)
        replay = self.captured is not None and beta == 1.0 and torch.is_tensor(x) and weights is None
        with self.fast_path():
            loss = self.captured(x, index) if replay else self.loss(x, index, beta, weights)
        if first:
            self.check_complete(loss)
        loss.backward()
        if self.clip_norm is not None:
            distributed.average_now(self.optimizer)  # across data-parallel ranks: the norm is the whole minibatch's
            torch.nn.utils.clip_grad_norm_([p for group in self.optimizer.param_groups for p in group["params"]], self.clip_norm)
        self.optimizer.step()
        return loss.detach()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.optimizer.load_state_dict(state["optimizer"])




def _rows(values: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    return values if values is None or rows is None else values[rows.to(values.device)]
