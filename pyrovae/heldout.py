"""Held-out scoring any layer may use: IS log p(x) under a proposal fitted per example with the
decoder frozen, a guide fine-tuned per example, and the inference-gap decomposition.

A decoder trained by any method is scored by importance sampling with a proposal fitted per
example (`heldout_scores`): the score then measures the decoder, not whichever encoder the
method happened to train (Kingma & Welling 2019, sec. 2.6 for the estimator).
`gap_decomposition` splits the amortized ELBO's shortfall into approximation and amortization
gaps (Cremer, Li & Duvenaud 2018).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pyrovae.batch import Data, as_batch
from pyrovae.errors import PyrovaeError
from pyrovae.evaluate import Evaluation, chunk_sizes, evaluate
from pyrovae.infer.local import fit_local, frozen, model_sites
from pyrovae.objectives import make_objective

__all__ = ["ProposalSettings", "finetuned_scores", "gap_decomposition", "heldout_scores"]


@dataclass(frozen=True)
class ProposalSettings:
    """How held-out proposals are fitted and used: S steps, K importance samples per example."""

    steps: int = 100
    lr: float = 0.05
    samples: int = 100
    covariance: str = "diagonal"
    particles: int = 1


def heldout_scores(model: Callable, x: Data, sites: Any, settings: ProposalSettings = ProposalSettings(), init: Callable | None = None, batch: int = 256) -> Evaluation:
    """ELBO and IS log p(x) of each held-out example under a Gaussian fitted to it, decoder frozen.

    Each batch gets its own `LocalGaussian` (one q_i per example, `fit_local`, started from
    `init` if given), then `pyrovae.evaluate.evaluate` scores it with `settings.samples` draws.
    The batch is kept within one of `evaluate`'s chunks, since the guide's rows are positions.
    """
    data = as_batch(x)
    width = math.prod(data.primary.shape[1:]) or 1
    batch = min(batch, chunk_sizes(len(data), settings.samples, width, 2**23)[0])
    parts = []
    for start in range(0, len(data), batch):
        xb = data[start : start + batch]
        q = fit_local(model, xb, sites, settings.steps, settings.lr, settings.covariance, init=init, particles=settings.particles)
        q.eval()
        parts.append(evaluate(model, q, xb, num_samples=settings.samples, plate=sites.plate))
    return Evaluation.concat(parts)


def finetuned_scores(model: Callable, guide: Any, x: Data, settings: ProposalSettings, lr: float = 1e-3) -> Evaluation:
    """ELBO and IS log p(x) of each example under a copy of `guide` fitted to it alone, decoder frozen.

    For a flow guide, the family is every distribution the guide's network can emit; a copy
    whose parameters (encoder and flow alike) are optimized on one example for `settings.steps`
    Adam steps, starting from the amortized ones, is the best member of that family we can
    find for it (Cremer et al. fit the flow's parameters per example the same way).
    """
    data = as_batch(x)
    nesting = model_sites(model, guide, data).max_plate_nesting
    objective = make_objective("elbo", max(settings.particles, 1), nesting)
    parts = []
    with frozen(model):
        for i in range(len(data)):
            xi = data[i : i + 1]
            args, kwargs = xi.call_args()
            q = copy.deepcopy(guide).train()
            optimizer = torch.optim.Adam(q.parameters(), lr=lr)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(settings.steps, 1))
            for _ in range(settings.steps):
                optimizer.zero_grad(set_to_none=True)
                objective.differentiable_loss(model, q, *args, **kwargs).backward()
                optimizer.step()
                schedule.step()
            parts.append(evaluate(model, q.eval(), xi, num_samples=settings.samples))
    return Evaluation.concat(parts)


def gap_decomposition(model: Callable, guide: Callable, x: Data, settings: ProposalSettings = ProposalSettings(steps=200, samples=1000), qstar: str = "local") -> dict[str, Any]:
    """Inference gaps of an amortized guide on `x` (nats per example).

    log p(x) is the larger of the IS estimates with q* and with q (both have K samples); L[q*] is the
    ELBO of q*, the best member of the guide's family fitted per example starting from q(z|x);
    L[q] is the amortized ELBO. approximation gap = log p(x) - L[q*], amortization gap =
    L[q*] - L[q]; together they are log p(x) - L[q].

    Args:
        qstar: ``"local"``, a Gaussian per example (`settings.covariance`), for Gaussian guides;
            ``"finetune"``, a copy of the guide fitted per example (`finetuned_scores`), for flows.

    References:
        Cremer, Li & Duvenaud (2018), Inference Suboptimality in VAEs, sec. 3.
    """
    x = as_batch(x)
    sites = model_sites(model, guide, x)
    if qstar not in ("local", "finetune"):
        raise PyrovaeError(f"unknown q* family {qstar!r}: choose local or finetune")
    fitted = heldout_scores(model, x, sites, settings, init=guide) if qstar == "local" else finetuned_scores(model, guide, x, settings)
    amortized = evaluate(model, guide, x, num_samples=settings.samples)
    log_px = torch.maximum(fitted.log_likelihood, amortized.log_likelihood)
    l_qstar, l_q = fitted.elbo, amortized.elbo
    return {
        "examples": len(x), "samples": settings.samples, "proposal_steps": settings.steps,
        "qstar": settings.covariance if qstar == "local" else "guide fine-tuned per example",
        "log_px": log_px.mean().item(), "elbo_qstar": l_qstar.mean().item(), "elbo_q": l_q.mean().item(),
        "approximation_gap": (log_px - l_qstar).mean().item(), "amortization_gap": (l_qstar - l_q).mean().item(),
        "total_gap": (log_px - l_q).mean().item(),
        "approximation_gap_se": (log_px - l_qstar).std().item() / math.sqrt(len(x)),
        "amortization_gap_se": (l_qstar - l_q).std().item() / math.sqrt(len(x)),
        "total_gap_se": (log_px - l_q).std().item() / math.sqrt(len(x)),
    }
