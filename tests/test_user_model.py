"""A plain Pyro program a user wrote (own site names, no pyrovae base class, no index/size)."""

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae import build_guide, evaluate, inspect_model
from pyrovae.infer import AmortizedVI, TrainSettings


class UserDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 10))

    def forward(self, x):
        pyro.module("user_decoder", self)
        with pyro.plate("data", len(x)):
            code = pyro.sample("code", dist.Normal(torch.zeros(len(x), 3), 1.0).to_event(1))
            pyro.sample("pixels", dist.Bernoulli(logits=self.net(code)).to_event(1), obs=x)


def _data():
    torch.manual_seed(0)
    return torch.bernoulli(torch.rand(60, 10).round() * 0.8 + 0.1)


def test_sites_are_read_off_the_program():
    sites = inspect_model(UserDecoder(), _data())
    assert dict(sites.latents) == {"code": torch.Size([3])} and sites.observed == ("pixels",)


def test_guide_training_and_evaluation_on_a_user_program():
    x = _data()
    model = UserDecoder()
    guide = build_guide("diagonal", model, x, hidden=(16,))
    method = AmortizedVI(model, guide, TrainSettings(lr=1e-2, batch_size=20), num_examples=len(x))
    before = evaluate(model, guide, x, num_samples=50).elbo.mean()
    for step in range(150):
        index = torch.randperm(len(x))[:20]
        method.step(x[index], index)
    result = evaluate(model, guide, x, num_samples=200)
    assert result.elbo.mean() > before + 0.5
    assert (result.log_likelihood >= result.elbo - 1e-4).all()


def test_minibatch_of_a_user_program_is_scaled_to_the_data_set():
    x = _data()
    model = UserDecoder()
    guide = build_guide("diagonal", model, x)
    method = AmortizedVI(model, guide, TrainSettings(objective="iwae", particles=4), num_examples=len(x))
    index = torch.arange(20)
    pyro.set_rng_seed(1)
    minibatch = method.loss(x[index], index)  # per example of the whole set, estimated from 20
    pyro.set_rng_seed(1)
    direct = method.loss(x[index], None)  # per example of these 20
    assert torch.allclose(minibatch, direct, rtol=1e-5)
