"""Representation learning: dSprites as pyrovae renders it, beta-VAE's weight, the beta-TCVAE
objective and its total-correlation estimator, and FactorVAE's two optimizers."""

import json
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyrovae import dsprites
from pyrovae.cli import main
from pyrovae.data import load_dataset
from pyrovae.errors import PyrovaeError
from pyrovae.experiment import Config, build, fit
from pyrovae.handlers import scale_latents
from pyrovae.objectives import TCVAE, make_objective, total_correlation
from pyrovae.run import RunDir
from pyrovae.sampling import decode, encode, traverse
from tests.test_rundir import _same_training

# --- dSprites --------------------------------------------------------------------------------


def test_the_factor_grid_is_dsprites_row_order():
    f = dsprites.grid_factors()
    assert f.shape == (737280, 5) and dsprites.GRID_SIZE == 3 * 6 * 40 * 32 * 32
    assert f[0].tolist() == [0, 0, 0, 0, 0] and f[1].tolist() == [0, 0, 0, 0, 1] and f[32].tolist() == [0, 0, 0, 1, 0]
    assert f[-1].tolist() == [2, 5, 39, 31, 31]
    assert len(np.unique(f, axis=0)) == dsprites.GRID_SIZE  # every combination once
    values = dsprites.factor_values()
    assert np.allclose(values[1], [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]) and values[2][0] == 0 and np.isclose(values[2][-1], 2 * np.pi)
    with pytest.raises(PyrovaeError, match="rows must be in"):
        dsprites.grid_factors(np.array([dsprites.GRID_SIZE]))


def _centroid(image: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(image.reshape(64, 64))
    return np.array([cols.mean(), rows.mean()]) + 0.5


def test_sprites_sit_scale_and_turn_as_their_factors_say():
    # position: the centre moves from 0.2 to 0.8 of the canvas (the square is symmetric, its ink centroid is its centre)
    images = dsprites.render(np.array([[0, 5, 0, 0, 0], [0, 5, 0, 31, 0], [0, 5, 0, 31, 31], [0, 5, 0, 16, 9]]))
    expected = [(0.2, 0.2), (0.8, 0.2), (0.8, 0.8), (0.2 + 0.6 * 16 / 31, 0.2 + 0.6 * 9 / 31)]
    for image, centre in zip(images, expected):
        assert np.allclose(_centroid(image), 64 * np.array(centre), atol=0.5)  # a pixel-aligned square: its centroid to the half pixel
    # scale: the square's ink, over all its positions, is its area (2 * 0.7 * 0.2 * s * 64)^2 pixels
    positions = np.stack(np.meshgrid(np.arange(32), np.arange(32)), -1).reshape(-1, 2)
    for i, s in enumerate(dsprites.factor_values()[1]):
        squares = np.concatenate([np.tile([0, i, 0], (len(positions), 1)), positions], 1)
        ink = dsprites.render(squares).sum(1).mean()
        assert abs(ink / (0.28 * s * 64) ** 2 - 1) < 0.01, (s, ink)
        assert abs(dsprites.ink_area(0, s) / (0.28 * s * 64) ** 2 - 1) < 1e-3
    # orientation: 0 and 2 pi draw the same sprite; a turn keeps the area; the heart is not symmetric under a half turn
    turn = dsprites.render(np.array([[2, 5, o, 15, 15] for o in (0, 39, 10, 20)]))
    assert np.array_equal(turn[0], turn[1]) and not np.array_equal(turn[0], turn[3])
    assert abs(turn[2].sum() / turn[0].sum() - 1) < 0.03
    # every image is binary, non-empty, and inside the canvas
    rows = np.random.default_rng(0).choice(dsprites.GRID_SIZE, 3000, replace=False)
    many = dsprites.render(dsprites.grid_factors(rows))
    assert set(np.unique(many)) == {0, 1} and many.sum(1).min() > 40


def test_render_refuses_factors_off_the_grid():
    for bad in (np.zeros((2, 4), np.int64), np.array([[0, 6, 0, 0, 0]]), np.array([[0.0, 0, 0, 0, 0]]), np.array([[-1, 0, 0, 0, 0]])):
        with pytest.raises(PyrovaeError, match="dSprites factor"):
            dsprites.render(bad)
    with pytest.raises(PyrovaeError, match="must be uint8"):
        dsprites.validate(np.zeros((10, 4096), np.uint8))


def test_the_dsprites_data_set_holds_rows_and_their_factors():
    data = load_dataset("dsprites", examples=600, seed=3)
    train, valid = data.split("train"), data.split("valid")
    assert (len(train), len(valid)) == (540, 60) and data.event_shape == (4096,) and data.kind == "binary" and data.image_shape == (64, 64)
    both = torch.cat([train.factors, valid.factors])
    assert len(torch.unique(both, dim=0)) == 600  # disjoint splits, no repeats
    assert np.array_equal(dsprites.render(train.factors.numpy()), train.x.numpy())
    again = load_dataset("dsprites", examples=600, seed=3)
    assert torch.equal(again.split("valid").x, valid.x)
    assert not torch.equal(load_dataset("dsprites", examples=600, seed=4).split("valid").factors, valid.factors)
    for options in ({"examples": 5}, {"examples": True}, {"seed": -1}):
        with pytest.raises(PyrovaeError, match="dsprites option"):
            load_dataset("dsprites", **options)


# --- total correlation ----------------------------------------------------------------------


def _gaussian_tc(cov: torch.Tensor) -> float:
    """TC of a Gaussian: sum_d 0.5 log cov_dd - 0.5 log det cov."""
    return float(0.5 * cov.diagonal().log().sum() - 0.5 * torch.logdet(cov))


@pytest.mark.parametrize("rho", [0.0, 0.8])
def test_the_tc_estimator_meets_the_gaussian_closed_form(rho):
    """x ~ N(0, C), q(z|x) = N(x, s^2 I): the aggregate posterior is near N(0, C + s^2 I); with
    the data set as one batch the estimator is the TC of the exact mixture."""
    n, s = 2000, 0.3
    cov = torch.tensor([[1.0, rho, 0.0], [rho, 1.0, 0.3 * rho], [0.0, 0.3 * rho, 1.0]])
    x = torch.distributions.MultivariateNormal(torch.zeros(3), cov).sample((n,))
    z = x + s * torch.randn(n, 3)
    pairs = dist.Normal(x, s).log_prob(z[:, None, :])  # [i, j, d] = log q(z_id | x_j)
    estimate = total_correlation(pairs).mean().item()
    assert abs(estimate - _gaussian_tc(cov + s**2 * torch.eye(3))) < 0.05, estimate


def _model(x):
    loc = pyro.param("w", torch.zeros(3, 6))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        pyro.sample("x", dist.Normal(z @ loc, 1.0).to_event(1), obs=x)


def _guide(x):
    a = pyro.param("a", 0.3 * torch.randn(6, 3))
    log_s = pyro.param("log_s", torch.full((3,), -0.5))
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(x @ a, log_s.exp()).to_event(1))


