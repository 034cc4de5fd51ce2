"""Live metrics (`pyrovae.logs`): log.csv and TensorBoard rows per epoch that agree with the
run, leave its numbers unchanged, and continue exactly on resume; the KL of each latent site
against its closed form."""

import csv
import importlib.util

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyrovae.cli import main
from pyrovae.diagnostics import kl_per_site
from pyrovae.errors import PyrovaeError
from pyrovae.logs import parse_kinds
from pyrovae.run import RunDir

FAST = ["--dataset", "digits", "--hidden", "16", "--latent", "3", "--eval-samples", "0", "--quiet"]


def rows(run):
    with open(run / "log.csv", newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two epochs without logs and with both; the logged one then killed (as it were) after
    logging a third epoch it never checkpointed, and resumed to three."""
    root = tmp_path_factory.mktemp("logs")
    logs = "csv,tensorboard" if importlib.util.find_spec("tensorboard") else "csv"
    assert main(["fit", *FAST, "--epochs", "2", "--out", str(root / "quiet"), "--log", "none"]) == 0
    assert main(["fit", *FAST, "--epochs", "2", "--out", str(root / "logged"), "--log", logs]) == 0
    two = {"checkpoint": RunDir(root / "logged").load_checkpoint(), "rows": rows(root / "logged")}
    with open(root / "logged" / "log.csv", "a", newline="") as file:
        csv.DictWriter(file, fieldnames=list(two["rows"][0])).writerow({**two["rows"][-1], "epoch": 3, "train_loss": 999.0})
    assert main(["fit", *FAST, "--epochs", "3", "--out", str(root / "logged"), "--resume"]) == 0
    return root, two


def test_log_csv_has_a_row_per_epoch_that_agrees_with_the_checkpoint(runs):
    root, two = runs
    logged, history = rows(root / "logged"), RunDir(root / "logged").load_checkpoint()["history"]
    assert [int(r["epoch"]) for r in logged] == [1, 2, 3]
    for row, epoch in zip(logged, history):
        assert float(row["train_loss"]) == pytest.approx(epoch["train_loss"]) and float(row["valid_elbo"]) == pytest.approx(epoch["valid_elbo"])
        assert float(row["lr"]) == 1e-3 and float(row["examples_per_second"]) > 0
        assert float(row["kl.z"]) > 0 and 0 <= int(row["active_units.z"]) <= 3
    assert float(logged[-1]["elapsed_seconds"]) == pytest.approx(sum(e["seconds"] for e in history))
    assert logged[:2] == two["rows"], "resume rewrote the rows before its checkpoint"  # and dropped the 999.0 row


def test_logging_does_not_change_the_run(runs):
    root, two = runs
    quiet = RunDir(root / "quiet").load_checkpoint()
    assert not (root / "quiet" / "log.csv").exists() and not (root / "quiet" / "tensorboard").exists()
    assert quiet["history"][-1]["train_loss"] == two["checkpoint"]["history"][-1]["train_loss"]
    for name, tensor in quiet["method"]["model"].items():
        assert torch.equal(tensor, two["checkpoint"]["method"]["model"][name]), name


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="the tensorboard extra is not installed")
def test_tensorboard_gets_the_scalars_and_the_sample_grid_and_resumes_without_duplicates(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = runs[0] / "logged"
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert {"train_loss", "valid_elbo", "kl/z", "active_units/z", "lr"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train_loss")] == [1, 2, 3]
    assert [e.value for e in events.Scalars("train_loss")] == pytest.approx([float(r["train_loss"]) for r in rows(run)])
    assert [e.step for e in events.Images("samples")] == [1, 2, 3]


def test_tensorboard_asked_for_without_its_package_is_refused(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert main(["fit", *FAST, "--epochs", "1", "--out", str(tmp_path / "a"), "--log", "tensorboard"]) == 2
    assert "pip install 'pyrovae[tensorboard]'" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert parse_kinds("csv,tensorboard", explicit=False) == ("csv",)  # the default leaves it out
    with pytest.raises(PyrovaeError, match="unknown --log 'cvs'"):
        parse_kinds("cvs")


def test_kl_per_site_matches_the_closed_form():
    pyro.set_rng_seed(0)
    net = nn.Linear(4, 6)

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
            w = pyro.sample("w", dist.Normal(z[..., 0], 2.0))
            pyro.sample("x", dist.Normal(torch.cat([z, (z[..., 0] + w).unsqueeze(-1)], -1), 1.0).to_event(1), obs=x)

    def guide(x):
        loc, log_scale = net(x).split(3, -1)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))
            pyro.sample("w", dist.Normal(z[..., 0] + 1.0, 0.5))

    x = torch.randn(20000, 4)
    kl = kl_per_site(model, guide, x)
    loc, log_scale = net(x).split(3, -1)
    exact_z = torch.distributions.kl_divergence(dist.Normal(loc, log_scale.exp()), dist.Normal(0.0, 1.0)).sum(-1).mean()
    exact_w = torch.distributions.kl_divergence(dist.Normal(1.0, 0.5), dist.Normal(0.0, 2.0))  # w - z_0 has the same KL for any z_0
    assert kl["z"] == pytest.approx(exact_z.item(), abs=0.03) and kl["w"] == pytest.approx(exact_w.item(), abs=0.03)
    assert set(kl) == {"z", "w"}
