"""Poutine handlers for training schedules (Kingma & Welling 2019, sec. 2.8) and for refining a guide."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro.distributions as dist
import torch
from pyro.poutine.messenger import Messenger

__all__ = ["ScaleLatents", "ScalePlate", "ShiftLatents", "scale_latents", "scale_plate"]


class ScaleLatents(Messenger):
    """Multiplies the log-density of every latent (unobserved) sample site by `beta`.

    Applied to both model and guide, the ELBO becomes E[log p(x|z)] - beta KL(q || p):
    KL warm-up (Bowman et al. 2016; Sonderby et al. 2016) when beta ramps from 0 to 1.
    """

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def _process_message(self, msg: Any) -> None:
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = msg["scale"] * self.beta


def scale_latents(fn: Callable, beta: float) -> Callable:
    """`fn` with its latent sites scaled by `beta` (the identity when beta == 1)."""
    return fn if beta == 1.0 else ScaleLatents(beta)(fn)


class ScalePlate(Messenger):
    """Multiplies the log-density of every sample site inside the plate `name` by `factor`.

    A minibatch of B of N examples, scored by a program that does not subsample its plate
    itself, estimates the data set's ELBO exactly with `factor` = N / B on the per-example
    sites while global latents (outside the plate) count once: the scaling `pyro.plate`'s
    `subsample` does. Linear bounds only: the IWAE bound is not linear in the log-densities.
    """

    def __init__(self, name: str, factor: float) -> None:
        super().__init__()
        self.name, self.factor = name, factor

    def _process_message(self, msg: Any) -> None:
        if msg["type"] == "sample" and any(f.name == self.name for f in msg["cond_indep_stack"]):
            msg["scale"] = msg["scale"] * self.factor


def scale_plate(fn: Callable, name: str, factor: float) -> Callable:
    """`fn` with the sites of its plate `name` scaled by `factor` (the identity when factor == 1)."""
    return fn if factor == 1.0 else ScalePlate(name, factor)(fn)


class ShiftLatents(Messenger):
    """Carries each named latent site's distribution q through z -> loc + exp(log_scale) * z.

    `offsets[name] = (loc, log_scale)`, each of the site's batch-and-event shape: per-example
    refinements of an amortized guide that stay differentiable functions of the encoder (the
    semi-amortized VAE of Kim et al. 2018 refines the encoder's output this way; at zero
    offsets the guide is unchanged). For a Gaussian q the result is again Gaussian.
    """

    def __init__(self, offsets: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__()
        self.offsets = offsets

    def _pyro_sample(self, msg: Any) -> None:
        if msg["is_observed"] or msg["name"] not in self.offsets:
            return
        loc, log_scale = self.offsets[msg["name"]]
        fn = msg["fn"]
        msg["fn"] = dist.TransformedDistribution(fn, [dist.transforms.AffineTransform(loc, log_scale.exp(), event_dim=fn.event_dim)])