def test_tcvae_adds_beta_minus_one_times_the_tc_of_the_elbo_draw():
    x = torch.randn(40, 6)
    elbo = make_objective("elbo")
    losses = {}
    for beta in (1.0, 4.0):
        pyro.set_rng_seed(5)
        losses[beta] = TCVAE(beta=beta).differentiable_loss(_model, _guide, x)
    pyro.set_rng_seed(5)
    assert torch.allclose(losses[1.0], elbo.differentiable_loss(_model, _guide, x))  # beta = 1: the ELBO exactly
    # the TC by hand at the same draw: q(z_i | x_j) from the guide's parameters
    pyro.set_rng_seed(5)
    z = poutine.trace(_guide).get_trace(x).nodes["z"]["value"]
    q = dist.Normal((x @ pyro.param("a"))[None], pyro.param("log_s").exp())
    log_q = q.log_prob(z[:, None, :])  # (i, j, d)
    tc = (torch.logsumexp(log_q.sum(-1), 1) - torch.logsumexp(log_q, 1).sum(-1)) + (3 - 1) * math.log(40)
    assert torch.allclose(losses[4.0] - losses[1.0], 3.0 * tc.sum(), rtol=1e-4)
    # and its gradient reaches the guide through the TC term
    grad = torch.autograd.grad(losses[4.0] - losses[1.0], pyro.param("a"), allow_unused=True)[0]
    assert grad is not None and grad.abs().sum() > 0


def test_tcvae_refuses_what_its_estimator_cannot_serve():
    with pytest.raises(PyrovaeError, match="one sample per example"):
        make_objective("tcvae", num_particles=2)
    with pytest.raises(PyrovaeError, match="beta must be"):
        make_objective("tcvae", options={"beta": -1})
    with pytest.raises(PyrovaeError, match="unknown --objective-option 'gamma'"):
        make_objective("tcvae", options={"gamma": 1})

    def full_guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.MultivariateNormal(torch.zeros(len(x), 3), torch.eye(3)))

    with pytest.raises(PyrovaeError, match="factorized in the guide"):
        TCVAE(beta=2).differentiable_loss(_model, full_guide, torch.randn(8, 6))


