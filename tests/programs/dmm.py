"""A deep Markov model (Krishnan, Shalit & Sontag 2017) in plain Pyro, written the way Pyro's
`examples/dmm.py` writes one, for pyrovae to run unmodified.

Padded piano rolls with a mask and lengths, a plate named "z_minibatch" with no size given by
pyrovae, one latent and one observed site per time step under `pyro.markov`, masks on both,
and a guide whose GRU reads each sequence backwards from a reversed copy that a collate builds
(`--collate dmm.py:reverse`):

    pyrovae fit --model dmm.py:DMM.model --guide dmm.py:DMM.guide --collate dmm.py:reverse \\
        --dataset jsb-chorales --fields x,mask,lengths --epochs 5
"""

import pyro
import pyro.distributions as dist
import torch
from torch import nn


def reverse_sequences(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each sequence's first `length` steps in reverse order; the padding stays where it is."""
    steps = torch.arange(x.shape[1], device=x.device)
    index = torch.where(steps < lengths[:, None], lengths[:, None] - 1 - steps, steps)
    return x.gather(1, index[..., None].expand_as(x))


def reverse(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The collate: (x, mask, lengths) -> (x, mask, lengths, x reversed per sequence)."""
    x, mask, lengths = args
    return (x, mask, lengths, reverse_sequences(x, lengths)), kwargs


class DMM(nn.Module):
    """z_t ~ N(trans(z_{t-1})), x_t ~ Bernoulli(emit(z_t)); q(z_t | z_{t-1}, x_{t:T}) by a combiner of a backward GRU."""

    def __init__(self, data_shape, z_dim: int = 4, hidden: int = 16) -> None:
        super().__init__()
        _, notes = data_shape
        self.trans = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, 2 * z_dim))
        self.emit = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, notes))
        self.rnn = nn.GRU(notes, hidden, batch_first=True)
        self.combine = nn.Linear(z_dim, hidden)
        self.combine_out = nn.Linear(hidden, 2 * z_dim)
        self.z_0 = nn.Parameter(torch.zeros(z_dim))
        self.z_q_0 = nn.Parameter(torch.zeros(z_dim))

    def model(self, x, mask, lengths, reversed_x=None):
        pyro.module("dmm", self)
        z_prev = self.z_0.expand(len(x), -1)
        with pyro.plate("z_minibatch", len(x)):
            for t in pyro.markov(range(x.shape[1])):
                loc, log_scale = self.trans(z_prev).chunk(2, -1)
                z = pyro.sample(f"z_{t + 1}", dist.Normal(loc, log_scale.exp()).mask(mask[:, t : t + 1]).to_event(1))
                pyro.sample(f"x_{t + 1}", dist.Bernoulli(logits=self.emit(z)).mask(mask[:, t : t + 1]).to_event(1), obs=x[:, t])
                z_prev = z

    def guide(self, x, mask, lengths, reversed_x=None):
        pyro.module("dmm", self)
        packed = nn.utils.rnn.pack_padded_sequence(reversed_x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        output, _ = self.rnn(packed)
        backward, _ = nn.utils.rnn.pad_packed_sequence(output, batch_first=True, total_length=x.shape[1])
        h = reverse_sequences(backward, lengths)  # h[:, t] has read x_t ... x_T
        z_prev = self.z_q_0.expand(len(x), -1)
        with pyro.plate("z_minibatch", len(x)):
            for t in pyro.markov(range(x.shape[1])):
                combined = 0.5 * (torch.tanh(self.combine(z_prev)) + h[:, t])
                loc, log_scale = self.combine_out(combined).chunk(2, -1)
                z = pyro.sample(f"z_{t + 1}", dist.Normal(loc, log_scale.exp()).mask(mask[:, t : t + 1]).to_event(1))
                z_prev = z
