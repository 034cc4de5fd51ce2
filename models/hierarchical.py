"""A VAE with L stochastic layers: p(z_L) p(z_{L-1}|z_L) ... p(z_1|z_2) p(x|z_1) (sec. 4.1).

Sites ``"z1"`` (nearest the data) to ``"zL"`` (the top), sampled top first, then ``"x"``.
Each conditional p(z_i | z_{i+1}) is a diagonal Gaussian whose mean and scale an MLP
computes; the top prior is standard, a VampPrior or a flow prior, and the decoder p(x|z_1) an
MLP, a conv net or a PixelCNN, each looked up by name in `pyrovae.registry.PRIORS`,
`DECODERS` and `LIKELIHOODS` (`pyrovae.models.priors.make_prior`, `pyrovae.models.vae.DecoderMixin`).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn.functional import softplus

from pyrovae.errors import PyrovaeError
from pyrovae.models.priors import make_prior
from pyrovae.models.vae import DecoderMixin
from pyrovae.nets import MLP
from pyrovae.registry import MODELS
from pyrovae.sites import data_plate, register

__all__ = ["Hierarchical"]


@MODELS.register("hierarchical", "L stochastic layers p(z_L) ... p(z_1|z_2) p(x|z_1), Gaussian MLP conditionals (sec. 4.1)")
class Hierarchical(DecoderMixin, nn.Module):
    """A deep latent-variable model with a top-down chain of Gaussian conditionals.

    Args:
        data_shape: event shape of one example.
        latent: size of z_1.
        hidden: hidden sizes of every MLP (decoder and conditionals).
        activation: nonlinearity.
        likelihood: the head of p(x|z_1), a name in `pyrovae.registry.LIKELIHOODS`.
        layers: L >= 2, the number of stochastic layers.
        latents: sizes of z_1..z_L (overrides `latent`); default: `latent` halved per layer up (at least 2).
        prior: the top layer's prior, a name in `pyrovae.registry.PRIORS`: "standard", "vampprior" or "flow".
        decoder: a name in `pyrovae.registry.DECODERS`: "mlp", "conv" or "pixelcnn".
        pseudo_inputs, prior_steps: options of the learned priors.
        pixel_layers, pixel_channels: options of the PixelCNN decoder.

    References:
        Kingma & Welling (2019), An Introduction to Variational Autoencoders, sec. 4.1 (eq. 4.1);
        Burda, Grosse & Salakhutdinov (2016), IWAE, sec. 5 (the two-layer architecture);
        Sønderby et al. (2016), Ladder Variational Autoencoders, sec. 2.
    """

    min_scale = 1e-4

    def __init__(
        self,
        data_shape: Sequence[int],
        latent: int = 50,
        hidden: Sequence[int] = (200, 200),
        activation: str = "tanh",
        likelihood: str = "bernoulli",
        layers: int = 2,
        latents: Sequence[int] | None = None,
        prior: str = "standard",
        decoder: str = "mlp",
        pseudo_inputs: int = 500,
        prior_steps: int = 4,
        pixel_layers: int = 3,
        pixel_channels: int = 32,
    ) -> None:
        super().__init__()
        if latents is None:
            latents = [max(min(2, latent), latent // 2**i) for i in range(layers)]
        latents = [int(v) for v in (latents if not isinstance(latents, (int, str)) else str(latents).split(","))]
        self.layers = len(latents)
        if self.layers < 2:
            raise PyrovaeError(f"the hierarchical model needs --layers >= 2 (got {self.layers}); use --model vae for one layer")
        if layers not in (2, self.layers):
            raise PyrovaeError(f"--layers {layers} disagrees with latents={latents}")
        if min(latents) < 1 or any(h < 1 for h in hidden):
            raise PyrovaeError("latent and hidden sizes must be positive")
        self.data_shape = torch.Size(data_shape)
        self.latents = latents
        self.latent = latents[0]
        self.build_decoder(decoder, latents[0], self.data_shape, hidden, activation, likelihood, pixel_layers, pixel_channels)
        # conditionals[i] is p(z_{i+1} | z_{i+2}) in 0-based list terms: z1 | z2, z2 | z3, ...
        self.conditionals = nn.ModuleList(
            MLP(latents[i + 1], list(hidden), 2 * latents[i], activation) for i in range(self.layers - 1)
        )
        self.top_prior = make_prior(prior, latents[-1], self.data_shape, hidden, activation, pseudo_inputs, prior_steps)

    @staticmethod
    def site(i: int) -> str:
        """The site name of layer i (1-based)."""
        return f"z{i}"

    def conditional_params(self, i: int, above: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and scale of p(z_i | z_{i+1} = above), i in 1..L-1."""
        loc, raw = self.conditionals[i - 1](above).chunk(2, dim=-1)
        return loc, softplus(raw) + self.min_scale

    def conditional(self, i: int, above: torch.Tensor) -> dist.Distribution:
        loc, scale = self.conditional_params(i, above)
        return dist.Normal(loc, scale).to_event(1)

    def prior(self, batch: int) -> dist.Distribution:
        """p(z_L)."""
        return self.top_prior(batch)

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None, size: int | None = None) -> None:
        register("hierarchical", self)
        with data_plate(x, index, size):
            z = pyro.sample(self.site(self.layers), self.prior(len(x)))
            for i in range(self.layers - 1, 0, -1):
                z = pyro.sample(self.site(i), self.conditional(i, z))
            pyro.sample("x", self.decode(z), obs=x.reshape(len(x), -1))
