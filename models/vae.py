"""The variational autoencoder's generative model (Kingma & Welling 2019, sec. 2.4-2.5)."""

from __future__ import annotations

import math
from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae.errors import PyrovaeError
from pyrovae.nets import LIKELIHOODS, MLP
from pyrovae.registry import MODELS
from pyrovae.sites import data_plate, register

__all__ = ["VAE"]


@MODELS.register("vae", "p(z) = N(0, I), p(x|z) an MLP decoder (Bernoulli, continuous-Bernoulli or Gaussian)")
class VAE(nn.Module):
    """p(z) p(x|z) with z ~ N(0, I) and an MLP decoder to a likelihood head.

    Args:
        data_shape: the event shape of one example (flattened by the decoder).
        latent: size of z.
        hidden: hidden layer sizes of the decoder, nearest z first.
        activation: nonlinearity name (see `pyrovae.nets.ACTIVATIONS`).
        likelihood: ``"bernoulli"`` for binary data, ``"continuous-bernoulli"`` or ``"gaussian"``.

    References:
        Kingma & Welling (2019), An Introduction to Variational Autoencoders, sec. 2.4.3.
    """

    def __init__(
        self,
        data_shape: Sequence[int],
        latent: int = 50,
        hidden: Sequence[int] = (200, 200),
        activation: str = "tanh",
        likelihood: str = "bernoulli",
    ) -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise PyrovaeError(f"unknown likelihood {likelihood!r}: choose from {', '.join(LIKELIHOODS)}")
        if latent < 1 or any(h < 1 for h in hidden):
            raise PyrovaeError("--latent and --hidden sizes must be positive")
        self.data_shape = torch.Size(data_shape)
        self.latent = latent
        self.likelihood = LIKELIHOODS[likelihood](math.prod(self.data_shape))
        self.decoder = MLP(latent, list(hidden), self.likelihood.outputs(), activation)

    def prior(self, batch: int) -> dist.Distribution:
        zero = self.decoder[0].weight.new_zeros(())
        return dist.Normal(zero, 1.0).expand([batch, self.latent]).to_event(1)

    def decode(self, z: torch.Tensor) -> dist.Distribution:
        """p(x|z) for a batch of z, over flattened examples."""
        return self.likelihood(self.decoder(z))

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None, size: int | None = None) -> None:
        register("vae", self)
        with data_plate(x, index, size):
            z = pyro.sample("z", self.prior(len(x)))
            pyro.sample("x", self.decode(z), obs=x.reshape(len(x), -1))

    def check_data(self, x: torch.Tensor) -> None:
        self.likelihood.check(x)

    def mean(self, d: dist.Distribution) -> torch.Tensor:
        return self.likelihood.mean(d)
