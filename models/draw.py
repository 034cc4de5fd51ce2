"""DRAW, the Deep Recurrent Attentive Writer (Gregor, Danihelka, Graves, Rezende & Wierstra 2015;
Kingma & Welling 2019, sec. 1.1: models with attention).

An image is drawn in T steps: a latent z_t ~ N(0, I) per step drives a decoder LSTM, whose
state writes a patch onto a canvas through a grid of Gaussian filters (the *write* attention);
the image is Bernoulli with logits the final canvas c_T. The guide (`pyrovae.guides.draw`)
*reads* a patch of the image and of its error image x - sigmoid(c_{t-1}) through the same kind
of filters, placed by the decoder's state. ``read=0, write=0`` is the variant without attention
(the whole image read, the whole canvas written).

Every latent is continuous and reparameterized and every step is scored, so the ELBO is exact
and importance-sampled log p(x) is the same estimator as for every other model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae.errors import PyrovaeError
from pyrovae.registry import MODELS
from pyrovae.sites import data_plate, register

__all__ = ["DRAW", "DecoderState", "Filterbank", "filterbank", "lstm_step"]


def filterbank(center: torch.Tensor, stride: torch.Tensor, variance: torch.Tensor, n: int, size: int) -> torch.Tensor:
    """The (..., n, size) matrix of n Gaussian filters over `size` pixels (Gregor et al. 2015, eq. 19-20).

    Filter i (0-based) is centred at ``center + (i - n/2 + 1/2) stride`` on the pixel coordinates
    1 .. size, each row normalized to sum to 1 (a row wholly off the image stays near zero).
    """
    offsets = torch.arange(n, dtype=center.dtype, device=center.device) - n / 2 + 0.5
    means = center[..., None] + offsets * stride[..., None]
    pixels = torch.arange(1, size + 1, dtype=center.dtype, device=center.device)
    weights = torch.exp(-((pixels - means[..., None]) ** 2) / (2 * variance[..., None, None]))
    return weights / weights.sum(-1, keepdim=True).clamp(min=1e-8)


class Filterbank(nn.Module):
    """An N x N grid of Gaussian filters on an image of side `side`, placed by a state h:
    a linear map to (g~x, g~y, log sigma^2, log delta~, log gamma) (Gregor et al. 2015, eq. 21-24)."""

    def __init__(self, state: int, side: int, n: int, writes: bool = False) -> None:
        super().__init__()
        if n < 1 or n > side:
            raise PyrovaeError(f"an attention grid of {n} x {n} filters does not fit an image of side {side}")
        self.side, self.n = side, n
        self.params = nn.Linear(state, 5)
        stride = max((side - 1) / max(n - 1, 1), 1.0)
        with torch.no_grad():
            # The grid starts over the whole image, each filter half a stride wide; a write grid
            # starts at the gamma that makes a patch of ones write 1 on the average pixel (at
            # gamma = 1 that is ~1 / stride^2, 0.02 for 5 x 5 on 28 x 28, and training stalls at
            # the blank canvas).
            self.params.bias[2] = 2 * math.log(stride / 2)
            if writes:
                fx, fy = self.place(*self.params.bias[:4])
                self.params.bias[4] = torch.log((fy.T @ torch.ones(n, n) @ fx).mean())

    def filters(self, h: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """F_X and F_Y, (..., N, side) each, and the intensity gamma (...)."""
        gx, gy, log_variance, log_stride, log_gamma = self.params(h).unbind(-1)
        return self.place(gx, gy, log_variance, log_stride), torch.exp(log_gamma)

    def place(self, gx: torch.Tensor, gy: torch.Tensor, log_variance: torch.Tensor, log_stride: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """F_X and F_Y for the grid's raw parameters (eq. 22-24)."""
        a = self.side
        stride = (a - 1) / max(self.n - 1, 1) * torch.exp(log_stride)
        variance = torch.exp(log_variance)
        fx = filterbank((a + 1) / 2 * (gx + 1), stride, variance, self.n, a)
        fy = filterbank((a + 1) / 2 * (gy + 1), stride, variance, self.n, a)
        return fx, fy

    def read(self, images: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """gamma F_Y x F_X^T of each (..., side * side) image, flattened to (..., N * N) (eq. 27)."""
        (fx, fy), gamma = self.filters(h)
        x = images.reshape(*images.shape[:-1], self.side, self.side)
        glimpse = fy @ x @ fx.transpose(-1, -2)
        return gamma[..., None] * glimpse.flatten(-2)

    def write(self, patch: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """(1 / gamma) F_Y^T w F_X of an (..., N * N) patch w, flattened to (..., side * side) (eq. 29)."""
        (fx, fy), gamma = self.filters(h)
        w = patch.reshape(*patch.shape[:-1], self.n, self.n)
        return (fy.transpose(-1, -2) @ w @ fx).flatten(-2) / gamma[..., None]


class DecoderState(NamedTuple):
    """The decoder's recurrence after step t: its LSTM state and the canvas c_t (logits)."""

    h: torch.Tensor
    cell: torch.Tensor
    canvas: torch.Tensor


def lstm_step(cell: nn.LSTMCell, inputs: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An LSTM cell on inputs and states with any leading dims (particles, examples)."""
    lead = torch.broadcast_shapes(inputs.shape[:-1], h.shape[:-1])
    flat = [t.expand(*lead, t.shape[-1]).reshape(-1, t.shape[-1]) for t in (inputs, h, c)]
    h_new, c_new = cell(flat[0], (flat[1], flat[2]))
    return h_new.reshape(*lead, -1), c_new.reshape(*lead, -1)


@MODELS.register("draw", "DRAW: T steps of z_t ~ N(0,I), a decoder LSTM writing to a canvas through Gaussian attention (Gregor et al. 2015)")
class DRAW(nn.Module):
    """p(x, z_{1:T}) = prod_t N(z_t; 0, I) Bernoulli(x; sigmoid(c_T)), with c_t = c_{t-1} + write(h_t)
    and h_t = LSTM(h_{t-1}, z_t).

    Args:
        data_shape: square images, flattened (side * side,).
        latent: size of each z_t.
        steps: T, the number of drawing steps.
        state: the decoder LSTM's size (and the guide's encoder's).
        read, write: the side N of the read and write attention grids; 0 reads the whole image
            and writes the whole canvas (DRAW without attention).

    References:
        Gregor et al. (2015), DRAW: A Recurrent Neural Network For Image Generation, sec. 2
        (the network), 3 (selective attention), table 3 (MNIST: T = 64, 256 units, 100-d z,
        read 2 x 2, write 5 x 5).
    """

    def __init__(self, data_shape: Sequence[int], latent: int = 100, steps: int = 64, state: int = 256, read: int = 2, write: int = 5) -> None:
        super().__init__()
        if len(data_shape) != 1 or min(latent, steps, state) < 1 or min(read, write) < 0:
            raise PyrovaeError(f"draw models flattened square images with positive latent, steps and state, got data of shape {tuple(data_shape)}")
        self.side = math.isqrt(data_shape[0])
        if self.side * self.side != data_shape[0]:
            raise PyrovaeError(f"draw models square images, flattened; {data_shape[0]} values per example are not a square")
        if max(read, write) > self.side:
            raise PyrovaeError(f"an attention grid of {max(read, write)} x {max(read, write)} filters does not fit an image of side {self.side}")
        self.dim, self.latent, self.steps, self.state = data_shape[0], latent, steps, state
        self.read_size, self.write_size = read, write
        self.decoder = nn.LSTMCell(latent, state)
        if write:
            self.writer: nn.Module = Filterbank(state, self.side, write, writes=True)
            self.patch = nn.Linear(state, write * write)
        else:
            self.patch = nn.Linear(state, self.dim)
        self.h_0 = nn.Parameter(torch.zeros(state))
        self.canvas_0 = nn.Parameter(torch.zeros(self.dim))

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """The blank canvas starts at the logit of each pixel's mean (as `DecoderMixin` starts a
        decoder at the data's marginal): the steps then write what differs from the average image."""
        self.canvas_0.copy_(torch.logit(torch.as_tensor(x).float().mean(0).clamp(1e-3, 1 - 1e-3)))

    def check_data(self, x: torch.Tensor) -> None:
        if not ((x == 0) | (x == 1)).all():
            raise PyrovaeError("draw's likelihood is Bernoulli: its data must be 0/1 (binarized images)")

    def initial(self, batch: int) -> DecoderState:
        h = self.h_0.expand(batch, -1)
        return DecoderState(h, torch.zeros_like(h), self.canvas_0.expand(batch, -1))

    def advance(self, state: DecoderState, z: torch.Tensor) -> DecoderState:
        """One drawing step: h_t = LSTM(h_{t-1}, z_t), c_t = c_{t-1} + write(h_t)."""
        h, cell = lstm_step(self.decoder, z, state.h, state.cell)
        written = self.writer.write(self.patch(h), h) if self.write_size else self.patch(h)
        return DecoderState(h, cell, state.canvas + written)

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None, size: int | None = None) -> None:
        register("draw", self)
        state = self.initial(len(x))
        prior = dist.Normal(torch.zeros(self.latent, device=x.device), torch.ones(self.latent, device=x.device)).to_event(1)
        with data_plate(x, index, size):
            for t in range(self.steps):
                z = pyro.sample(f"z_{t + 1}", prior.expand([len(x)]))
                state = self.advance(state, z)
            pyro.sample("x", dist.Bernoulli(logits=state.canvas, validate_args=False).to_event(1), obs=x)

    @torch.no_grad()
    def canvases(self, latents: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """sigmoid(c_t) for t = 1 .. T given the values of sites z_1 .. z_T of a batch: (T, B, side * side)."""
        state, drawn = self.initial(len(latents["z_1"])), []
        for t in range(self.steps):
            state = self.advance(state, latents[f"z_{t + 1}"])
            drawn.append(torch.sigmoid(state.canvas))
        return torch.stack(drawn)
