"""The variational autoencoder's generative model (Kingma & Welling 2019, sec. 2.4-2.5)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae.conv import AutoregressiveBernoulli, ConvDecoder, PixelCNN
from pyrovae.errors import PyrovaeError
from pyrovae.models.priors import make_prior
from pyrovae.nets import LIKELIHOODS, MLP, Bernoulli, Likelihood
from pyrovae.registry import DECODERS, MODELS
from pyrovae.sites import data_plate, register

__all__ = ["DECODERS", "VAE", "DecoderMixin", "DecoderSpec"]


@dataclass(frozen=True)
class DecoderSpec:
    """What a decoder builder in `pyrovae.registry.DECODERS` is given: the model's options and its head.

    A builder ``(spec) -> nn.Module`` returns the network that maps z (..., latent) to the head's
    ``head.outputs()`` features, or a `PixelCNN`, which `DecoderMixin.decode` turns into an
    `AutoregressiveBernoulli` instead of calling the head.
    """

    latent: int
    data_shape: torch.Size
    hidden: Sequence[int]
    activation: str
    likelihood: str  # the head's registered name
    head: Likelihood
    pixel_layers: int = 3
    pixel_channels: int = 32


DecoderBuilder = Callable[[DecoderSpec], nn.Module]


@DECODERS.register("mlp", "z -> fully connected layers -> the likelihood head's parameters (Kingma & Welling 2014)")
def mlp_decoder(spec: DecoderSpec) -> nn.Module:
    """An MLP with the model's hidden sizes and activation (Kingma & Welling 2019, sec. 2.4.3)."""
    return MLP(spec.latent, list(spec.hidden), spec.head.outputs(), spec.activation)


@DECODERS.register("conv", "z -> a linear layer -> transposed convolutions, one value per pixel (square images)")
def conv_decoder(spec: DecoderSpec) -> nn.Module:
    """Transposed convolutions onto a square image (Kingma & Welling 2019, sec. 4.3)."""
    dim = math.prod(spec.data_shape)
    if spec.head.outputs() != dim:
        raise PyrovaeError(f"the conv decoder emits one value per pixel: the {spec.likelihood} likelihood needs {spec.head.outputs()}")
    return ConvDecoder(spec.latent, spec.data_shape, 1, "relu")


@DECODERS.register("pixelcnn", "PixelCNN conditioned on z: exact autoregressive p(x|z) (PixelVAE, Gulrajani et al. 2017)")
def pixelcnn_decoder(spec: DecoderSpec) -> nn.Module:
    """Masked convolutions over the pixels, z entering every layer (Gulrajani et al. 2017, sec. 3)."""
    if spec.likelihood not in ("bernoulli", "continuous-bernoulli"):
        raise PyrovaeError("the pixelcnn decoder takes --likelihood bernoulli or continuous-bernoulli")
    if spec.pixel_layers < 0 or spec.pixel_channels < 1:
        raise PyrovaeError("pixel_layers must be >= 0 and pixel_channels positive")
    return PixelCNN(spec.data_shape, spec.latent, spec.pixel_channels, spec.pixel_layers, "relu")


class DecoderMixin:
    """p(x|z) as an MLP, a conv/deconv net, or a PixelCNN conditioned on z (sec. 2.4, 4.3).

    Sets ``self.decoder`` (the network, built by the `DECODERS` entry named `kind`),
    ``self.likelihood`` (the `LIKELIHOODS` head) and ``self.decoder_kind``; unknown names raise
    the registries' `PyrovaeError` with the closest registered names.
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
        build: DecoderBuilder = DECODERS.get(kind)
        head: type[Likelihood] = LIKELIHOODS.get(likelihood)
        dim = math.prod(data_shape)
        self.decoder_kind = kind
        self.likelihood = head(dim)
        spec = DecoderSpec(latent, torch.Size(data_shape), tuple(hidden), activation, likelihood, self.likelihood, pixel_layers, pixel_channels)
        self.decoder = build(spec)
        self._autoregressive = isinstance(self.decoder, PixelCNN)
        # floats one decoded sample holds at once: evaluation sizes its chunks by this
        self.elements_per_sample = dim * (1 + 2 * self.decoder.channels if self._autoregressive else 1)
        self._continuous = likelihood == "continuous-bernoulli"
        self._dim = dim

    def decode(self, z: torch.Tensor) -> dist.Distribution:
        """p(x|z) for a batch of z, over flattened examples."""
        if self._autoregressive:
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
        if self._autoregressive:
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
        likelihood: ``"bernoulli"`` for binary data, ``"continuous-bernoulli"`` or ``"gaussian"`` (`pyrovae.registry.LIKELIHOODS`).
        prior: ``"standard"``, ``"vampprior"`` or ``"flow"`` (`pyrovae.registry.PRIORS`).
        decoder: ``"mlp"``, ``"conv"`` (square images) or ``"pixelcnn"`` (square images) (`pyrovae.registry.DECODERS`).
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
