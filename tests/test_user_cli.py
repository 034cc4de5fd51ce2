"""A user's own Pyro script on the command line: fit, evaluate, sample, compare and resume it."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import textwrap
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from test_cli import run_cli as run_process

from pyrovae.cli import main
from pyrovae.data import load_dataset
from pyrovae.experiment import load


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`pyrovae ARGS` in this process (a subprocess costs seconds of imports); as `run_process` answers."""
    out, err, before = io.StringIO(), io.StringIO(), os.getcwd()
    try:
        os.chdir(cwd or before)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        os.chdir(before)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())

M2 = Path(__file__).parent / "programs" / "ss_m2.py"

PPCA = textwrap.dedent(
    """
    import pyro, pyro.distributions as dist, torch
    from torch import nn

    class PPCA(nn.Module):
        '''Probabilistic PCA with its own site names and a plate called "rows".'''

        def __init__(self, data_shape, latent=2):
            super().__init__()
            self.loadings = nn.Linear(latent, data_shape[0])
            self.latent = latent

        def forward(self, x):
            pyro.module("ppca", self)
            with pyro.plate("rows", len(x)):
                code = pyro.sample("code", dist.Normal(x.new_zeros(len(x), self.latent), 1.0).to_event(1))
                pyro.sample("pixels", dist.Normal(self.loadings(code), 0.5).to_event(1), obs=x)
    """
)


