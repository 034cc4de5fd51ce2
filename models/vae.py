"""The variational autoencoder's generative model (Kingma & Welling 2019, sec. 2.4-2.5)."""

from __future__ import annotations

import math
from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae.conv import AutoregressiveBernoulli, ConvDecoder, PixelCNN
from pyrovae.errors import PyrovaeError
from pyrovae.models.priors import make_prior
from pyrovae.nets import LIKELIHOODS, MLP, Bernoulli, Likelihood
from pyrovae.registry import MODELS
from pyrovae.sites import data_plate, register

__all__ = ["DECODERS", "VAE", "DecoderMixin"]

DECODERS = ("mlp", "conv", "pixelcnn")


class DecoderMixin:
    """p(x|z) as an MLP, a conv/deconv net, or a PixelCNN conditioned on z (sec. 2.4, 4.3).

    Sets ``self.decoder`` (the network), ``self.likelihood`` (the head) and ``self.decoder_kind``.
    The pixelcnn decoder gives an `AutoregressiveBernoulli`: exact log p(x|z), ancestral
    sampling pixel by pixel; it takes the bernoulli or continuous-bernoulli likelihood.

    References:
        Kingma & Welling (2019), sec. 2.4.3 and 4.3; Gulrajani et al. (2017), PixelVAE, sec. 3.
    """

    decoder: nn.Module
    likelihood: Likelihood

    def build_decoder(
        self, kind: str, latent: int, data_shape: torch.Size, hidden: Sequence[int], activation: str,
        likelihood: str, pixel_layers: int = 3, pixel_channels: int = 32,
    ) -> None:
        if kind not in DECODERS:
            raise PyrovaeError(f"unknown decoder {kind!r}: choose from {', '.join(DECODERS)}")
        if likelihood not in LIKELIHOODS:
            raise PyrovaeError(f"unknown likelihood {likelihood!r}: choose from {', '.join(LIKELIHOODS)}")
        dim = math.prod(data_shape)
        self.decoder_kind = kind
        # floats one decoded sample holds at once: evaluation sizes its chunks by this
        self.elements_per_sample = dim * (1 + 2 * pixel_channels if kind == "pixelcnn" else 1)
        self.likelihood = LIKELIHOODS[likelihood](dim)
        if kind == "mlp":
            self.decoder = MLP(latent, list(hidden), self.likelihood.outputs(), activation)
        elif kind == "conv":
            if self.likelihood.outputs() != dim:
                raise PyrovaeError(f"the conv decoder emits one value per pixel: the {likelihood} likelihood needs {self.likelihood.outputs()}")
            self.decoder = ConvDecoder(latent, data_shape, 1, "relu")
        else:
            if likelihood not in ("bernoulli", "continuous-bernoulli"):
                raise PyrovaeError("the pixelcnn decoder takes --likelihood bernoulli or continuous-bernoulli")
            if pixel_layers < 0 or pixel_channels < 1:
                raise PyrovaeError("pixel_layers must be >= 0 and pixel_channels positive")
            self.decoder = PixelCNN(data_shape, latent, pixel_channels, pixel_layers, "relu")
        self._continuous = likelihood == "continuous-bernoulli"
        self._dim = dim

    def decode(self, z: torch.Tensor) -> dist.Distribution:
        """p(x|z) for a batch of z, over flattened examples."""
        if self.decoder_kind == "pixelcnn":
            return AutoregressiveBernoulli(self.decoder, z, self._dim, continuous=self._continuous)
        return self.likelihood(self.decoder(z))

    def check_data(self, x: torch.Tensor) -> None:
        self.likelihood.check(x)

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """Start p(x|z) at the data's marginal: an MLP decoder's output bias becomes the logit of
        each pixel's mean over `x` (Bernoulli likelihood), as Burda et al. (2016) initialize it.

        Without it the first few hundred steps fit the marginal with large updates, and the
        decoder learns to ignore z: measured on binarized MNIST, a VampPrior VAE then sits at
        the z-free bound (-207 nats) for two epochs; started at the marginal it reaches
        -137 nats of training loss in 400 steps. `pyrovae fit` calls this on the training set.
        """
        if self.decoder_kind != "mlp" or not isinstance(self.likelihood, Bernoulli):
            return
        output = [m for m in self.decoder.modules() if isinstance(m, nn.Linear)][-1]
        mean = x.reshape(len(x), -1).float().mean(0).clamp(1e-3, 1 - 1e-3)
        output.bias.copy_(torch.logit(mean).to(output.bias))

    def mean(self, d: dist.Distribution) -> torch.Tensor:
        """The mean of p(x|z) (for pixelcnn: the per-pixel means along one ancestral draw)."""
        if self.decoder_kind == "pixelcnn":
            return d.mean
        return self.likelihood.mean(d)


@MODELS.register("vae", "p(z) p(x|z): standard/vampprior/flow prior; mlp, conv or pixelcnn decoder")
class VAE(DecoderMixin, nn.Module):
    """p(z) p(x|z) with z ~ N(0, I) (or a learned prior) and an MLP (or conv, PixelCNN) decoder.

    Args:
        data_shape: the event shape of one example (flattened by the decoder).
        latent: size of z.
        hidden: hidden layer sizes of the decoder, nearest z first.
        activation: nonlinearity name (see `pyrovae.nets.ACTIVATIONS`).
        likelihood: ``"bernoulli"`` for binary data, ``"continuous-bernoulli"`` or ``"gaussian"``.
        prior: ``"standard"``, ``"vampprior"`` or ``"flow"`` (see `pyrovae.models.priors`).
        decoder: ``"mlp"``, ``"conv"`` (square images) or ``"pixelcnn"`` (square images).
        pseudo_inputs: K of the VampPrior.
        prior_steps: coupling layers of the flow prior.
        pixel_layers, pixel_channels: depth (mask-B layers) and width of the PixelCNN.

    References:
        Kingma & Welling (2019), An Introduction to Variational Autoencoders, sec. 2.4.3, 4.3, 4.4;
        Tomczak & Welling (2018); Gulrajani et al. (2017), PixelVAE.
    """

    def __init__(
        self,
        data_shape: Sequence[int],
        latent: int = 50,
        hidden: Sequence[int] = (200, 200),
        activation: str = "tanh",
        likelihood: str = "bernoulli",
        prior: str = "standard",
        decoder: str = "mlp",
        pseudo_inputs: int = 500,
        prior_steps: int = 4,
        pixel_layers: int = 3,
        pixel_channels: int = 32,
    ) -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise PyrovaeError(f"unknown likelihood {likelihood!r}: choose from {', '.join(LIKELIHOODS)}")
        if latent < 1 or any(h < 1 for h in hidden):
            raise PyrovaeError("--latent and --hidden sizes must be positive")
        self.data_shape = torch.Size(data_shape)
        self.latent = latent
        self.build_decoder(decoder, latent, self.data_shape, hidden, activation, likelihood, pixel_layers, pixel_channels)
        self.z_prior = make_prior(prior, latent, self.data_shape, hidden, activation, pseudo_inputs, prior_steps)

    def prior(self, batch: int) -> dist.Distribution:
        return self.z_prior(batch)

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None, size: int | None = None) -> None:
        register("vae", self)
        with data_plate(x, index, size):
            z = pyro.sample("z", self.prior(len(x)))
            pyro.sample("x", self.decode(z), obs=x.reshape(len(x), -1))
