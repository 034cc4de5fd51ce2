"""A conditional VAE for quadrant completion written in plain Pyro, the way Pyro's
`examples/cvae` writes it: images whose hidden pixels are -1 as the inputs `xs`, images whose
given pixels are -1 as the outputs `ys`, `model(xs, ys=None)` and `guide(xs, ys=None)` methods,
a "data" plate without a size, a prior network fed with a frozen pre-trained baseline's guess,
a generation network of z alone, and a Bernoulli observed on the hidden pixels only.

The collates `given_1`, `given_2`, `given_3` make (xs, ys) from pyrovae's images with that
many quadrants given; `--model-option baseline=PATH` loads the baseline's weights (a
`BaselineNet` state dict, trained first):

    pyrovae fit --model pyro_cvae.py:CVAE.model --guide pyro_cvae.py:CVAE.guide --collate pyro_cvae.py:given_1 \\
        --dataset binarized-mnist --model-option baseline=baseline.pt
"""

import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn


def hidden_pixels(dim, quadrants):
    """The pixels to predict of a square image: all but the bottom-left; the right half; the bottom-right."""
    side, h = math.isqrt(dim), math.isqrt(dim) // 2
    given = torch.zeros(side, side, dtype=torch.bool)
    given[h:, :h] = True
    if quadrants >= 2:
        given[:, :h] = True
    if quadrants == 3:
        given[:h, :] = True
    return ~given.flatten()


def split_quadrants(x, quadrants):
    """(xs, ys) of images x: -1 where a pixel is not part of each."""
    hidden = hidden_pixels(x.shape[-1], quadrants).to(x.device)
    return torch.where(hidden, torch.full_like(x, -1.0), x), torch.where(hidden, x, torch.full_like(x, -1.0))


def given_1(args, kwargs):
    """The collate (x,) -> (xs, ys) with the bottom-left quadrant given."""
    return split_quadrants(args[0], 1), kwargs


def given_2(args, kwargs):
    return split_quadrants(args[0], 2), kwargs


def given_3(args, kwargs):
    return split_quadrants(args[0], 3), kwargs


class BaselineNet(nn.Module):
    def __init__(self, dim=784, hidden_1=500, hidden_2=500):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden_1), nn.ReLU(), nn.Linear(hidden_1, hidden_2), nn.ReLU(), nn.Linear(hidden_2, dim))

    def forward(self, xs):
        return torch.sigmoid(self.net(xs))


class Encoder(nn.Module):
    """(x, y) put together in one image -> the loc and scale of z."""

    def __init__(self, dim, z_dim, hidden_1, hidden_2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden_1), nn.ReLU(), nn.Linear(hidden_1, hidden_2), nn.ReLU())
        self.loc, self.log_scale = nn.Linear(hidden_2, z_dim), nn.Linear(hidden_2, z_dim)

    def forward(self, xs, ys):
        together = torch.where(xs == -1, ys, xs)
        hidden = self.net(together)
        return self.loc(hidden), torch.exp(self.log_scale(hidden))


class CVAE(nn.Module):
    def __init__(self, data_shape=(784,), z_dim=200, hidden_1=500, hidden_2=500, baseline=None):
        super().__init__()
        dim = data_shape[0]
        self.baseline_net = BaselineNet(dim, hidden_1, hidden_2)
        if baseline is not None:
            self.baseline_net.load_state_dict(torch.load(baseline))
        self.prior_net = Encoder(dim, z_dim, hidden_1, hidden_2)
        self.generation_net = nn.Sequential(nn.Linear(z_dim, hidden_1), nn.ReLU(), nn.Linear(hidden_1, hidden_2), nn.ReLU(),
                                            nn.Linear(hidden_2, dim), nn.Sigmoid())
        self.recognition_net = Encoder(dim, z_dim, hidden_1, hidden_2)

    def model(self, xs, ys=None):
        pyro.module("generation_net", self)
        batch_size = xs.shape[0]
        with pyro.plate("data"):
            with torch.no_grad():
                y_hat = self.baseline_net(xs)
            prior_loc, prior_scale = self.prior_net(xs, y_hat)
            zs = pyro.sample("z", dist.Normal(prior_loc, prior_scale).to_event(1))
            loc = self.generation_net(zs)
            if ys is not None:
                hidden = xs == -1
                pyro.sample("y", dist.Bernoulli(loc[hidden].view(batch_size, -1), validate_args=False).to_event(1),
                            obs=ys[hidden].view(batch_size, -1))
            else:
                pyro.deterministic("y", loc.detach())
            return loc

    def guide(self, xs, ys=None):
        with pyro.plate("data"):
            if ys is None:
                loc, scale = self.prior_net(xs, self.baseline_net(xs))
            else:
                loc, scale = self.recognition_net(xs, ys)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))