# every digits example carries its label, so no y is left to enumerate, as Pyro rightly notes
@pytest.mark.filterwarnings("ignore:TraceEnum_ELBO found no sample sites configured for enumeration")
def test_a_semi_supervised_script_trains_evaluates_and_samples_from_the_command_line(tmp_path):
    out = tmp_path / "m2"
    done = run_process("fit", "--model", f"{M2}:SSVAE", "--guide", f"{M2}:make_guide", "--objective", "elbo-enum", "--dataset", "digits",
                       "--fields", "x,y", "--epochs", "1", "--eval-samples", "20", "--out", str(out), "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == f"{M2.resolve()}:SSVAE" and config["fields"] == "x,y"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run_process("evaluate", str(out), "--samples", "50", "--json", cwd=elsewhere)  # the script is found from where it is
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout)
    assert metrics["examples"] == 300 and math.isfinite(metrics["log_likelihood"]) and metrics["gap"] > -0.1
    done = run_cli("sample", str(out), "--num", "16", cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    assert (out / "samples.png").read_bytes()[:4] == b"\x89PNG"
    done = run_cli("fit", "--model", f"{M2}:SSVAE", "--guide", f"{M2}:make_guide", "--objective", "elbo-enum", "--dataset", "digits",
                   "--fields", "x,y", "--epochs", "2", "--eval-samples", "0", "--out", str(out), "--resume", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 2


def test_a_script_taking_no_label_for_unlabelled_examples_trains_semi_supervised(tmp_path):
    """``model(xs, ys=None)`` on digits with 50 labels: ``--unlabelled omit`` calls it on the
    unlabelled examples without ys (y enumerated by its guide), on the labelled ones with them."""
    out = tmp_path / "semi"
    flags = ["--model", f"{M2}:SSVAE", "--guide", f"{M2}:make_guide", "--objective", "elbo-enum", "--dataset", "digits",
             "--data-option", "labels=50", "--fields", "x,y", "--quiet"]
    done = run_cli("fit", *flags, "--epochs", "1", "--eval-samples", "0", "--out", str(tmp_path / "no"))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1  # without it the script gets -1 as a label
    done = run_cli("fit", *flags, "--unlabelled", "omit", "--labelled-per-batch", "10", "--epochs", "2", "--eval-samples", "20", "--out", str(out))
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["history"][1]["train_loss"] < metrics["history"][0]["train_loss"] and metrics["log_likelihood"] >= metrics["elbo"] - 0.5
    assert json.loads((out / "config.json").read_text())["unlabelled"] == "omit"
    done = run_cli("evaluate", str(out), "--split", "train", "--samples", "10", "--json")  # 50 labelled examples and the rest, one score each
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["examples"] == len(load_dataset("digits", labels=50).split("train"))
    done = run_cli("evaluate", str(out), "--split", "test", "--samples", "10", "--json")
    assert done.returncode == 0, done.stderr
    run = load(str(out))  # the classifier is the guide's q(y|x) on the call without ys: the script's encoder_y
    test = run.data.split("test")
    expected = (run.model.encoder_y(test.x.float()).argmax(-1) != test.y).float().mean().item()
    assert math.isclose(json.loads(done.stdout)["classification_error"], expected, abs_tol=1e-6)
    done = run_cli("fit", *flags, "--unlabelled", "omit", "--labelled-per-batch", "10", "--epochs", "3", "--eval-samples", "0", "--out", str(out), "--resume")
    assert done.returncode == 0, done.stderr
    for bad, why in ((["--method", "local"], "--method amortized"), (["--fields", "x"], "--fields x,y"), (["--fields", "y,x"], "last data field")):
        done = run_cli("fit", *flags, "--unlabelled", "omit", *bad, "--epochs", "1", "--out", str(tmp_path / "bad"))
        assert done.returncode == 2 and why in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert not (tmp_path / "bad").exists()


def test_compare_trains_the_users_guide_and_scores_discrete_latents_by_it(tmp_path):
    done = run_cli("compare", "--model", f"{M2}:SSVAE", "--guide", f"{M2}:make_guide", "--objective", "elbo-enum", "--dataset", "digits",
                   "--methods", "amortized,wake-sleep:variant=rws,local", "--steps", "3", "--eval-examples", "10", "--samples", "10",
                   "--out", str(tmp_path / "cmp"), "--json")
    assert done.returncode == 2 and "is discrete" in done.stderr and len(done.stderr.strip().splitlines()) == 1  # local cannot serve y
    done = run_cli("compare", "--model", f"{M2}:SSVAE", "--guide", f"{M2}:make_guide", "--objective", "elbo-enum", "--dataset", "digits",
                   "--methods", "amortized,wake-sleep:variant=rws", "--steps", "3", "--eval-examples", "10", "--samples", "10",
                   "--out", str(tmp_path / "cmp"), "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [r["method"] for r in rows] == ["amortized", "wake-sleep:variant=rws"]
    assert all(r["heldout_ll"] is None and math.isfinite(r["heldout_ll_amortized"]) for r in rows)


def test_a_users_model_takes_every_method_and_a_registered_guide(tmp_path):
    script = tmp_path / "ppca.py"
    script.write_text(PPCA)
    for method in ("amortized", "local", "mcmc-em"):
        out = tmp_path / method
        done = run_cli("fit", "--model", f"{script}:PPCA", "--guide", "diagonal", "--method", method, "--dataset", "digits",
                       "--data-option", "binarize=false", "--epochs", "1", "--eval-samples", "10", "--hidden", "16", "--out", str(out), "--quiet")
        assert done.returncode == 0, (method, done.stderr)
        metrics = json.loads((out / "metrics.json").read_text())
        assert math.isfinite(metrics["log_likelihood"]) and metrics["log_likelihood"] >= metrics["elbo"] - 0.5, (method, metrics)


def test_bad_user_programs_are_refused_in_one_line(tmp_path):
    script = tmp_path / "ppca.py"
    script.write_text(PPCA)
    cases = [(f"{tmp_path}/missing.py:VAE", "no such file"), (f"{script}:PCA", "PPCA"), (f"{script}:PPCA", "'z'")]
    for spec, expected in cases[:2]:
        done = run_cli("fit", "--model", spec, "--dataset", "digits", "--epochs", "1", "--out", str(tmp_path / "bad"), "--quiet")
        assert done.returncode == 2 and expected in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert not (tmp_path / "bad").exists()
    done = run_cli("fit", "--model", f"{script}:PPCA", "--plate", "data", "--dataset", "digits", "--epochs", "1", "--out", str(tmp_path / "bad"), "--quiet")
    assert done.returncode == 2 and "no plate named 'data'" in done.stderr and not (tmp_path / "bad").exists(), done.stderr


VAE_STYLE = textwrap.dedent(
    """
    import pyro, pyro.distributions as dist, torch
    from torch import nn

    class VAE(nn.Module):
        '''Written as Pyro's examples/vae/vae.py writes it: model and guide are methods.'''

        def __init__(self, z_dim=4, hidden_dim=32):
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(64, hidden_dim), nn.Softplus(), nn.Linear(hidden_dim, 2 * z_dim))
            self.decoder = nn.Sequential(nn.Linear(z_dim, hidden_dim), nn.Softplus(), nn.Linear(hidden_dim, 64), nn.Sigmoid())
            self.z_dim = z_dim

        def model(self, x):
            pyro.module("decoder", self.decoder)
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("latent", dist.Normal(x.new_zeros(x.shape[0], self.z_dim), 1.0).to_event(1))
                pyro.sample("obs", dist.Bernoulli(self.decoder(z), validate_args=False).to_event(1), obs=x.reshape(-1, 64))

        def guide(self, x):
            pyro.module("encoder", self.encoder)
            with pyro.plate("data", x.shape[0]):
                loc, raw = self.encoder(x).chunk(2, -1)
                pyro.sample("latent", dist.Normal(loc, torch.exp(raw)).to_event(1))
    """
)


def test_model_and_guide_named_as_methods_of_one_class_share_its_instance(tmp_path):
    script = tmp_path / "vae.py"
    script.write_text(VAE_STYLE)
    out = tmp_path / "run"
    done = run_cli("fit", "--model", f"{script}:VAE.model", "--guide", f"{script}:VAE.guide", "--dataset", "digits", "--epochs", "3",
                   "--lr", "0.01", "--eval-samples", "50", "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["history"]
    assert rows[-1]["valid_elbo"] > rows[0]["valid_elbo"] + 1.0  # one instance: its trained encoder is the guide scored
    assert metrics["log_likelihood"] >= metrics["elbo"] - 0.05


REVERSED = textwrap.dedent(
    """
    import pyro, pyro.distributions as dist, torch
    from torch import nn

    def reverse(args, kwargs):
        '''Derived arguments, as a DMM's packed reversed sequences: built from each sliced batch.'''
        (x,) = args
        return (x,), {"x_reversed": x.flip(-1)}

    class Reader(nn.Module):
        def __init__(self, data_shape):
            super().__init__()
            self.decoder = nn.Linear(2, data_shape[0])

        def forward(self, x, x_reversed):
            assert torch.equal(x_reversed, x.flip(-1)), "collate was not applied to this batch"
            pyro.module("reader", self)
            with pyro.plate("data", len(x)):
                z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), 2), 1.0).to_event(1))
                pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)
    """
)


def test_a_collate_builds_derived_arguments_for_every_batch_and_chunk(tmp_path):
    script = tmp_path / "reader.py"
    script.write_text(REVERSED)
    out = tmp_path / "run"
    done = run_cli("fit", "--model", f"{script}:Reader", "--collate", f"{script}:reverse", "--dataset", "digits", "--epochs", "1",
                   "--batch-size", "64", "--eval-samples", "30", "--hidden", "16", "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "config.json").read_text())["collate"] == f"{script.resolve()}:reverse"
    done = run_cli("evaluate", str(out), "--samples", "10", "--json")
    assert done.returncode == 0, done.stderr
    assert math.isfinite(json.loads(done.stdout)["log_likelihood"])


GLOBAL = textwrap.dedent(
    """
    import pyro, pyro.distributions as dist, torch

    def model(x):
        mean = pyro.sample("mean", dist.Normal(torch.zeros(x.shape[1]), 1.0).to_event(1))  # one for the whole data set
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mean, 1.0).to_event(1), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.zeros(x.shape[1]))
        scale = pyro.param("scale", torch.ones(x.shape[1]), constraint=dist.constraints.positive)
        pyro.sample("mean", dist.Normal(loc, scale).to_event(1))
    """
)


def test_a_model_with_a_global_latent_reports_the_data_sets_elbo_and_refuses_log_px(tmp_path):
    script = tmp_path / "global.py"
    script.write_text(GLOBAL)
    out = tmp_path / "run"
    done = run_cli("fit", "--model", f"{script}:model", "--guide", f"{script}:guide", "--dataset", "digits", "--epochs", "2",
                   "--lr", "0.05", "--eval-samples", "20", "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["log_likelihood"] is None and "global latent" in metrics["log_likelihood_refused"]  # no per-example score exists
    assert metrics["history"][-1]["train_loss"] < metrics["history"][0]["train_loss"]
    done = run_cli("evaluate", str(out), "--samples", "50", "--json")
    assert done.returncode == 0, done.stderr
    scored = json.loads(done.stdout)
    # the closed form: each pixel's column of the split is N(0, I + 11^T) under the prior mean ~ N(0, 1)
    x = load_dataset("digits").batch("valid", torch.arange(300))
    exact = dist.MultivariateNormal(torch.zeros(300), torch.eye(300) + torch.ones(300, 300)).log_prob(x.T).sum().item() / 300
    assert scored["log_likelihood"] is None and scored["examples"] == 300 and scored["num_samples"] == 50
    assert scored["elbo"] < exact + 4 * scored["elbo_stderr"], (scored, exact)  # a bound
    load(out)  # the trained q(mean) = N(loc, scale^2) back in the param store: the ELBO in closed form
    loc, scale = pyro.param("loc").detach(), pyro.param("scale").detach()
    expected_likelihood = (-0.5 * math.log(2 * math.pi) - 0.5 * ((x - loc) ** 2 + scale**2)).sum()
    kl = (0.5 * (loc**2 + scale**2 - 1) - scale.log()).sum()
    closed = (expected_likelihood - kl).item() / 300
    assert abs(scored["elbo"] - closed) < 4 * scored["elbo_stderr"] + 1e-4, (scored["elbo"], closed, scored["elbo_stderr"])
    assert abs(scored["elbo"] - metrics["elbo"]) < 4 * (scored["elbo_stderr"] + metrics["elbo_stderr"])
    done = run_cli("evaluate", str(out), "--samples", "10")
    assert done.returncode == 0 and "not reported: global latent(s) 'mean'" in done.stdout, done.stdout
    done = run_cli("evaluate", str(out), "--estimator", "ais", "--ais-steps", "5")
    assert done.returncode == 2 and "global latent" in done.stderr and len(done.stderr.strip().splitlines()) == 1
