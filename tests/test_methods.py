"""Inference methods against the linear-Gaussian model's exact posterior, marginal and ML fit."""

import copy
import csv
import dataclasses
import json
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch import nn

import pyrovae.compare as compare_module
from pyrovae import evaluate
from pyrovae.ais import AISSettings
from pyrovae.batch import as_batch
from pyrovae.compare import ProposalSettings, compare, gap_decomposition
from pyrovae.data import load_dataset
from pyrovae.errors import PyrovaeError
from pyrovae.guides import build_guide
from pyrovae.infer import MAP, MCMCEM, AmortizedVI, LocalVI, TrainSettings
from pyrovae.models import LinearGaussian
from pyrovae.registry import METHODS

W_TRUE = torch.tensor([[1.5, 0.9], [0.8, -1.0], [0.2, 0.5], [-1.1, 0.7], [0.6, 1.2]])


def _model(noise: float = 0.7) -> LinearGaussian:
    model = LinearGaussian((5,), latent=2, noise=noise)
    with torch.no_grad():
        model.weight.copy_(W_TRUE)
        model.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0, 0.5]))
    return model


@pytest.fixture
def frozen_setup():
    torch.manual_seed(1)
    model = _model()
    x = model.marginal().sample((30,))
    model.requires_grad_(False)
    return model, x


def test_local_full_covariance_vi_reaches_log_marginal(frozen_setup):
    model, x = frozen_setup
    guide = build_guide("diagonal", model, x, hidden=(8,))
    method = LocalVI(model, guide, TrainSettings(particles=8), len(x), covariance="full", local_lr=0.05)
    for i in range(160):
        if i == 120:
            for group in method.optimizer.local.param_groups:
                group["lr"] = 0.005
        method.step(x, torch.arange(len(x)))
    elbo = evaluate(model, method.local, x, num_samples=2000).elbo
    assert (model.log_marginal(x) - elbo).mean().abs() < 0.05


def test_mcmc_em_e_step_samples_the_exact_posterior(frozen_setup):
    model, x = frozen_setup
    guide = build_guide("diagonal", model, x, hidden=(8,))
    method = MCMCEM(model, guide, TrainSettings(), len(x), leapfrog_steps=4, step_size=0.3, adapt_until=20)
    draws = torch.stack([method.e_step(x, torch.arange(len(x))).clone() for _ in range(100)])[20:]
    posterior = model.posterior(x)
    assert (draws.mean(0) - posterior.mean).abs().mean() < 0.06
    centred = draws - draws.mean(0)
    cov = torch.einsum("tbi,tbj->ij", centred, centred) / (draws.shape[0] * draws.shape[1])
    assert torch.allclose(cov, posterior.covariance_matrix[0], atol=0.02)
    assert 0.5 < method.accept_rate < 1.0


def test_mcmc_em_diagonal_mass_adapts_to_the_posterior_variances_and_still_samples_the_posterior(frozen_setup):
    model, x = frozen_setup
    guide = build_guide("diagonal", model, x, hidden=(8,))
    method = MCMCEM(model, guide, TrainSettings(), len(x), leapfrog_steps=4, step_size=0.3, adapt_until=40, mass="diagonal")
    for _ in range(42):  # the first visit (burn-in) and the mass window of 40 transitions
        method.e_step(x, torch.arange(len(x)))
    posterior = model.posterior(x)
    variances = posterior.covariance_matrix[0].diagonal()
    assert bool((method.mass_state["count"] == -1).all())
    learned = method.mass_state["inverse_mass"]  # per example; their average estimates the (shared) posterior variances
    assert torch.allclose(learned.mean(0), variances, rtol=0.2), (learned.mean(0), variances)
    draws = torch.stack([method.e_step(x, torch.arange(len(x))).clone() for _ in range(100)])[30:]
    assert (draws.mean(0) - posterior.mean).abs().mean() < 0.06
    centred = draws - draws.mean(0)
    cov = torch.einsum("tbi,tbj->ij", centred, centred) / (draws.shape[0] * draws.shape[1])
    assert torch.allclose(cov, posterior.covariance_matrix[0], atol=0.02)
    assert 0.5 < method.accept_rate < 1.0
    with pytest.raises(PyrovaeError, match="mass must be 'identity' or 'diagonal'"):
        MCMCEM(model, guide, TrainSettings(), len(x), mass="dense")


