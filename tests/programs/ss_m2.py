"""A semi-supervised VAE (M2, Kingma et al. 2014) written in plain Pyro, the way Pyro's
`examples/vae/ss_vae_M2.py` writes it: a module with `model(xs, ys=None)` and
`guide(xs, ys=None)` methods, a "data" plate without a size, inputs concatenated after
broadcasting (its ConcatModule), the class y sampled in the guide with parallel enumeration
(`config_enumerate`), observed where a label is given.

pyrovae trains it unmodified:

    pyrovae fit --model tests/programs/ss_m2.py:SSVAE --guide tests/programs/ss_m2.py:make_guide \\
        --objective elbo-enum --dataset digits --fields x,y
"""

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import config_enumerate
from torch import nn


def _cat(*tensors):
    """Concatenate on the last dim after broadcasting the others, as the ConcatModule of Pyro's
    example does: an enumerated y has extra leading dims."""
    shape = torch.broadcast_shapes(*(t.shape[:-1] for t in tensors))
    return torch.cat([t.expand(*shape, t.shape[-1]) for t in tensors], -1)


class SSVAE(nn.Module):
    def __init__(self, data_shape=(64,), z_dim=8, hidden=128, classes=10):
        super().__init__()
        self.x_dim, self.z_dim, self.classes = data_shape[0], z_dim, classes
        self.encoder_y = nn.Sequential(nn.Linear(self.x_dim, hidden), nn.Softplus(), nn.Linear(hidden, classes), nn.Softmax(-1))
        self.encoder_z = nn.Sequential(nn.Linear(self.x_dim + classes, hidden), nn.Softplus(), nn.Linear(hidden, 2 * z_dim))
        self.decoder = nn.Sequential(nn.Linear(z_dim + classes, hidden), nn.Softplus(), nn.Linear(hidden, self.x_dim), nn.Sigmoid())

    def model(self, xs, ys=None):
        pyro.module("ss_vae", self)
        batch_size = xs.size(0)
        with pyro.plate("data"):
            zs = pyro.sample("z", dist.Normal(xs.new_zeros(batch_size, self.z_dim), 1.0).to_event(1))
            alpha = xs.new_ones(batch_size, self.classes) / self.classes
            ys = pyro.sample("y", dist.OneHotCategorical(alpha), obs=None if ys is None else nn.functional.one_hot(ys, self.classes).to(xs))
            loc = self.decoder(_cat(zs, ys))
            pyro.sample("x", dist.Bernoulli(loc.clamp(1e-6, 1 - 1e-6)).to_event(1), obs=xs)

    def guide(self, xs, ys=None):
        with pyro.plate("data"):
            if ys is None:
                ys = pyro.sample("y", dist.OneHotCategorical(self.encoder_y(xs)))
            else:
                ys = nn.functional.one_hot(ys, self.classes).to(xs)
            loc, raw = self.encoder_z(_cat(xs, ys)).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-3).to_event(1))

    def forward(self, xs, ys=None):
        return self.model(xs, ys)


def make_guide(data_shape, model=None, **options):
    """The guide of the SSVAE pyrovae built as the model (`--model ss_m2.py:SSVAE`), with y
    enumerated in parallel, as Pyro's example trains it with TraceEnum_ELBO."""
    return config_enumerate(model.guide, "parallel")
