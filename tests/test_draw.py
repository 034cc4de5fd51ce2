"""DRAW (Gregor et al. 2015): the Gaussian filterbanks read a known crop and write its adjoint,
the bounds against a closed form, gradients reach every parameter, the command line and its
refusals."""

import json

import pyro
import pytest
import torch
from test_user_cli import run_cli

from pyrovae.errors import PyrovaeError
from pyrovae.evaluate import evaluate
from pyrovae.guides import build_guide
from pyrovae.models.draw import DRAW, Filterbank, filterbank
from pyrovae.objectives import make_objective


def grid(side: int, n: int, row: float, column: float, stride: float, variance: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """F_X, F_Y of a grid centred at pixel (row, column) (1-based) with the given stride."""
    bank = Filterbank(4, side, n)
    to_g = lambda pixel: torch.tensor(2 * pixel / (side + 1) - 1)  # noqa: E731
    log_stride = torch.log(torch.tensor(stride * max(n - 1, 1) / (side - 1)))
    return bank.place(to_g(column), to_g(row), torch.log(torch.tensor(variance)), log_stride)


def test_filters_are_gaussians_normalized_over_the_pixels():
    center, stride, variance = torch.tensor(4.3), torch.tensor(1.7), torch.tensor(2.5)
    bank = filterbank(center, stride, variance, 3, 9)
    for i in range(3):
        mean = 4.3 + (i + 1 - 3 / 2 - 0.5) * 1.7  # Gregor et al. eq. 19, i from 1
        expected = torch.exp(-((torch.arange(1, 10) - mean) ** 2) / (2 * 2.5))
        assert torch.allclose(bank[i], expected / expected.sum(), atol=1e-6)


def test_read_with_sharp_filters_at_stride_one_is_a_crop():
    image = torch.randn(10, 10)
    fx, fy = grid(10, 3, row=5, column=7, stride=1.0)  # rows 4..6, columns 6..8 (1-based)
    assert torch.allclose(fy @ image @ fx.T, image[3:6, 5:8], atol=1e-5)
    fx, fy = grid(10, 2, row=4.5, column=4.5, stride=4.0, variance=0.05)  # at pixels 2.5 and 6.5: the mean of two pixels each
    blurred = fy @ image @ fx.T
    assert torch.allclose(blurred[0, 0], image[1:3, 1:3].mean(), atol=1e-2) and torch.allclose(blurred[1, 1], image[5:7, 5:7].mean(), atol=1e-2)


def test_write_is_the_adjoint_of_read():
    """<read(x), w> = gamma^2 <x, write(w)>: write places a patch where read takes it from."""
    torch.manual_seed(0)
    bank = Filterbank(6, 9, 4)
    h, x, w = torch.randn(3, 6), torch.randn(3, 81), torch.randn(3, 16)
    (_, _), gamma = bank.filters(h)
    left = (bank.read(x, h) * w).sum(-1)
    right = gamma**2 * (x * bank.write(w, h)).sum(-1)
    assert torch.allclose(left, right, rtol=1e-4, atol=1e-5)


def small(read: int = 2, write: int = 3, steps: int = 3):
    pyro.set_rng_seed(0)
    x = torch.bernoulli(torch.full((6, 64), 0.3))
    model = DRAW((64,), latent=2, steps=steps, state=8, read=read, write=write)
    model.init_from_data(x)
    return model, build_guide("draw", model, x), x


@torch.no_grad()
def test_a_decoder_free_of_z_gives_the_exact_evidence():
    """With nothing written, p(x) is the Bernoulli of the blank canvas whatever z is: IS converges
    to it (for a guide near the prior, so that the weights' tails are light), and the ELBO lies
    below by KL(q || p)."""
    model, guide, x = small()
    model.patch.weight.zero_(), model.patch.bias.zero_()
    guide.posterior.weight.mul_(0.2), guide.posterior.bias.mul_(0.2)
    exact = torch.distributions.Bernoulli(logits=model.canvas_0).log_prob(x).sum(-1)
    result = evaluate(model, guide, x, num_samples=4000)
    assert torch.allclose(result.log_likelihood, exact, atol=0.02)
    assert (result.elbo < exact - 1e-3).all()


@pytest.mark.parametrize("read, write", [(2, 3), (0, 0)])
@torch.no_grad()
def test_the_elbo_bounds_the_importance_sampled_evidence(read, write):
    """On average over 300 repetitions: ELBO <= IS-2 <= IS-200 per example (Burda et al. 2016, thm. 1)."""
    model, guide, x = small(read, write)
    pyro.set_rng_seed(1)
    repeated = x.repeat(300, 1)
    few = evaluate(model, guide, repeated, num_samples=2)
    elbo, two = few.elbo.reshape(300, -1).mean(0), few.log_likelihood.reshape(300, -1).mean(0)
    many = evaluate(model, guide, x, num_samples=200).log_likelihood
    assert (elbo < two).all() and (two < many).all()


@pytest.mark.parametrize("read, write", [(2, 3), (0, 0)])
def test_the_bounds_gradient_reaches_every_parameter(read, write):
    model, guide, x = small(read, write)
    make_objective("elbo", 2, 1).differentiable_loss(model, guide, x).backward()
    for module in (model, guide):
        for name, parameter in module.named_parameters():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@torch.no_grad()
def test_the_canvases_end_at_the_likelihoods_mean():
    model, guide, x = small()
    guide_trace = pyro.poutine.trace(guide).get_trace(x)
    model_trace = pyro.poutine.trace(pyro.poutine.replay(model, trace=guide_trace)).get_trace(x)
    canvases = model.canvases({name: site["value"] for name, site in guide_trace.nodes.items() if site["type"] == "sample"})
    assert canvases.shape == (3, 6, 64)
    assert torch.allclose(canvases[-1], model_trace.nodes["x"]["fn"].mean)


@pytest.mark.parametrize("options, message", [
    ({"read": 9}, "does not fit"), ({"steps": 0}, "positive"), ({"write": -1}, "positive"),
])
def test_bad_sizes_are_refused(options, message):
    with pytest.raises(PyrovaeError, match=message):
        DRAW((64,), **{"latent": 2, "state": 4, **options})
    with pytest.raises(PyrovaeError, match="square"):
        DRAW((60,))


def test_fit_and_evaluate_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    options = ["--model-option", "steps=3", "--model-option", "state=16", "--model-option", "read=2", "--model-option", "write=3"]
    result = run_cli("fit", "--model", "draw", "--guide", "draw", "--dataset", "digits", "--latent", "4", *options, "--epochs", "1",
                     "--eval-samples", "5", "--quiet", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert (out / "canvases.png").is_file() and (out / "samples.png").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["log_likelihood"] >= metrics["elbo"] - 0.5
    scored = run_cli("evaluate", str(out), "--samples", "5", "--json")
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["log_likelihood"] < 0
    refused = run_cli("fit", "--model", "draw", "--guide", "draw", "--dataset", "digits", "--model-option", "read=20", "--out", str(tmp_path / "bad"))
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()



@pytest.mark.parametrize("side, n", [(28, 5), (28, 2), (8, 3)])
def test_a_write_grid_starts_at_unit_gain_over_the_whole_image(side, n):
    """At initialization (h = 0: the biases), a patch of ones writes one logit on the average pixel
    and within a factor of 5 of one on every pixel inside the grid's span: at gamma = 1 it
    would be ~1 / stride^2 (0.02 at 28 x 28, 5 x 5), and training would stall at the blank canvas."""
    bank = Filterbank(4, side, n, writes=True)
    written = bank.write(torch.ones(1, n * n), torch.zeros(1, 4)).reshape(side, side)
    inner = written[side // 4 : side - side // 4, side // 4 : side - side // 4]
    assert torch.isclose(written.mean(), torch.tensor(1.0), atol=1e-4)
    assert 0.2 < inner.min() and inner.max() < 5.0
