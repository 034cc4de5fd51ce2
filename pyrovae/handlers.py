"""Poutine handlers for training schedules (Kingma & Welling 2019, sec. 2.8)."""

from __future__ import annotations

from typing import Callable

from pyro.poutine.messenger import Messenger

__all__ = ["ScaleLatents", "scale_latents"]


class ScaleLatents(Messenger):
    """Multiplies the log-density of every latent (unobserved) sample site by `beta`.

    Applied to both model and guide, the ELBO becomes E[log p(x|z)] - beta KL(q || p):
    KL warm-up (Bowman et al. 2016; Sonderby et al. 2016) when beta ramps from 0 to 1.
    """

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def _process_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = msg["scale"] * self.beta


def scale_latents(fn: Callable, beta: float) -> Callable:
    """`fn` with its latent sites scaled by `beta` (the identity when beta == 1)."""
    return fn if beta == 1.0 else ScaleLatents(beta)(fn)
