"""Priors p(z) over a vector latent: the standard Gaussian, the VampPrior and a flow prior.

Each prior is a module whose call ``prior(batch)`` gives a distribution with batch shape
``(batch,)`` and event shape ``(latent,)``; models take it as ``prior="..."`` (the `vae`
model's z, the `hierarchical` model's top layer z_L). The priors are registered by name in
`pyrovae.registry.PRIORS` (re-exported here as ``PRIORS``); each builds from the model's
options with the classmethod ``build``, which `make_prior` calls.

The VampPrior here has **its own encoder** (same architecture as an MLP guide, separate
weights) rather than the guide's: a pyrovae model is a self-contained Pyro program that any
guide, a local (non-amortized) guide, MCMC-EM or evaluation can be paired with, so it cannot
depend on one particular guide's encoder, which may not exist (local guides, `exact`) or may
have another architecture (flows). Sharing the encoder as in Tomczak & Welling would tie the
model to one guide and make checkpoints and `compare` runs depend on the pairing.

References:
    Tomczak & Welling (2018), VAE with a VampPrior, sec. 3 (eq. 9, pseudo-inputs);
    Dinh, Sohl-Dickstein & Bengio (2017), Density estimation using Real NVP, sec. 3.3-3.5;
    Kingma & Welling (2019), An Introduction to Variational Autoencoders, sec. 4.4 (flexible priors).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro.distributions as dist
import torch
from pyro.distributions.transforms import AffineCoupling, Permute
from pyro.nn import DenseNN
from torch import nn
from torch.nn.functional import hardtanh, softplus

from pyrovae.errors import PyrovaeError
from pyrovae.nets import MLP
from pyrovae.registry import PRIORS

__all__ = ["PRIORS", "FlowPrior", "StandardPrior", "VampPrior", "make_prior"]


@PRIORS.register("standard", "p(z) = N(0, I) (Kingma & Welling 2014)")
class StandardPrior(nn.Module):
    """p(z) = N(0, I)."""

    def __init__(self, latent: int) -> None:
        super().__init__()
        self.latent = latent
        self.register_buffer("zero", torch.zeros(()), persistent=False)

    @classmethod
    def build(cls, latent: int, data_shape: Sequence[int], hidden: Sequence[int], activation: str,
              pseudo_inputs: int = 500, prior_steps: int = 4) -> StandardPrior:
        """From a model's options (see `make_prior`); takes only `latent`."""
        return cls(latent)

    def forward(self, batch: int) -> dist.Distribution:
        # a fresh zero (on the buffer's device), not the buffer: a captured graph folds it away
        return dist.Normal(torch.zeros((), device=self.zero.device), 1.0).expand([batch, self.latent]).to_event(1)


