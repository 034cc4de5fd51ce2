"""Adversarial methods (the adversarial autoencoder, VAE-GAN, FactorVAE's critic): each optimizer
moves only its own parameters, each loss reaches only the parameters it should, resume is exact."""

import pytest
import torch

from pyrovae.cli import main
from pyrovae.errors import PyrovaeError
from pyrovae.experiment import Config, build, fit
from pyrovae.run import RunDir
from tests.test_rundir import _same_training

TINY = dict(dataset="digits", latent=3, hidden=(16,), batch_size=100, epochs=1, eval_samples=0)
CRITIC = {"hidden": 16, "layers": 1}


def _snapshot(params):
    return [p.detach().clone() for p in params]


def _moved(before, params):
    return [not torch.equal(a, b) for a, b in zip(before, params)]


@pytest.mark.parametrize("method", ["aae", "vae-gan", "factor-vae"])
def test_the_generator_step_and_the_critic_step_move_only_their_own_parameters(method):
    experiment = build(Config(**TINY, method=method, method_options=CRITIC))
    m = experiment.method
    own = [p for group in m.optimizer.param_groups for p in group["params"] if p.numel()]
    critic = m.critic.parameters()
    assert not {id(p) for p in own} & {id(p) for p in critic}
    assert {id(p) for p in m.parameters()} == {id(p) for p in own} | {id(p) for p in critic}
    x = experiment.data.batch("train", torch.arange(100))
    critic_step = m.critic.step
    m.critic.step = lambda loss: None  # the generator step alone
    before, before_critic = _snapshot(own), _snapshot(critic)
    m.step(x, torch.arange(100))
    assert all(_moved(before, own)) and not any(_moved(before_critic, critic))
    m.critic.step = critic_step
    before = _snapshot(own)
    m.critic.step(m.critic.network(torch.randn(7, critic[0].shape[1])).pow(2).mean())  # the critic step alone
    assert not any(_moved(before, own)) and all(_moved(before_critic, critic))


def test_vae_gan_gives_the_encoder_and_the_decoder_each_its_own_gradient():
    """gamma weighs the feature likelihood in the decoder's loss only: the encoder's first step
    is the same for any gamma, the decoder's is not."""
    states = {}
    for gamma in (0.0, 5.0):
        torch.manual_seed(0)
        experiment = build(Config(**TINY, method="vae-gan", method_options={**CRITIC, "gamma": gamma}))
        m = experiment.method
        torch.manual_seed(1)
        m.step(experiment.data.batch("train", torch.arange(100)), torch.arange(100))
        states[gamma] = (_snapshot(m.encoder_parameters), _snapshot(m.decoder_parameters))
    (enc0, dec0), (enc5, dec5) = states[0.0], states[5.0]
    assert all(torch.equal(a, b) for a, b in zip(enc0, enc5))
    assert any(not torch.equal(a, b) for a, b in zip(dec0, dec5))


def test_the_aae_critic_tells_prior_draws_from_shifted_codes():
    m = build(Config(**TINY, method="aae", method_options={**CRITIC, "critic_lr": 1e-2})).method
    prior, codes = torch.randn(256, 3), torch.randn(256, 3) + 3.0
    labels = torch.cat([torch.ones(256, 1), torch.zeros(256, 1)])
    for _ in range(200):
        m.critic.step(torch.nn.functional.binary_cross_entropy_with_logits(m.critic.network(torch.cat([prior, codes])), labels))
    assert (m.critic.network(prior) > 0).float().mean() > 0.95 and (m.critic.network(codes) < 0).float().mean() > 0.95


@pytest.mark.parametrize("method", ["aae", "vae-gan"])
def test_adversarial_runs_resume_exactly_and_score_like_any_run(method, tmp_path, capsys):
    config = dict(**TINY, method=method, method_options=CRITIC)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    fit(Config(**{**config, "epochs": 2}), straight, progress=False)
    fit(Config(**config), stopped, progress=False)
    assert main(["fit", "--resume", "--out", str(stopped), "--epochs", "2", "--quiet"]) == 0
    a, b = RunDir(straight).load_checkpoint(), RunDir(stopped).load_checkpoint()
    assert set(a["method"]["critic"]) == {"network", "optimizer"}
    _same_training(a, b)
    assert main(["evaluate", str(stopped), "--samples", "10"]) == 0
    assert "log p(x)" in capsys.readouterr().out


def test_adversarial_methods_refuse_what_they_cannot_train():
    with pytest.raises(PyrovaeError, match="one draw per example"):
        build(Config(**{**TINY, "method": "aae", "particles": 2}))
    with pytest.raises(PyrovaeError, match="weight must be"):
        build(Config(**{**TINY, "method": "aae", "method_options": {"weight": -1}}))
    with pytest.raises(PyrovaeError, match="a loss of its own, not --objective iwae"):
        build(Config(**{**TINY, "method": "vae-gan", "objective": "iwae"}))
    with pytest.raises(PyrovaeError, match="critic_lr must be"):
        build(Config(**{**TINY, "method": "vae-gan", "method_options": {"critic_lr": 0}}))
