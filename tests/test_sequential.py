"""The built-in sequence models (DMM, Krishnan et al. 2017; VRNN, Chung et al. 2015) with their
guides: padding and what it holds add nothing to any bound, gradients reach every parameter,
the figures per time step, exact resume, and the refusals."""

import json
from pathlib import Path

import pyro
import pytest
import torch
from test_user_cli import run_cli

from pyrovae.batch import Batch
from pyrovae.evaluate import evaluate
from pyrovae.guides import build_guide
from pyrovae.models.sequential import DMM, VRNN
from pyrovae.objectives import make_objective

DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data")
QUICK = ["--dataset", "jsb-chorales", "--data-dir", DATA, "--data-option", "sequences=6", "--fields", "x,lengths", "--batch-size", "3"]


def sequences(lengths=(5, 3, 7), t_max=9, notes=6):
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((len(lengths), t_max, notes), 0.3))
    lengths = torch.tensor(lengths)
    x[torch.arange(t_max) >= lengths[:, None]] = 0.0
    return x, lengths


def pair(name, **options):
    pyro.set_rng_seed(0)
    x, lengths = sequences()
    model = DMM(x.shape[1:], latent=3, transition=8, emission=8) if name == "dmm" else VRNN(x.shape[1:], latent=3, state=8, emission=8)
    guide = build_guide(name, model, Batch((x, lengths), {}), **options)
    return model, guide, x, lengths


@pytest.mark.parametrize("name, options", [("dmm", {"rnn": 8}), ("dmm", {"rnn": 8, "iafs": 2, "iaf_hidden": 8}), ("vrnn", {})])
@torch.no_grad()
def test_padding_and_what_it_holds_add_nothing_to_the_bound(name, options):
    """Each sequence alone, cut to its length, against the batch padded to 9 steps with ones
    in the padding: the same draws (the padded steps come last), so the same ELBO and IS."""
    model, guide, x, lengths = pair(name, **options)
    noisy = x.clone()
    noisy[torch.arange(x.shape[1]) >= lengths[:, None]] = 1.0
    for i, length in enumerate(lengths.tolist()):
        pyro.set_rng_seed(i)
        padded = evaluate(model, guide, Batch((noisy[i : i + 1], lengths[i : i + 1]), {}), num_samples=8)
        pyro.set_rng_seed(i)
        cut = evaluate(model, guide, Batch((x[i : i + 1, :length], lengths[i : i + 1]), {}), num_samples=8)
        assert torch.allclose(padded.elbo, cut.elbo, rtol=1e-5) and torch.allclose(padded.log_likelihood, cut.log_likelihood, rtol=1e-5)
        assert padded.log_likelihood >= padded.elbo - 1e-4


@pytest.mark.parametrize("name, options", [("dmm", {"rnn": 8, "iafs": 1, "iaf_hidden": 8}), ("vrnn", {})])
def test_the_bounds_gradient_reaches_every_parameter(name, options):
    model, guide, x, lengths = pair(name, **options)
    loss = make_objective("elbo", 1, 1).differentiable_loss(model, guide, x, lengths)
    loss.backward()
    params = dict(model.named_parameters()) | {f"guide.{k}": v for k, v in guide.named_parameters()}
    unreached = [k for k, v in params.items() if v.grad is None or not v.grad.abs().sum() > 0]
    assert not unreached, unreached


def test_the_dmm_fits_resumes_exactly_and_reports_per_time_step(tmp_path):
    sizes = ["--latent", "3", "--guide", "dmm", "--guide-option", "rnn=16"]
    straight = run_cli("fit", "--model", "dmm", *sizes, *QUICK, "--epochs", "3", "--eval-samples", "5", "--out", str(tmp_path / "a"), "--quiet")
    assert straight.returncode == 0, straight.stderr
    assert "per time step: ELBO / IS" in straight.stdout and (tmp_path / "a" / "piano_rolls.png").stat().st_size > 0
    first = run_cli("fit", "--model", "dmm", *sizes, *QUICK, "--epochs", "2", "--eval-samples", "5", "--out", str(tmp_path / "b"), "--quiet")
    resumed = run_cli("fit", "--resume", "--epochs", "3", "--eval-samples", "5", "--out", str(tmp_path / "b"), "--quiet")
    assert first.returncode == 0 and resumed.returncode == 0, resumed.stderr
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in "ab")
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]
    assert a["log_likelihood"] == b["log_likelihood"]
    lengths = torch.tensor([len(s) for s in json.loads((Path(DATA) / "jsb_chorales" / "jsb-chorales-quarter.json").read_text())["valid"][:6]])
    assert a["log_likelihood_per_step"] == pytest.approx(a["log_likelihood"] * 6 / lengths.sum().item())
    assert a["log_likelihood"] >= a["elbo"]


def test_the_vrnn_fits_and_is_evaluated_per_time_step(tmp_path):
    done = run_cli("fit", "--model", "vrnn", "--guide", "vrnn", "--latent", "3", "--model-option", "state=16", *QUICK, "--epochs", "2",
                   "--eval-samples", "0", "--out", str(tmp_path / "v"), "--quiet")
    assert done.returncode == 0, done.stderr
    done = run_cli("evaluate", str(tmp_path / "v"), "--samples", "20", "--json")
    scored = json.loads(done.stdout)
    assert scored["log_likelihood_per_step"] >= scored["elbo_per_step"] and scored["log_likelihood_per_step"] < 0


def test_sequence_models_refuse_data_without_lengths_and_other_models_guides():
    done = run_cli("fit", "--model", "dmm", "--guide", "dmm", "--dataset", "jsb-chorales", "--data-dir", DATA, "--data-option", "sequences=4", "--epochs", "1")
    assert done.returncode == 2 and "--fields x,lengths" in done.stderr
    done = run_cli("fit", "--model", "vae", "--guide", "vrnn", "--dataset", "digits", "--epochs", "1")
    assert done.returncode == 2 and "--model vrnn" in done.stderr
    done = run_cli("fit", "--model", "dmm", "--guide", "dmm", *QUICK[:4], "--data-option", "sequences=0", "--fields", "x,lengths")
    assert done.returncode == 2 and "sequences must be a positive integer" in done.stderr


def test_clip_norm_bounds_the_gradient_of_every_step():
    from pyrovae.infer import AmortizedVI, TrainSettings

    model, guide, x, lengths = pair("dmm", rnn=8)
    batch, index = Batch((x, lengths), {}), torch.arange(len(x))

    def norm_after_a_step(clip):
        method = AmortizedVI(model, guide, TrainSettings(), num_examples=len(x), clip_norm=clip)
        method.step(batch, index)
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for g in method.optimizer.param_groups for p in g["params"] if p.grad is not None]))

    assert norm_after_a_step(None) > 1.0 and norm_after_a_step(0.5) <= 0.5 + 1e-5
    with pytest.raises(Exception, match="clip_norm must be a positive number"):
        AmortizedVI(model, guide, TrainSettings(), num_examples=len(x), clip_norm=0.0)


def test_the_iaf_guide_scores_its_draws_without_inverting_the_flow(monkeypatch):
    """Each step's IAF caches its own draw: the bound needs no inverse (D sequential passes a step)."""
    from pyro.distributions.transforms import AffineAutoregressive

    model, guide, x, lengths = pair("dmm", rnn=8, iafs=2, iaf_hidden=8)

    def refuse(self, y):
        raise AssertionError("the IAF was inverted")

    monkeypatch.setattr(AffineAutoregressive, "_inverse", refuse)
    assert torch.isfinite(make_objective("elbo", 1, 1).differentiable_loss(model, guide, x, lengths))