def test_map_points_reach_the_posterior_mode(frozen_setup):
    model, x = frozen_setup
    method = MAP(model, build_guide("diagonal", model, x, hidden=(8,)), TrainSettings(), len(x), local_lr=0.1)
    for _ in range(300):
        method.step(x, torch.arange(len(x)))
    mode = model.posterior(x).mean  # a Gaussian posterior's mode is its mean
    assert (method.points()["z"] - mode).abs().max() < 0.02


def test_mcmc_em_chains_persist_per_example(frozen_setup):
    model, x = frozen_setup
    method = MCMCEM(model, build_guide("diagonal", model, x, hidden=(8,)), TrainSettings(), len(x), burn_in=0)
    method.step(x[:10], torch.arange(10))
    assert (method.transitions[:10] == 1).all() and (method.transitions[10:] == 0).all()
    before = method.chains[10:].clone()
    method.step(x[:10], torch.arange(10))
    assert torch.equal(method.chains[10:], before) and (method.transitions[:10] == 2).all()


def _ml_covariance(x: torch.Tensor, latent: int) -> torch.Tensor:
    """W_ML W_ML^T = U (Lambda - sigma^2 I) U^T from the sample covariance (Tipping & Bishop 1999)."""
    centred = x - x.mean(0)
    values, vectors = torch.linalg.eigh(centred.T @ centred / len(x))
    values, vectors = values.flip(0), vectors.flip(1)
    noise = values[latent:].mean()
    top = vectors[:, :latent]
    return top @ torch.diag(values[:latent] - noise) @ top.T


@pytest.mark.parametrize("name", ["mcmc-em", "local", "amortized"])
def test_methods_move_the_loadings_toward_maximum_likelihood(name):
    torch.manual_seed(2)
    x = _model(0.5).marginal().sample((200,))
    target = _ml_covariance(x, 2)
    torch.manual_seed(3)
    model = LinearGaussian((5,), latent=2, noise=1.0)
    guide = build_guide("diagonal", model, x, hidden=(16,))
    options = {"local": {"local_lr": 0.3}, "mcmc-em": {"leapfrog_steps": 4, "burn_in": 2}}.get(name, {})
    method = METHODS.get(name)(model, guide, TrainSettings(lr=0.03, batch_size=50), len(x), **options)
    distance = lambda: torch.linalg.norm(model.weight @ model.weight.T - target).item()  # noqa: E731
    before = distance()
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        for index in torch.randperm(len(x), generator=generator).split(50):
            method.step(x[index], index)
    assert distance() < 0.7 * before  # local VI is the slowest: each q_i moves once an epoch


def test_gap_decomposition_adds_up_and_gaps_are_nonnegative(frozen_setup):
    model, x = frozen_setup
    guide = build_guide("diagonal", model, x, hidden=(16,))
    method = AmortizedVI(model, guide, TrainSettings(lr=1e-2), len(x))
    for _ in range(100):
        method.step(x, torch.arange(len(x)))
    gaps = gap_decomposition(model, guide, x, ProposalSettings(steps=100, samples=500))
    assert math.isclose(gaps["approximation_gap"] + gaps["amortization_gap"], gaps["log_px"] - gaps["elbo_q"], abs_tol=1e-4)
    assert gaps["approximation_gap"] > -3 * gaps["approximation_gap_se"] - 0.01
    assert gaps["amortization_gap"] > -3 * gaps["amortization_gap_se"] - 0.01
    assert abs(gaps["log_px"] - model.log_marginal(x).mean().item()) < 0.05


def _quadrature_log_likelihood(model: nn.Module, x: torch.Tensor, latent: int = 2, nodes: int = 60) -> torch.Tensor:
    """log p(x) per example by Gauss-Hermite quadrature over a 2-D latent ``z``, through the program
    conditioned on each node (60 nodes a dimension agree with 100 to 2e-6 on these decoders)."""
    points, weights = np.polynomial.hermite_e.hermegauss(nodes)
    grid = torch.cartesian_prod(*[torch.tensor(points, dtype=torch.float32)] * latent)
    log_w = torch.tensor(np.log(weights / weights.sum()), dtype=torch.float32)
    log_w = sum(log_w.reshape((-1,) + (1,) * (latent - 1 - i)) for i in range(latent)).reshape(-1)
    z = grid.repeat(len(x), 1)
    with torch.no_grad():
        trace = poutine.trace(poutine.condition(model, data={"z": z})).get_trace(x.repeat_interleave(len(grid), 0))
        trace.compute_log_prob()
        joint = sum(site["log_prob"] for site in trace.nodes.values() if site["type"] == "sample" and "log_prob" in site)
    log_likelihood = joint - dist.Normal(0.0, 1.0).log_prob(z).sum(-1)  # the quadrature weights hold N(0, I)
    return (log_likelihood.reshape(len(x), len(grid)) + log_w).logsumexp(-1)