def test_dip_vae_adds_the_covariance_penalty_of_the_guides_means_for_every_example():
    x = torch.randn(50, 6)
    losses = {}
    for lambda_od in (0.0, 3.0):
        pyro.set_rng_seed(7)
        losses[lambda_od] = make_objective("dip-vae", options={"lambda_od": lambda_od, "lambda_d": 2 * lambda_od}).differentiable_loss(_model, _guide, x)
    pyro.set_rng_seed(7)
    assert torch.allclose(losses[0.0], make_objective("elbo").differentiable_loss(_model, _guide, x))  # no penalty: the ELBO exactly
    means = x @ pyro.param("a")
    cov = torch.cov(means.T, correction=0)
    off = cov - torch.diag(cov.diagonal())
    penalty = 3.0 * off.pow(2).sum() + 6.0 * (cov.diagonal() - 1).pow(2).sum()
    assert torch.allclose(losses[3.0] - losses[0.0], 50 * penalty, rtol=1e-4)
    with pytest.raises(PyrovaeError, match="lambda_od must be"):
        make_objective("dip-vae", options={"lambda_od": -1})


# --- beta-VAE: the latent sites' weight -----------------------------------------------------


def test_beta_weighs_the_kl_term_and_beta_one_is_the_elbo():
    x = torch.randn(30, 6)
    elbo = make_objective("elbo")
    values = []
    for beta in (0.0, 1.0, 3.0):
        pyro.set_rng_seed(2)
        values.append(elbo.differentiable_loss(scale_latents(_model, beta), scale_latents(_guide, beta), x).item())
    pyro.set_rng_seed(2)
    trace = poutine.trace(poutine.replay(_model, trace=poutine.trace(_guide).get_trace(x))).get_trace(x)
    reconstruction = trace.nodes["x"]["fn"].log_prob(x).sum().item()
    assert math.isclose(values[0], -reconstruction, rel_tol=1e-5)  # beta = 0: the reconstruction term alone
    kl = values[1] - values[0]
    assert math.isclose(values[2], values[0] + 3.0 * kl, rel_tol=1e-5)  # affine in beta: -rec + beta KL


