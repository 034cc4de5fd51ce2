"""Guides of the sequence models (`pyrovae.models.sequential`): structured inference networks
that read the sequence with an RNN and sample z_1, ..., z_T in order."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import AffineAutoregressive, affine_autoregressive
from torch import nn
from torch.nn.functional import softplus

from pyrovae.models.sequential import DMM, VRNN, step_mask
from pyrovae.registry import GUIDES
from pyrovae.sites import ModelSites, data_plate, register

__all__ = ["DMMGuide", "VRNNGuide", "reverse_padded"]


def reverse_padded(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each sequence's first `length` steps in reverse order (dim 1); the padding stays where it is."""
    steps = torch.arange(x.shape[1], device=x.device)
    index = torch.where(steps < lengths[:, None], lengths[:, None] - 1 - steps, steps)
    return x.gather(1, index[..., None].expand_as(x))


@GUIDES.register("dmm", "the DMM's structured guide: q(z_t | z_t-1, x_t:T) by a combiner of a backward RNN, optional IAF (Krishnan et al. 2017)")
class DMMGuide(nn.Module):
    """q(z_{1:T} | x) = prod_t q(z_t | z_{t-1}, x_{t:T}): a backward RNN summarises x_{t:T}, the
    combiner mixes it with z_{t-1}; ``iafs`` > 0 pushes each step's Gaussian through that many
    inverse autoregressive flows (Pyro's `affine_autoregressive`).

    Args:
        rnn: hidden size of the backward RNN (ReLU, as Krishnan et al.'s and Pyro's).
        iafs: number of IAF steps per time step; iaf_hidden: their hidden size.

    References:
        Krishnan, Shalit & Sontag (2017), sec. 4 (the "ST-R" combiner inference network);
        Kingma et al. (2016) for the IAF.
    """

    latent_shapes: ClassVar[str] = "the DMM's z_1 .. z_T"
    gives_elbo: ClassVar[bool] = True

    def __init__(self, sites: ModelSites, data_shape: Sequence[int], model: Any, rnn: int = 600, iafs: int = 0, iaf_hidden: int = 100) -> None:
        super().__init__()
        latent, notes = model.latent, data_shape[1]
        self.rnn = nn.RNN(notes, rnn, nonlinearity="relu", batch_first=True)
        self.h_0 = nn.Parameter(torch.zeros(1, 1, rnn))
        self.z_q_0 = nn.Parameter(torch.zeros(latent))
        self.combine = nn.Linear(latent, rnn)
        self.loc, self.scale = nn.Linear(rnn, latent), nn.Linear(rnn, latent)
        self.iafs = nn.ModuleList([affine_autoregressive(latent, hidden_dims=[iaf_hidden]) for _ in range(iafs)])

    @classmethod
    def supports(cls, model: Callable, sites: ModelSites) -> str | None:
        return None if isinstance(model, DMM) else "it is the guide of the deep Markov model: --model dmm"

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, index: torch.Tensor | None = None, size: int | None = None) -> None:
        register("dmm_guide", self)
        mask = step_mask(x, lengths)
        backward, _ = self.rnn(reverse_padded(x.float(), lengths), self.h_0.expand(1, len(x), -1).contiguous())
        summaries = reverse_padded(backward, lengths)  # summaries[:, t] has read x_t ... x_T
        z = self.z_q_0.expand(len(x), -1)
        with data_plate(x, index, size):
            for t in pyro.markov(range(x.shape[1])):
                h = 0.5 * (torch.tanh(self.combine(z)) + summaries[:, t])
                q: dist.Distribution = dist.Normal(self.loc(h), softplus(self.scale(h)) + 1e-4).to_event(1)
                if len(self.iafs):
                    # a fresh transform per step on the shared networks: each caches its own draw, so
                    # scoring z_t needs no inverse pass (a flow shared by all steps caches only the last)
                    q = dist.TransformedDistribution(q, [AffineAutoregressive(iaf.arn) for iaf in self.iafs])
                z = pyro.sample(f"z_{t + 1}", q.mask(mask[:, t]))


@GUIDES.register("vrnn", "the VRNN's guide: q(z_t | x_t, h_t-1) on the model's own recurrent state (Chung et al. 2015)")
class VRNNGuide(nn.Module):
    """q(z_t | x_t, h_{t-1}), where h_{t-1} is the model's recurrence run on the guide's own draws
    z_{<t} (the model's modules, not copies: Chung et al.'s shared state).

    References:
        Chung et al. (2015), sec. 3, eq. 9.
    """

    latent_shapes: ClassVar[str] = "the VRNN's z_1 .. z_T"
    gives_elbo: ClassVar[bool] = True

    def __init__(self, sites: ModelSites, data_shape: Sequence[int], model: Any) -> None:
        super().__init__()
        self.model = [model]  # shared, not a submodule: its parameters are the model's
        self.encoder = nn.Sequential(nn.Linear(2 * model.state, model.state), nn.ReLU(), nn.Linear(model.state, 2 * model.latent))

    @classmethod
    def supports(cls, model: Callable, sites: ModelSites) -> str | None:
        return None if isinstance(model, VRNN) else "it is the guide of the variational RNN: --model vrnn"

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, index: torch.Tensor | None = None, size: int | None = None) -> None:
        register("vrnn_guide", self)
        (model,) = self.model
        mask = step_mask(x, lengths)
        h = model.h_0.expand(len(x), -1)
        with data_plate(x, index, size):
            for t in pyro.markov(range(x.shape[1])):
                features = torch.cat([model.phi_x(x[:, t]).expand(*h.shape[:-1], -1), h], -1)
                loc, raw = self.encoder(features).chunk(2, -1)
                z = pyro.sample(f"z_{t + 1}", dist.Normal(loc, softplus(raw) + 1e-4).mask(mask[:, t : t + 1]).to_event(1))
                h = model.step(h, x[:, t], z, mask[:, t])
