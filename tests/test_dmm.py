"""A deep Markov model written like Pyro's examples/dmm.py (tests/programs/dmm.py) runs unmodified:
padding adds nothing to its bounds, and it trains and is scored from the command line."""

import json
import math
import sys
from pathlib import Path

import pyro
import pytest
import torch
from test_user_cli import run_cli

from pyrovae.batch import Batch
from pyrovae.data import load_dataset
from pyrovae.evaluate import evaluate

PROGRAMS = Path(__file__).parent / "programs"
sys.path.insert(0, str(PROGRAMS))
from dmm import DMM, reverse  # noqa: E402

DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data")


@pytest.fixture(scope="module")
def chorales():
    data = load_dataset("jsb-chorales", data_dir=DATA).with_fields("x,mask,lengths")
    return data.batch("valid", torch.arange(3)).args


def test_padding_adds_nothing_to_the_bound_of_a_sequence(chorales):
    """The same sequence padded to the longest chorale and cut to its length: the same draws
    (the padded steps come last), so the ELBO and IS log p(x) agree to rounding."""
    x, mask, lengths = chorales
    torch.manual_seed(0)
    dmm = DMM(x.shape[1:])
    for i in range(len(x)):
        length = int(lengths[i])
        assert length < x.shape[1]
        padded = Batch((x[i : i + 1], mask[i : i + 1], lengths[i : i + 1]), {}, reverse)
        cut = Batch((x[i : i + 1, :length], mask[i : i + 1, :length], lengths[i : i + 1]), {}, reverse)
        pyro.set_rng_seed(i)
        a = evaluate(dmm.model, dmm.guide, padded, num_samples=6)
        pyro.set_rng_seed(i)
        b = evaluate(dmm.model, dmm.guide, cut, num_samples=6)
        assert torch.allclose(a.elbo, b.elbo, rtol=1e-5) and torch.allclose(a.log_likelihood, b.log_likelihood, rtol=1e-5), (i, a.elbo, b.elbo)


def test_the_dmm_script_trains_and_is_evaluated_from_the_command_line(tmp_path):
    script, out = PROGRAMS / "dmm.py", tmp_path / "dmm"
    done = run_cli("fit", "--model", f"{script}:DMM.model", "--guide", f"{script}:DMM.guide", "--collate", f"{script}:reverse",
                   "--dataset", "jsb-chorales", "--data-dir", DATA, "--fields", "x,mask,lengths", "--epochs", "2", "--batch-size", "32",
                   "--lr", "0.01", "--eval-samples", "4", "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["history"][-1]["train_loss"] < metrics["history"][0]["train_loss"]
    done = run_cli("evaluate", str(out), "--samples", "4", "--json")
    assert done.returncode == 0, done.stderr
    scored = json.loads(done.stdout)
    assert scored["examples"] == 76 and math.isfinite(scored["log_likelihood"]) and scored["log_likelihood"] >= scored["elbo"] - 1e-3
    assert scored["log_likelihood"] < 0  # binary piano rolls: a probability, at most 1


def test_a_mask_varying_within_an_event_is_refused_in_one_line():
    import pyro.distributions as dist

    from pyrovae.errors import PyrovaeError

    half = torch.tensor([True, False])

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(len(x), 2), 1.0).mask(half).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(torch.zeros(len(x), 2), 1.0).to_event(1))

    with pytest.raises(PyrovaeError, match="masks part of its event") as error:
        evaluate(model, guide, torch.randn(4, 2), num_samples=3)
    assert "\n" not in str(error.value)
