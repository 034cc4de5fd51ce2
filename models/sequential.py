"""Dynamical models of sequences (Kingma & Welling 2019, sec. 1.1): a latent state per time step.

Both take padded sequences with their lengths as data (``--fields x,lengths``), one latent site
``z_t`` and one observed site ``x_t`` per step under `pyro.markov`, each masked beyond the
sequence's length, so padding adds nothing to any bound and every figure is exact per
sequence; `pyrovae fit` and `evaluate` also report the figures per time step.

- `dmm`: the deep Markov model of Krishnan, Shalit & Sontag (2017): a gated transition
  p(z_t | z_{t-1}) and an emitter p(x_t | z_t); its guide is `pyrovae.guides.sequential.DMMGuide`.
- `vrnn`: the variational RNN of Chung et al. (2015): a deterministic recurrence h_t =
  GRU(h_{t-1}, [x_t, z_t]) beside the stochastic one, prior p(z_t | h_{t-1}) and emission
  p(x_t | z_t, h_{t-1}); its guide `VRNNGuide` reads the model's own h_{t-1}.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn.functional import softplus

from pyrovae.errors import PyrovaeError
from pyrovae.nets import MLP
from pyrovae.registry import MODELS
from pyrovae.sites import data_plate, register

__all__ = ["DMM", "VRNN", "GatedTransition", "step_mask"]


def step_mask(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The ``(B, T)`` bool mask of each sequence's real time steps."""
    return torch.arange(x.shape[1], device=x.device) < lengths[:, None]


class _Sequential(nn.Module):
    """What both models share: the (x, lengths) data and its checks, and the Bernoulli emitter."""

    def check_sequences(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        name = type(self).__name__.lower()
        if lengths is None or not torch.is_tensor(lengths):
            raise PyrovaeError(f"{name} takes sequences with their lengths as data: --fields x,lengths (on a sequence data set such as jsb-chorales)")
        if x.dim() != 3 or lengths.shape != x.shape[:1] or lengths.is_floating_point() or (lengths < 1).any() or (lengths > x.shape[1]).any():
            raise PyrovaeError(f"{name} needs x (B, T, notes) and lengths (B,) of integers in 1..T")
        return step_mask(x, lengths)

    @torch.no_grad()
    def init_from_data(self, batch: object) -> None:
        """Checks the data's fields; the emitter's output bias starts at the logit of each note's
        mean over the real time steps (as `DecoderMixin` starts a decoder at the data's marginal)."""
        args = getattr(batch, "args", ())
        x, lengths = (args if len(args) == 2 else (batch, None))
        mask = self.check_sequences(x, lengths)
        mean = x[mask].float().mean(0).clamp(1e-3, 1 - 1e-3)
        self.emitter[-1].bias.copy_(torch.logit(mean))

    def check_data(self, x: torch.Tensor) -> None:
        if not ((x == 0) | (x == 1)).all():
            raise PyrovaeError(f"{type(self).__name__.lower()} emits binary piano rolls: its data must be 0/1")


@MODELS.register("dmm", "deep Markov model: gated transition p(z_t|z_t-1), emitter p(x_t|z_t), masked ragged sequences (Krishnan et al. 2017)")
class DMM(_Sequential):
    """p(x_{1:T}, z_{1:T}) = prod_t p(z_t | z_{t-1}) p(x_t | z_t), Bernoulli emissions.

    Args:
        data_shape: (T_max, notes).
        latent: size of z_t.
        transition: hidden size of the gated transition.
        emission: hidden size of the emitter's two layers.

    References:
        Krishnan, Shalit & Sontag (2017), Structured Inference Networks for Nonlinear State Space
        Models, sec. 3 (the model) and 5 (the gated transition function).
    """

    def __init__(self, data_shape: Sequence[int], latent: int = 100, transition: int = 200, emission: int = 100) -> None:
        super().__init__()
        if len(data_shape) != 2 or min(latent, transition, emission) < 1:
            raise PyrovaeError(f"dmm models sequences (T, notes) with positive sizes, got data of shape {tuple(data_shape)}")
        self.latent, notes = latent, data_shape[1]
        self.transition = GatedTransition(latent, transition)
        self.emitter = MLP(latent, [emission, emission], notes, "relu")
        self.z_0 = nn.Parameter(torch.zeros(latent))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, index: torch.Tensor | None = None, size: int | None = None) -> None:
        register("dmm", self)
        mask = self.check_sequences(x, lengths)
        z = self.z_0.expand(len(x), -1)
        with data_plate(x, index, size):
            for t in pyro.markov(range(x.shape[1])):
                z = pyro.sample(f"z_{t + 1}", self.transition(z).mask(mask[:, t : t + 1]).to_event(1))
                pyro.sample(f"x_{t + 1}", dist.Bernoulli(logits=self.emitter(z), validate_args=False).mask(mask[:, t : t + 1]).to_event(1), obs=x[:, t])