def test_compare_table_agrees_with_itself_and_with_a_recomputation(tmp_path, monkeypatch):
    """compare.json, compare.csv and compare.md hold the returned rows' numbers; each method's
    held-out log p(x) (fitted proposal, and its own encoder where it has one) is within Monte Carlo
    error of its trained decoder's log p(x) by quadrature over the 2-D latent, its ELBOs below it,
    and its throughput figures follow from its steps and seconds."""
    methods = ["amortized", "local", "mcmc-em:burn_in=0:leapfrog_steps=2", "map", "wake-sleep", "wake-sleep:variant=rws:particles=3"]
    proposal = ProposalSettings(steps=30, samples=1000)
    scored: list[tuple[nn.Module, torch.Tensor]] = []  # each method's decoder and held-out data, as scored
    real = compare_module.heldout_scores

    def spy(model, x, sites, settings=ProposalSettings(), init=None, batch=256):
        if settings is proposal:
            scored.append((model, as_batch(x).primary.clone()))
        return real(model, x, sites, settings, init, batch)

    monkeypatch.setattr(compare_module, "heldout_scores", spy)
    annealing = AISSettings(steps=60, chains=8, leapfrog=3, warmup=10)
    rows = compare("vae", "digits", methods, steps=2, out_dir=tmp_path, latent=2, hidden=(16,), checkpoints=1, eval_examples=8,
                   checkpoint_examples=4, proposal=proposal, annealing=annealing, bdmc_examples=4, log=lambda s: None)
    assert [r["method"] for r in rows] == methods and len(scored) == len(methods)
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["results"] == rows and saved["setup"]["steps"] == 2 and saved["setup"]["latent"] == 2
    with open(tmp_path / "compare.csv", newline="") as f:
        table = list(csv.DictReader(f))
    md = [line.strip("|").split("|") for line in (tmp_path / "compare.md").read_text().splitlines() if line.startswith("| ")]
    header, md_rows = [c.strip() for c in md[0]], [[c.strip() for c in r] for r in md[1:]]
    assert header == [title for _, title in compare_module.TABLE] and list(table[0]) == list(compare_module.COLUMNS)
    assert len(table) == len(md_rows) == len(rows)
    for row, csv_row, md_row in zip(rows, table, md_rows):
        for (column, _), text in zip(compare_module.TABLE, md_row):
            value = row[column]
            assert text == ("" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)), column
        for column in compare_module.COLUMNS:
            value = row[column]
            assert csv_row[column] == ("" if value is None else str(value)), column

    valid = load_dataset("digits").batch("valid", torch.arange(8))
    for row, (model, x) in zip(rows, scored):
        assert torch.equal(x, valid) and row["split"] == "valid"  # the first 8 validation images
        exact = _quadrature_log_likelihood(model, x).mean().item()
        assert row["heldout_examples"] == 8 and row["is_samples"] == 1000 and row["steps"] == 2
        # observed errors are below 0.005 (fitted) and 0.02 (amortized); the ELBO gaps exceed 0.04 and 0.2
        assert abs(row["heldout_ll"] - exact) < 0.02, (row["method"], row["heldout_ll"], exact)
        assert exact - 2.0 < row["heldout_elbo_fitted"] < exact + 0.01
        if row["heldout_ll_amortized"] is not None:
            assert abs(row["heldout_ll_amortized"] - exact) < 0.08, (row["method"], row["heldout_ll_amortized"], exact)
            assert exact - 5.0 < row["heldout_elbo_amortized"] < exact + 0.02
        # every decoder scored by the same AIS, exact within its Monte Carlo error; BDMC brackets simulated data tightly
        assert abs(row["heldout_ll_ais"] - exact) < 4 * row["ais_stderr"] + 0.05, (row["method"], row["heldout_ll_ais"], exact)
        assert row["ais"] == dataclasses.asdict(annealing) and abs(row["bdmc_width"]) < 0.3 and row["bdmc_lower"] < row["bdmc_upper"] + 0.1
        assert math.isclose(row["eval_seconds"], row["ais_seconds"] + row["bdmc_seconds"] + row["is_seconds"])
        end = row["curve"][-1]  # the last checkpoint scores the trained decoder (by AIS) on the first 4 examples
        assert end["steps"] == 2 and abs(end["heldout_ll"] - _quadrature_log_likelihood(model, x[:4]).mean().item()) < 0.1
        assert math.isclose(row["steps_per_second"], 2 / row["train_seconds"], rel_tol=1e-6)
        assert math.isclose(row["examples_per_second"], 2 * 100 / row["train_seconds"], rel_tol=1e-6)