def test_beta_trains_from_the_command_line_and_is_refused_out_of_range(tmp_path, capsys):
    flags = ["--dataset", "digits", "--latent", "2", "--hidden", "16", "--epochs", "1", "--batch-size", "300", "--eval-samples", "0", "--quiet"]
    assert main(["fit", *flags, "--beta", "4", "--out", str(tmp_path / "b")]) == 0
    assert RunDir(tmp_path / "b").config()["beta"] == 4.0
    assert main(["fit", *flags, "--beta", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "--beta must be a positive number" in capsys.readouterr().err
    assert main(["fit", *flags, "--objective", "dip-vae", "--objective-option", "lambda_od=2", "--out", str(tmp_path / "dip")]) == 0
    assert RunDir(tmp_path / "dip").config()["objective_options"] == {"lambda_od": 2}
    assert main(["fit", *flags, "--method", "wake-sleep", "--objective", "tcvae", "--out", str(tmp_path / "ws")]) == 2
    assert "trains on objectives of its own" in capsys.readouterr().err


# --- FactorVAE ------------------------------------------------------------------------------

FACTOR = dict(dataset="digits", method="factor-vae", latent=3, hidden=(16,), batch_size=100, epochs=1, eval_samples=0,
              method_options={"hidden": 32, "layers": 2, "gamma": 10.0})



def test_factor_vae_steps_move_only_their_own_parameters():
    experiment = build(Config(**FACTOR))
    method = experiment.method
    vae = {id(p) for group in method.optimizer.param_groups for p in group["params"]}
    critic = {id(p) for p in method.critic.parameters()}
    assert not vae & critic and {id(p) for p in method.parameters()} == vae | critic
    x = experiment.data.batch("train", torch.arange(100))
    snapshot = lambda ps: [p.detach().clone() for p in ps]  # noqa: E731
    vae_params, critic_params = [p for p in method.parameters() if id(p) in vae], method.critic.parameters()
    before_vae, before_critic = snapshot(vae_params), snapshot(critic_params)
    method.critic_step = lambda codes: None  # the generator step alone
    method.step(x, torch.arange(100))
    assert all(torch.equal(a, b) for a, b in zip(before_critic, critic_params))
    assert all(not torch.equal(a, b) for a, b in zip(before_vae, vae_params) if b.numel())
    del method.critic_step
    before_vae = snapshot(vae_params)
    codes = torch.randn(100, 3)
    method.critic_step(codes)  # the critic step alone
    assert all(torch.equal(a, b) for a, b in zip(before_vae, vae_params))
    assert all(not torch.equal(a, b) for a, b in zip(before_critic, critic_params))


def test_factor_vae_discriminator_learns_to_tell_correlated_codes_from_shuffled():
    method = build(Config(**{**FACTOR, "method_options": {**FACTOR["method_options"], "critic_lr": 1e-3}})).method
    shared = torch.randn(512, 1)
    codes = torch.cat([shared, shared + 0.05 * torch.randn(512, 1), torch.randn(512, 1)], 1)  # z1 ~ z2: a TC of 3.0 nats
    independent = torch.randn(512, 3)
    estimate = lambda z: (lambda logits: (logits[:, 0] - logits[:, 1]).mean().item())(method.critic.network(z))  # noqa: E731
    for _ in range(500):
        method.critic_step(codes)
    assert estimate(codes) > 1.0  # its TC estimate sees the dependence
    for _ in range(500):
        method.critic_step(independent)
    assert abs(estimate(independent)) < 0.3  # and none where there is none


def test_factor_vae_resumes_exactly(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    fit(Config(**{**FACTOR, "epochs": 2}), straight, progress=False)
    fit(Config(**FACTOR), stopped, progress=False)
    assert main(["fit", "--resume", "--out", str(stopped), "--epochs", "2", "--quiet"]) == 0
    a, b = RunDir(straight).load_checkpoint(), RunDir(stopped).load_checkpoint()
    assert set(a["method"]["critic"]) == {"network", "optimizer"}
    _same_training(a, b)


def test_factor_vae_refuses_what_it_cannot_train():
    with pytest.raises(PyrovaeError, match="one draw per example"):
        build(Config(**{**FACTOR, "particles": 2}))
    with pytest.raises(PyrovaeError, match="gamma must be"):
        build(Config(**{**FACTOR, "method_options": {"gamma": -1.0}}))


# --- scoring a run --------------------------------------------------------------------------


def test_the_ground_truth_looks_rows_up_in_the_packed_grid_as_render_draws_them():
    rows = np.random.default_rng(2).choice(dsprites.GRID_SIZE, 300, replace=False)
    factors = dsprites.grid_factors(rows)
    packed = np.zeros((dsprites.GRID_SIZE, 512), np.uint8)  # untouched pages cost nothing
    packed[rows] = np.packbits(dsprites.render(factors), axis=1)
    assert np.array_equal(dsprites.DSprites(packed).observe(factors), dsprites.DSprites().observe(factors))
    with pytest.raises(PyrovaeError, match="dSprites factor"):
        dsprites.DSprites(packed).observe(np.array([[3, 0, 0, 0, 0]]))


def test_a_cached_grid_that_is_not_what_the_renderer_draws_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("PYROVAE_CACHE", str(tmp_path))
    assert load_dataset("dsprites", examples=20).ground_truth.packed is None  # no cache: rendered
    path = tmp_path / "dsprites" / "grid-1.npy"
    path.parent.mkdir()
    np.save(path, np.zeros((dsprites.GRID_SIZE, 512), np.uint8))  # the right shape, the wrong images
    assert load_dataset("dsprites", examples=20).ground_truth.packed is None


def test_traversals_move_one_coordinate_of_the_encoding_at_a_time():
    experiment = build(Config(dataset="dsprites", dataset_options={"examples": 200}, latent=3, hidden=(16,), epochs=0, eval_samples=0))
    experiment.train_mode(False)
    sites, x = experiment.method.sites, experiment.data.batch("valid", torch.arange(1))[0]
    grid = traverse(experiment.model, experiment.guide, sites, x, steps=5, span=2.0)
    assert grid.shape == (3, 5, 4096)
    centre = encode(experiment.guide, sites, x[None])["z"][0]
    z = centre.clone()
    z[1] = -1.0  # coordinate 1 at the second of five steps over [-2, 2]
    assert torch.allclose(grid[1, 1], decode(experiment.model, sites, {"z": z[None]}, x[None])[0])


def test_score_writes_the_metrics_of_a_run_and_refuses_data_without_factors(tmp_path, capsys):
    flags = ["--latent", "3", "--hidden", "16", "--epochs", "1", "--batch-size", "100", "--eval-samples", "0", "--quiet"]
    run = tmp_path / "sprites"
    assert main(["fit", "--dataset", "dsprites", "--data-option", "examples=500", *flags, "--out", str(run)]) == 0
    assert (run / "traversals.png").exists()
    capsys.readouterr()
    assert main(["score", str(run), "--points", "200", "--metrics", "mig,factor-vae", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((run / "scores-0.json").read_text())
    assert saved == printed and 0 <= saved["mig"] <= 1 and 0 <= saved["factor-vae"] <= 1 and "dci_disentanglement" not in saved
    assert main(["score", str(run), "--points", "200", "--metrics", "mig,wrong"]) == 2
    assert "unknown metric 'wrong'" in capsys.readouterr().err
    digits = tmp_path / "digits"
    assert main(["fit", "--dataset", "digits", *flags, "--out", str(digits)]) == 0
    assert main(["score", str(digits), "--metrics", "beta-vae"]) == 2
    assert "has no ground-truth factors" in capsys.readouterr().err
