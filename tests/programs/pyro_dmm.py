"""The deep Markov model of Pyro's `examples/dmm.py`, restated in plain Pyro with its
architecture and signatures: an emitter of probabilities, the gated transition, the combiner,
a ReLU RNN over the reversed sequences (a `PackedSequence`) with a learned initial state,
optional IAFs, sites ``z_t`` and ``obs_x_t`` in a plate named "z_minibatch", the KL annealing
factor as a `poutine.scale` argument. The collate `minibatch` builds the example's arguments
(mini_batch, mini_batch_reversed, mini_batch_mask, mini_batch_seq_lengths) from pyrovae's
(x, lengths):

    pyrovae fit --model pyro_dmm.py:DMM.model --guide pyro_dmm.py:DMM.guide --collate pyro_dmm.py:minibatch \\
        --dataset jsb-chorales --fields x,lengths
"""

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import TransformedDistribution
from pyro.distributions.transforms import affine_autoregressive
from torch import nn


def reverse_sequences(x, lengths):
    steps = torch.arange(x.shape[1], device=x.device)
    index = torch.where(steps < lengths[:, None], lengths[:, None] - 1 - steps, steps)
    return x.gather(1, index[..., None].expand_as(x))


def minibatch(args, kwargs):
    """(x, lengths) -> Pyro's (mini_batch, reversed and packed, mask, lengths)."""
    x, lengths = args
    packed = nn.utils.rnn.pack_padded_sequence(reverse_sequences(x, lengths), lengths.cpu(), batch_first=True, enforce_sorted=False)
    mask = torch.arange(x.shape[1], device=x.device) < lengths[:, None]
    return (x, packed, mask, lengths), kwargs


class Emitter(nn.Module):
    def __init__(self, input_dim, z_dim, emission_dim):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(z_dim, emission_dim), nn.ReLU(), nn.Linear(emission_dim, emission_dim), nn.ReLU(),
                                 nn.Linear(emission_dim, input_dim), nn.Sigmoid())

    def forward(self, z_t):
        return self.net(z_t)


class GatedTransition(nn.Module):
    def __init__(self, z_dim, transition_dim):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(z_dim, transition_dim), nn.ReLU(), nn.Linear(transition_dim, z_dim), nn.Sigmoid())
        self.proposed = nn.Sequential(nn.Linear(z_dim, transition_dim), nn.ReLU(), nn.Linear(transition_dim, z_dim))
        self.z_to_loc, self.sig = nn.Linear(z_dim, z_dim), nn.Linear(z_dim, z_dim)
        self.z_to_loc.weight.data = torch.eye(z_dim)
        self.z_to_loc.bias.data = torch.zeros(z_dim)

    def forward(self, z_t_1):
        gate, proposed_mean = self.gate(z_t_1), self.proposed(z_t_1)
        loc = (1 - gate) * self.z_to_loc(z_t_1) + gate * proposed_mean
        return loc, nn.functional.softplus(self.sig(torch.relu(proposed_mean)))


class Combiner(nn.Module):
    def __init__(self, z_dim, rnn_dim):
        super().__init__()
        self.z_to_hidden, self.to_loc, self.to_scale = nn.Linear(z_dim, rnn_dim), nn.Linear(rnn_dim, z_dim), nn.Linear(rnn_dim, z_dim)

    def forward(self, z_t_1, h_rnn):
        h_combined = 0.5 * (torch.tanh(self.z_to_hidden(z_t_1)) + h_rnn)
        return self.to_loc(h_combined), nn.functional.softplus(self.to_scale(h_combined))


class DMM(nn.Module):
    def __init__(self, data_shape=(160, 88), z_dim=100, emission_dim=100, transition_dim=200, rnn_dim=600, num_iafs=0, iaf_dim=100):
        super().__init__()
        input_dim = data_shape[-1]
        self.emitter = Emitter(input_dim, z_dim, emission_dim)
        self.trans = GatedTransition(z_dim, transition_dim)
        self.combiner = Combiner(z_dim, rnn_dim)
        self.rnn = nn.RNN(input_size=input_dim, hidden_size=rnn_dim, nonlinearity="relu", batch_first=True)
        self.iafs = [affine_autoregressive(z_dim, hidden_dims=[iaf_dim]) for _ in range(num_iafs)]
        self.iafs_modules = nn.ModuleList(self.iafs)
        self.z_0 = nn.Parameter(torch.zeros(z_dim))
        self.z_q_0 = nn.Parameter(torch.zeros(z_dim))
        self.h_0 = nn.Parameter(torch.zeros(1, 1, rnn_dim))

    def model(self, mini_batch, mini_batch_reversed, mini_batch_mask, mini_batch_seq_lengths, annealing_factor=1.0):
        T_max = mini_batch.size(1)
        pyro.module("dmm", self)
        z_prev = self.z_0.expand(mini_batch.size(0), self.z_0.size(0))
        with pyro.plate("z_minibatch", len(mini_batch)):
            for t in pyro.markov(range(1, T_max + 1)):
                z_loc, z_scale = self.trans(z_prev)
                with poutine.scale(scale=annealing_factor):
                    z_t = pyro.sample(f"z_{t}", dist.Normal(z_loc, z_scale).mask(mini_batch_mask[:, t - 1 : t]).to_event(1))
                emission_probs_t = self.emitter(z_t)
                pyro.sample(f"obs_x_{t}", dist.Bernoulli(emission_probs_t).mask(mini_batch_mask[:, t - 1 : t]).to_event(1), obs=mini_batch[:, t - 1, :])
                z_prev = z_t

    def guide(self, mini_batch, mini_batch_reversed, mini_batch_mask, mini_batch_seq_lengths, annealing_factor=1.0):
        T_max = mini_batch.size(1)
        pyro.module("dmm", self)
        h_0_contig = self.h_0.expand(1, mini_batch.size(0), self.rnn.hidden_size).contiguous()
        rnn_output, _ = self.rnn(mini_batch_reversed, h_0_contig)
        padded, _ = nn.utils.rnn.pad_packed_sequence(rnn_output, batch_first=True, total_length=T_max)
        rnn_output = reverse_sequences(padded, mini_batch_seq_lengths)
        z_prev = self.z_q_0.expand(mini_batch.size(0), self.z_q_0.size(0))
        with pyro.plate("z_minibatch", len(mini_batch)):
            for t in pyro.markov(range(1, T_max + 1)):
                z_loc, z_scale = self.combiner(z_prev, rnn_output[:, t - 1, :])
                if len(self.iafs) > 0:
                    z_dist = TransformedDistribution(dist.Normal(z_loc, z_scale), self.iafs)
                    with poutine.scale(scale=annealing_factor):
                        z_t = pyro.sample(f"z_{t}", z_dist.mask(mini_batch_mask[:, t - 1]))
                else:
                    with poutine.scale(scale=annealing_factor):
                        z_t = pyro.sample(f"z_{t}", dist.Normal(z_loc, z_scale).mask(mini_batch_mask[:, t - 1 : t]).to_event(1))
                z_prev = z_t