class UserModel(nn.Module):
    """A user's program: its own site names, no index/size arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.loadings = nn.Linear(2, 5)

    def forward(self, data: torch.Tensor) -> None:
        pyro.module("user", self)
        with pyro.plate("data", len(data)):
            code = pyro.sample("code", dist.Normal(torch.zeros(len(data), 2), 1.0).to_event(1))
            pyro.sample("pixels", dist.Normal(self.loadings(code), 0.5).to_event(1), obs=data)


@pytest.mark.parametrize(
    "name, options",
    [("amortized", {}), ("local", {}), ("local", {"covariance": "full", "semi_amortized_steps": 3}), ("map", {}),
     ("mcmc-em", {}), ("wake-sleep", {}), ("wake-sleep", {"variant": "rws"})],
)
def test_user_model_runs_under_every_method(name, options):
    x = torch.randn(20, 5)
    model = UserModel()
    guide = build_guide("diagonal", model, x, hidden=(8,))
    method = METHODS.get(name)(model, guide, TrainSettings(batch_size=10), len(x), **options)
    state = copy.deepcopy(method.state_dict())
    pyro.set_rng_seed(5)
    first = method.step(x[:10], torch.arange(10))
    method.load_state_dict(state)
    pyro.set_rng_seed(5)
    assert math.isclose(method.step(x[:10], torch.arange(10)), first, rel_tol=1e-5)  # a resumed run continues exactly
    assert math.isfinite(method.step(x[10:], torch.arange(10, 20)))


def test_local_full_covariance_starts_exactly_at_the_amortized_guide():
    """q* in the gap decomposition starts at q: a full-covariance table copies the Cholesky factor."""
    from pyro import poutine

    from pyrovae.guides import build_guide
    from pyrovae.guides.local import LocalGaussian
    from pyrovae.infer.local import model_sites
    from pyrovae.models import VAE

    x = torch.bernoulli(torch.rand(12, 30))
    model = VAE((30,), 4, (16,))
    guide = build_guide("full", model, x)
    with torch.no_grad():
        guide.heads["z"].weight.normal_(0, 0.5)  # a strongly correlated q
    local = LocalGaussian(model_sites(model, guide, x), num_examples=12, covariance="full")
    local.initialize_from(guide, x)
    amortized = poutine.trace(guide).get_trace(x).nodes["z"]["fn"]
    assert amortized.scale_tril.tril(-1).abs().max() > 0.1
    assert torch.allclose(local.scale_tril("z", torch.arange(12)), amortized.scale_tril, atol=1e-5)
    assert torch.allclose(local.means(torch.arange(12))["z"], amortized.loc, atol=1e-6)


def test_gap_decomposition_of_a_flow_guide_fits_a_copy_of_the_guide_per_example(frozen_setup):
    """For IAF, q* is the guide itself fine-tuned on each example: L[q*] >= L[q], the gaps add up."""
    model, x = frozen_setup
    x = x[:6]
    guide = build_guide("iaf", model, x, hidden=(16,), flow_steps=1)
    method = AmortizedVI(model, guide, TrainSettings(lr=1e-2), len(x))
    for _ in range(30):
        method.step(x, torch.arange(len(x)))
    before = [p.detach().clone() for p in guide.parameters()]
    gaps = gap_decomposition(model, guide, x, ProposalSettings(steps=60, samples=500, particles=4), qstar="finetune")
    assert all(torch.equal(a, b) for a, b in zip(before, guide.parameters()))  # copies were fitted, not the guide
    assert gaps["qstar"] == "guide fine-tuned per example"
    assert math.isclose(gaps["approximation_gap"] + gaps["amortization_gap"], gaps["log_px"] - gaps["elbo_q"], abs_tol=1e-4)
    assert gaps["amortization_gap"] > 0.0  # fitting each example alone improves on the amortized guide
    assert gaps["approximation_gap"] > -3 * gaps["approximation_gap_se"] - 0.01
    assert abs(gaps["log_px"] - model.log_marginal(x).mean().item()) < 0.05