class GatedTransition(nn.Module):
    """p(z_t | z_{t-1}): a gate mixes a linear map of z_{t-1} (started at the identity) with a
    nonlinear proposal; the scale is a softplus of the proposal (Krishnan et al. 2017, sec. 5)."""

    def __init__(self, latent: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, latent), nn.Sigmoid())
        self.proposal = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, latent))
        self.linear = nn.Linear(latent, latent)
        self.scale = nn.Linear(latent, latent)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(latent)), self.linear.bias.zero_()

    def forward(self, z: torch.Tensor) -> dist.Normal:
        gate, proposal = self.gate(z), self.proposal(z)
        loc = (1 - gate) * self.linear(z) + gate * proposal
        return dist.Normal(loc, softplus(self.scale(torch.relu(proposal))) + 1e-4)


@MODELS.register("vrnn", "variational RNN: a GRU state beside z_t, prior p(z_t|h_t-1), emission p(x_t|z_t,h_t-1) (Chung et al. 2015)")
class VRNN(_Sequential):
    """h_t = GRU(h_{t-1}, [phi(x_t), phi(z_t)]), z_t ~ p(z_t | h_{t-1}), x_t ~ p(x_t | z_t, h_{t-1}).

    Args:
        data_shape: (T_max, notes).
        latent: size of z_t.
        state: size of h_t and of the feature and prior networks.
        emission: hidden size of the emitter.

    References:
        Chung, Kastner, Dinh, Goel, Courville & Bengio (2015), A Recurrent Latent Variable Model
        for Sequential Data, sec. 3 (eq. 5-9).
    """

    def __init__(self, data_shape: Sequence[int], latent: int = 32, state: int = 128, emission: int = 128) -> None:
        super().__init__()
        if len(data_shape) != 2 or min(latent, state, emission) < 1:
            raise PyrovaeError(f"vrnn models sequences (T, notes) with positive sizes, got data of shape {tuple(data_shape)}")
        notes = data_shape[1]
        self.latent, self.state = latent, state
        self.phi_x = nn.Sequential(nn.Linear(notes, state), nn.ReLU())
        self.phi_z = nn.Sequential(nn.Linear(latent, state), nn.ReLU())
        self.prior_net = MLP(state, [state], 2 * latent, "relu")
        self.emitter = MLP(2 * state, [emission], notes, "relu")
        self.cell = nn.GRUCell(2 * state, state)
        self.h_0 = nn.Parameter(torch.zeros(state))

    def prior(self, h: torch.Tensor) -> dist.Normal:
        loc, raw = self.prior_net(h).chunk(2, -1)
        return dist.Normal(loc, softplus(raw) + 1e-4)

    def step(self, h: torch.Tensor, x_t: torch.Tensor, z: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """h_t from h_{t-1}; past a sequence's end h stays (nothing there is scored)."""
        features = torch.cat([self.phi_x(x_t).expand(*z.shape[:-1], -1), self.phi_z(z)], -1)
        h_flat = h.expand(*z.shape[:-1], -1).reshape(-1, self.state)
        updated = self.cell(features.reshape(-1, features.shape[-1]), h_flat).reshape(*z.shape[:-1], self.state)
        return torch.where(real[:, None], updated, h)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, index: torch.Tensor | None = None, size: int | None = None) -> None:
        register("vrnn", self)
        mask = self.check_sequences(x, lengths)
        h = self.h_0.expand(len(x), -1)
        with data_plate(x, index, size):
            for t in pyro.markov(range(x.shape[1])):
                z = pyro.sample(f"z_{t + 1}", self.prior(h).mask(mask[:, t : t + 1]).to_event(1))
                logits = self.emitter(torch.cat([self.phi_z(z), h.expand(*z.shape[:-1], -1)], -1))
                pyro.sample(f"x_{t + 1}", dist.Bernoulli(logits=logits, validate_args=False).mask(mask[:, t : t + 1]).to_event(1), obs=x[:, t])
                h = self.step(h, x[:, t], z, mask[:, t])