@PRIORS.register("vampprior", "a mixture of q(z|u_k) at K learned pseudo-inputs u_k (Tomczak & Welling 2018)")
class VampPrior(nn.Module):
    """p(z) = 1/K sum_k q_phi(z | u_k): a mixture of the encoder's posteriors at K learned pseudo-inputs.

    The pseudo-inputs u_k live in the data space (clipped to [0, 1] by a hardtanh, as in the
    paper); the encoder is the prior's own MLP (see the module docstring for why).

    Args:
        latent: size of z.
        data_shape: event shape of one example (the pseudo-inputs' shape).
        hidden: encoder hidden sizes.
        activation: nonlinearity.
        pseudo_inputs: K.

    References:
        Tomczak & Welling (2018), VAE with a VampPrior, sec. 3, eq. 9.
    """

    min_scale = 1e-4

    def __init__(self, latent: int, data_shape: Sequence[int], hidden: Sequence[int] = (200, 200), activation: str = "tanh", pseudo_inputs: int = 500) -> None:
        super().__init__()
        if pseudo_inputs < 1:
            raise PyrovaeError(f"pseudo_inputs must be positive, got {pseudo_inputs}")
        dim = math.prod(data_shape)
        self.latent = latent
        self.pseudo = nn.Parameter(0.5 + 0.01 * torch.randn(pseudo_inputs, dim))
        self.encoder = MLP(dim, list(hidden), 2 * latent, activation)

    @classmethod
    def build(cls, latent: int, data_shape: Sequence[int], hidden: Sequence[int], activation: str,
              pseudo_inputs: int = 500, prior_steps: int = 4) -> VampPrior:
        """From a model's options (see `make_prior`): the encoder copies the model's hidden sizes and activation."""
        return cls(latent, data_shape, hidden, activation, pseudo_inputs)

    def components(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Locations and scales (K, latent) of q(z | u_k)."""
        loc, raw = self.encoder(hardtanh(self.pseudo, 0.0, 1.0)).chunk(2, dim=-1)
        return loc, softplus(raw) + self.min_scale

    def forward(self, batch: int) -> dist.Distribution:
        loc, scale = self.components()
        mix = dist.Categorical(logits=loc.new_zeros(len(loc)))
        mixture = dist.MixtureSameFamily(mix, dist.Normal(loc, scale).to_event(1))
        return mixture.expand([batch])


@PRIORS.register("flow", "N(0, I) through affine coupling layers (Real NVP, Dinh et al. 2017)")
class FlowPrior(nn.Module):
    """p(z) = N(0, I) pushed through `steps` affine coupling layers, reversing the order between them.

    log p(z) = log N(f^-1(z)) + log|det d f^-1 / dz|; each coupling is inverted analytically,
    so any z (the guide's sample) is scored exactly.

    Args:
        latent: size of z (at least 2).
        steps: number of coupling layers.
        hidden: hidden sizes of each coupling's network (default [10 d, 10 d]).

    References:
        Dinh, Sohl-Dickstein & Bengio (2017), Real NVP, sec. 3.3-3.5;
        Kingma & Welling (2019), sec. 4.4.
    """

    def __init__(self, latent: int, steps: int = 4, hidden: Sequence[int] | None = None) -> None:
        super().__init__()
        if latent < 2:
            raise PyrovaeError("the flow prior needs a latent of size >= 2 (coupling layers split z in two)")
        if steps < 1:
            raise PyrovaeError(f"prior_steps must be positive, got {steps}")
        hidden = list(hidden) if hidden else [10 * latent, 10 * latent]
        split = latent // 2
        self.latent = latent
        self.couplings = nn.ModuleList(
            AffineCoupling(split, DenseNN(split, hidden, [latent - split, latent - split])) for _ in range(steps)
        )
        self.register_buffer("zero", torch.zeros(()), persistent=False)
        self.register_buffer("reverse", torch.arange(latent - 1, -1, -1), persistent=False)

    @classmethod
    def build(cls, latent: int, data_shape: Sequence[int], hidden: Sequence[int], activation: str,
              pseudo_inputs: int = 500, prior_steps: int = 4) -> FlowPrior:
        """From a model's options (see `make_prior`): `prior_steps` couplings of the default width."""
        return cls(latent, prior_steps)

    def transforms(self) -> list:
        out: list = []
        for i, coupling in enumerate(self.couplings):
            if i:
                out.append(Permute(self.reverse))
            out.append(coupling)
        return out

    def base(self, batch: int) -> dist.Distribution:
        return dist.Normal(self.zero, 1.0).expand([batch, self.latent]).to_event(1)

    def forward(self, batch: int) -> dist.Distribution:
        return dist.TransformedDistribution(self.base(batch), self.transforms())


def make_prior(
    name: str,
    latent: int,
    data_shape: Sequence[int],
    hidden: Sequence[int],
    activation: str,
    pseudo_inputs: int = 500,
    prior_steps: int = 4,
) -> nn.Module:
    """The prior registered as `name` (`pyrovae.registry.PRIORS`) for a latent of size `latent`.

    An unknown name raises `PyrovaeError` with the registered names closest to it.
    """
    return PRIORS.get(name).build(latent, data_shape, hidden, activation, pseudo_inputs, prior_steps)
