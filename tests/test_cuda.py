"""The GPU path (`--device cuda`): skipped on machines without a CUDA GPU."""

from __future__ import annotations

import json

import pyro
import pytest
import torch

from pyrovae.cli import main
from pyrovae.evaluate import evaluate
from pyrovae.experiment import Config, build, fit
from pyrovae.guides import build_guide
from pyrovae.infer import AmortizedVI, TrainSettings
from pyrovae.models import VAE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SMALL = dict(dataset="digits", hidden=(32,), latent=4, batch_size=100, eval_samples=0, lr=3e-3)


def _steps(device: str, capture: bool, steps: int = 5) -> tuple[list[float], AmortizedVI]:
    pyro.set_rng_seed(0)
    x = torch.bernoulli(torch.full((40, 30), 0.3)).to(device)
    model = VAE((30,), 4, (16,)).to(device)
    guide = build_guide("iaf", model, x, hidden=(16,)).to(device)
    method = AmortizedVI(model, guide, TrainSettings("elbo", 1, 1e-2, 20, capture=capture), len(x))
    pyro.set_rng_seed(3)
    return [float(method.step(x[:20], torch.arange(20, device=device))) for _ in range(steps)], method


def test_captured_training_on_the_gpu_matches_eager_training():
    captured, method = _steps("cuda", True)
    eager, _ = _steps("cuda", False)
    assert any(g is not None for g in method.captured.graphs.values()), method.captured.refused
    assert captured == pytest.approx(eager, rel=1e-4)


def test_training_on_the_gpu_keeps_data_and_parameters_there():
    experiment, metrics = fit(Config(epochs=2, device="cuda", **SMALL), progress=False)
    assert all(p.device.type == "cuda" for p in experiment.model.parameters())
    assert metrics["history"][1]["train_loss"] < metrics["history"][0]["train_loss"]


def test_gpu_evaluation_agrees_with_cpu_evaluation():
    experiment = build(Config(epochs=0, **SMALL))
    x = experiment.split("valid")[:50]
    model, guide = experiment.model, experiment.guide
    cpu = evaluate(model, guide, x, num_samples=4000)
    gpu = evaluate(model.cuda(), guide.cuda(), x.cuda(), num_samples=4000, capture=True)
    assert gpu.log_likelihood.device.type == "cuda"
    # independent draws on the two devices: agreement within the estimators' Monte Carlo error
    assert gpu.log_likelihood.mean().item() == pytest.approx(cpu.log_likelihood.mean().item(), abs=0.2)
    assert gpu.elbo.mean().item() == pytest.approx(cpu.elbo.mean().item(), abs=0.2)


def test_fit_resume_and_evaluate_from_the_command_line_on_the_gpu(tmp_path):
    run = str(tmp_path / "run")
    common = ["--dataset", "digits", "--latent", "4", "--hidden", "32", "--device", "cuda", "--quiet"]
    assert main(["fit", *common, "--epochs", "1", "--eval-samples", "100", "--out", run]) == 0
    assert main(["fit", *common, "--epochs", "2", "--out", run, "--resume"]) == 0  # resuming keeps the run's settings
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["log_likelihood"] >= metrics["elbo"] - 1.0


def test_a_resumed_gpu_run_continues_as_an_uninterrupted_one(tmp_path):
    config = Config(epochs=2, device="cuda", **SMALL)
    straight, _ = fit(config, out=tmp_path / "straight", progress=False)
    fit(Config(epochs=1, device="cuda", **SMALL), out=tmp_path / "resumed", progress=False)
    resumed, _ = fit(config, out=tmp_path / "resumed", resume=True, progress=False)
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
