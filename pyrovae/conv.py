"""Convolutional trunks for square images, masked convolutions, and autoregressive pixel likelihoods.

Data are held flat (``data_shape == (side * side,)``); these networks reshape to one channel
of ``side x side`` pixels, so they work for any square image (8x8 digits, 28x28 MNIST).

References:
    van den Oord, Kalchbrenner & Kavukcuoglu (2016), Pixel Recurrent Neural Networks, sec. 3.5
    (masked convolutions, masks A and B); Gulrajani et al. (2017), PixelVAE, sec. 3;
    Germain, Gregor, Murray & Larochelle (2015), MADE, sec. 4;
    Kingma & Welling (2019), An Introduction to Variational Autoencoders, sec. 4.3.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import nn
from torch.nn import functional as F

from pyrovae.errors import PyrovaeError
from pyrovae.nets import activation

__all__ = [
    "AutoregressiveBernoulli",
    "ConvDecoder",
    "ConvEncoder",
    "MADE",
    "MaskedConv2d",
    "PixelCNN",
    "image_side",
]


def image_side(data_shape: Sequence[int], what: str = "a convolutional network") -> int:
    """The side of a square one-channel image with `data_shape` (flat or (side, side))."""
    size = math.prod(data_shape)
    side = math.isqrt(size)
    if side * side != size or side < 4:
        raise PyrovaeError(f"{what} needs square images of at least 4x4 pixels; these examples have shape {tuple(data_shape)}")
    return side


class ConvEncoder(nn.Module):
    """Two stride-2 3x3 convolutions (32, 64 channels) and a linear layer to `features`.

    Maps flat images (B, side*side) to features (B, features): a drop-in for an MLP trunk.
    """

    def __init__(self, data_shape: Sequence[int], features: int, act: str = "relu", channels: int = 32) -> None:
        super().__init__()
        self.side = image_side(data_shape, "the conv encoder")
        self.convs = nn.Sequential(
            nn.Conv2d(1, channels, 3, stride=2, padding=1), activation(act),
            nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), activation(act),
        )
        reduced = math.ceil(math.ceil(self.side / 2) / 2)  # two stride-2 convolutions
        self.linear = nn.Linear(2 * channels * reduced * reduced, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[:-1] if x.shape[-1] == self.side * self.side else x.shape[:-2]
        h = self.convs(x.reshape(-1, 1, self.side, self.side))
        return self.linear(h.flatten(1)).reshape(*batch, -1)


class ConvDecoder(nn.Module):
    """z -> a linear layer to a (2c, s/4, s/4) map -> two stride-2 transposed convolutions -> (out, side, side).

    The output is cropped to ``side x side`` and returned flat, (..., out_channels * side * side).
    """

    def __init__(self, latent: int, data_shape: Sequence[int], out_channels: int = 1, act: str = "relu", channels: int = 32) -> None:
        super().__init__()
        self.side = image_side(data_shape, "the conv decoder")
        self.out_channels = out_channels
        self.base = -(-self.side // 4)
        self.channels = channels
        self.linear = nn.Sequential(nn.Linear(latent, 2 * channels * self.base * self.base), activation(act))
        self.deconvs = nn.Sequential(
            nn.ConvTranspose2d(2 * channels, channels, 4, stride=2, padding=1), activation(act),
            nn.ConvTranspose2d(channels, out_channels, 4, stride=2, padding=1),
        )

    def feature_map(self, z: torch.Tensor) -> torch.Tensor:
        """(N, out_channels, side, side) for z of shape (N, latent)."""
        h = self.linear(z).reshape(-1, 2 * self.channels, self.base, self.base)
        return self.deconvs(h)[..., : self.side, : self.side]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch = z.shape[:-1]
        return self.feature_map(z.reshape(-1, z.shape[-1])).reshape(*batch, -1)


class MaskedConv2d(nn.Conv2d):
    """A convolution that sees only pixels before the centre in raster order.

    Mask ``"A"`` (first layer) also hides the centre pixel; mask ``"B"`` (later layers) lets
    it through, since there it carries features of the pixels before it only.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, mask_type: str) -> None:
        if mask_type not in ("A", "B") or kernel_size % 2 == 0:
            raise ValueError("mask_type is 'A' or 'B' and kernel_size odd")
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        mask = torch.ones(kernel_size, kernel_size)
        c = kernel_size // 2
        mask[c, c + (mask_type == "B") :] = 0
        mask[c + 1 :] = 0
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class PixelCNN(nn.Module):
    """Per-pixel logits of x given the pixels before it and a conditioning vector z (PixelVAE).

    One mask-A 7x7 (or smaller) convolution, then `layers` residual mask-B 3x3 convolutions,
    then two 1x1 convolutions to one logit per pixel. z enters every layer as a feature map
    from a `ConvDecoder` (a function of z only, so the raster-order masking is kept).

    References:
        Gulrajani et al. (2017), PixelVAE: A Latent Variable Model for Natural Images, sec. 3;
        van den Oord et al. (2016), Pixel Recurrent Neural Networks, sec. 3.5.
    """

    def __init__(self, data_shape: Sequence[int], latent: int | None, channels: int = 32, layers: int = 3, act: str = "relu") -> None:
        super().__init__()
        self.side = image_side(data_shape, "the PixelCNN decoder")
        first = 7 if self.side >= 14 else 5
        self.input = MaskedConv2d(1, channels, first, "A")
        self.hidden = nn.ModuleList(MaskedConv2d(channels, channels, 3, "B") for _ in range(layers))
        self.output = nn.Sequential(activation(act), nn.Conv2d(channels, channels, 1), activation(act), nn.Conv2d(channels, 1, 1))
        self.act = activation(act)
        self.condition = None if latent is None else ConvDecoder(latent, data_shape, channels * (layers + 1), act)
        self.channels, self.layers = channels, layers

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (N, side*side) for flat images x (N, side*side) and z (N, latent)."""
        h = self.input(x.reshape(-1, 1, self.side, self.side))
        conds = [None] * (self.layers + 1)
        if self.condition is not None:
            conds = list(self.condition.feature_map(z).split(self.channels, dim=1))
        if conds[0] is not None:
            h = h + conds[0]
        for layer, cond in zip(self.hidden, conds[1:]):
            update = layer(self.act(h))
            h = h + (update if cond is None else update + cond)
        return self.output(h).flatten(1)


class _MaskedLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor) -> None:
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """Masked autoencoder: logit d depends on x_1..x_{d-1} only (raster order).

    Hidden units get degrees 1..D-1 cyclically; a connection k -> j exists iff
    deg(j) >= deg(k) between hidden layers and deg(out d) > deg(k) into the output.

    References:
        Germain, Gregor, Murray & Larochelle (2015), MADE: Masked Autoencoder for Distribution
        Estimation, sec. 4 (masks), with the deterministic ordering and cyclic degrees.
    """

    def __init__(self, dim: int, hidden: Sequence[int], act: str = "relu") -> None:
        super().__init__()
        if dim < 2:
            raise PyrovaeError("MADE needs at least two dimensions")
        degrees = [torch.arange(1, dim + 1)]
        for h in hidden:
            degrees.append(torch.arange(h) % max(dim - 1, 1) + 1)
        layers: list[nn.Module] = []
        for i, h in enumerate(hidden):
            mask = (degrees[i + 1][:, None] >= degrees[i][None, :]).float()
            layers += [_MaskedLinear(len(degrees[i]), h, mask), activation(act)]
        out_mask = (degrees[0][:, None] > degrees[-1][None, :]).float()
        layers.append(_MaskedLinear(len(degrees[-1]), dim, out_mask))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x)


class AutoregressiveBernoulli(dist.TorchDistribution):
    """prod_d p(x_d | x_<d, z): per-pixel (continuous) Bernoulli with logits from a masked network.

    `log_prob(x)` is exact (one network pass on x itself). `sample()` draws pixel by pixel
    (D network passes), and `mean` is the per-pixel probability (mean) of each pixel given the
    pixels drawn before it in one such ancestral draw: what a sample grid should show. The draw
    behind `mean` is cached, so `sample()` then `mean` costs one pass of D steps.

    Args:
        net: ``net(x_flat (N, D), z (N, L) or None) -> logits (N, D)``, autoregressive in raster order.
        z: conditioning (batch..., L), or None.
        dim: D.
        batch_shape: the batch shape when z is None.
        continuous: use the continuous Bernoulli per pixel (data in [0, 1]).
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, net: Callable, z: torch.Tensor | None, dim: int, batch_shape: Sequence[int] = (), continuous: bool = False, like: torch.Tensor | None = None) -> None:
        self.net, self.z, self.dim, self.continuous = net, z, dim, continuous
        self._like = like if like is not None else z
        batch = z.shape[:-1] if z is not None else torch.Size(batch_shape)
        self._drawn: tuple[torch.Tensor, torch.Tensor] | None = None
        super().__init__(torch.Size(batch), torch.Size([dim]), validate_args=False)

    @constraints.dependent_property
    def support(self):
        return constraints.independent(constraints.unit_interval if self.continuous else constraints.boolean, 1)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        z = None if self.z is None else self.z.expand(batch_shape + self.z.shape[-1:])
        return AutoregressiveBernoulli(self.net, z, self.dim, batch_shape, self.continuous, self._like)

    def _pixel(self, logits: torch.Tensor) -> torch.distributions.Distribution:
        if self.continuous:
            return torch.distributions.ContinuousBernoulli(logits=logits, validate_args=False)
        return torch.distributions.Bernoulli(logits=logits, validate_args=False)

    def logits(self, value: torch.Tensor) -> torch.Tensor:
        shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        v = value.expand(shape + (self.dim,)).reshape(-1, self.dim)
        z = None if self.z is None else self.z.expand(shape + self.z.shape[-1:]).reshape(-1, self.z.shape[-1])
        return self.net(v, z).reshape(shape + (self.dim,))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        value = value.to(self._dtype())
        return self._pixel(self.logits(value)).log_prob(value.expand(torch.broadcast_shapes(value.shape, self.batch_shape + (self.dim,)))).sum(-1)

    def _dtype(self) -> torch.dtype:
        for p in getattr(self.net, "parameters", lambda: iter(()))():
            return p.dtype
        return torch.get_default_dtype()

    @torch.no_grad()
    def _draw(self, sample_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        shape = torch.Size(sample_shape) + self.batch_shape + (self.dim,)
        ref = next(iter(getattr(self.net, "parameters", lambda: iter(()))()), None)
        x = torch.zeros(shape, dtype=self._dtype(), device=None if ref is None else ref.device)
        means = torch.zeros_like(x)
        z = None if self.z is None else self.z.expand(shape[:-1] + self.z.shape[-1:])
        d = AutoregressiveBernoulli(self.net, z, self.dim, shape[:-1], self.continuous)
        for i in range(self.dim):
            pixel = self._pixel(d.logits(x)[..., i])
            means[..., i] = pixel.mean
            x[..., i] = pixel.sample()
        return x, means

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        x, means = self._draw(torch.Size(sample_shape))
        self._drawn = (x, means)
        return x

    @property
    def mean(self) -> torch.Tensor:
        if self._drawn is None:
            self._drawn = self._draw(torch.Size())
        return self._drawn[1]
