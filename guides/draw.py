"""DRAW's inference network (Gregor et al. 2015, sec. 2): an encoder LSTM that reads the image
and its error image through the read attention, placed by the decoder's previous state."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae.models.draw import DRAW, Filterbank, lstm_step
from pyrovae.nets import broadcast_cat
from pyrovae.registry import GUIDES
from pyrovae.sites import ModelSites, data_plate, register

__all__ = ["DRAWGuide"]


@GUIDES.register("draw", "DRAW's encoder: q(z_t | x, z_<t) from an LSTM reading x and x - sigmoid(c_t-1) through attention (Gregor et al. 2015)")
class DRAWGuide(nn.Module):
    """q(z_{1:T} | x) = prod_t N(z_t; mu(e_t), sigma(e_t)), e_t = LSTM(e_{t-1}, [r_t, h_{t-1}]),
    r_t = read(x, x - sigmoid(c_{t-1}), h_{t-1}).

    The decoder state h_{t-1} and canvas c_{t-1} are the model's recurrence run on the guide's
    own draws z_{<t} (the model's modules, not copies), as in Gregor et al.'s network.

    References:
        Gregor et al. (2015), sec. 2, eq. 3-8 (the encoder and its inputs) and 3.2 (read).
    """

    latent_shapes: ClassVar[str] = "DRAW's z_1 .. z_T"
    gives_elbo: ClassVar[bool] = True

    def __init__(self, sites: ModelSites, data_shape: Sequence[int], model: Any) -> None:
        super().__init__()
        self.model = [model]  # shared, not a submodule: its parameters are the model's
        n = model.read_size
        self.reader = Filterbank(model.state, model.side, n) if n else None
        glimpse = 2 * (n * n if n else model.dim)
        self.encoder = nn.LSTMCell(glimpse + model.state, model.state)
        self.posterior = nn.Linear(model.state, 2 * model.latent)
        self.e_0 = nn.Parameter(torch.zeros(model.state))

    @classmethod
    def supports(cls, model: Callable, sites: ModelSites) -> str | None:
        return None if isinstance(model, DRAW) else "it is the guide of DRAW: --model draw"

    def read(self, x: torch.Tensor, error: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if self.reader is None:
            return broadcast_cat(x, error)
        return torch.cat([self.reader.read(x, h), self.reader.read(error, h)], -1)

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None, size: int | None = None) -> None:
        register("draw_guide", self)
        (model,) = self.model
        state = model.initial(len(x))
        e = self.e_0.expand(len(x), -1)
        cell = torch.zeros_like(e)
        with data_plate(x, index, size):
            for t in range(model.steps):
                glimpse = self.read(x, x - torch.sigmoid(state.canvas), state.h)
                e, cell = lstm_step(self.encoder, broadcast_cat(glimpse, state.h), e, cell)
                loc, log_scale = self.posterior(e).chunk(2, -1)
                z = pyro.sample(f"z_{t + 1}", dist.Normal(loc, torch.exp(log_scale)).to_event(1))
                state = model.advance(state, z)
