"""Data-parallel training on 2 CPU processes (gloo): the gradients and parameters of one process
at twice the batch, exact resume, sharded state, and failures that stop every rank in one line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyrovae import distributed
from pyrovae.distributed import GradientAverager, Group, shard, split_examples
from pyrovae.errors import PyrovaeError
from pyrovae.experiment import Config, fit
from pyrovae.launch import _free_port
from pyrovae.run import RunDir

DIGITS = ["--dataset", "digits", "--hidden", "16", "--latent", "3", "--eval-samples", "0", "--log", "none", "--lr", "0.01"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "pyrovae", *args], capture_output=True, text=True, env=env, timeout=300)


def test_shares_are_contiguous_disjoint_cover_the_batch_and_weigh_its_examples():
    for size in (1, 2, 7, 100, 101):
        for ranks in (1, 2, 3, 4):
            shares = shard(size, Group(0, ranks))
            real = [s for s in shares if s.weight > 0]
            covered = [i for s in real for i in range(s.part.start, s.part.stop)]
            assert covered == list(range(size))
            assert sum(s.weight for s in shares) == pytest.approx(1.0)
            assert max(s.part.stop - s.part.start for s in real) - min(s.part.stop - s.part.start for s in real) <= 1
            assert all(s.part == slice(0, 1) for s in shares if s.weight == 0)  # a stand-in example, weighted 0
    assert [split_examples(5, Group(r, 2)) for r in range(2)] == [slice(0, 3), slice(3, 5)]


def _averaging_worker(rank: int, port: int) -> None:
    """Rank `rank` of 2 steps on its share of 7 examples; the averaged gradients must be those
    of one process on all 7: dense, sparse (rows), one tensor only rank 1 reaches, one none does."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        x, rows = torch.randn(7, 3), torch.tensor([4, 0, 9, 2, 2, 7, 5])
        w, only, unused = (torch.nn.Parameter(torch.randn(3)) for _ in range(3))
        table = torch.nn.Embedding(10, 2, sparse=True)

        def loss(part: slice) -> torch.Tensor:
            picked = torch.arange(7)[part]
            terms = (x[part] @ w).sin() + table(rows[part]).pow(2).sum(-1) * (x[part, 0] + 1) + only.sum() * (picked >= 4)
            return 70 * terms.mean()  # scaled to a data set of 70 by this part's own size, as every method scales

        loss(slice(0, 7)).backward()
        expected = {"w": w.grad.clone(), "only": only.grad.clone(), "table": table.weight.grad.to_dense()}
        for p in (w, only, table.weight):
            p.grad = None
        group = Group(rank, 2)
        mine = shard(7, group)[rank]
        dense, sparse = torch.optim.Adam([w, only, unused]), torch.optim.SparseAdam(table.parameters())
        averager = GradientAverager([dense, sparse], group)
        seen = {}
        dense.register_step_pre_hook(lambda *_: seen.update(w=w.grad.clone(), only=only.grad.clone(), unused=unused.grad))
        sparse.register_step_pre_hook(lambda *_: seen.update(table=table.weight.grad.to_dense()))
        with averager.installed():
            averager.weight = mine.weight
            loss(mine.part).backward()
            dense.step(), sparse.step()
        for name in expected:
            assert torch.allclose(seen[name], expected[name], atol=1e-5), (rank, name, seen[name], expected[name])
        assert seen["unused"] is None
    finally:
        dist.destroy_process_group()


def test_averaged_gradients_are_those_of_one_process_on_the_whole_minibatch():
    mp.spawn(_averaging_worker, args=(_free_port(),), nprocs=2)


def _weights(path) -> dict[str, torch.Tensor]:
    state = RunDir(path).load_checkpoint()["method"]
    return {f"{part}.{k}": v for part in ("model", "guide", "local") for k, v in state.get(part, {}).items() if torch.is_tensor(v)}


@pytest.fixture(scope="module")
def map_runs(tmp_path_factory):
    """MAP (no noise: the comparison is exact) on 2 ranks at batch 50 and 1 at batch 100, 2 epochs."""
    root = tmp_path_factory.mktemp("map")
    flags = [*DIGITS, "--method", "map", "--epochs", "2"]
    two = run_cli("fit", *flags, "--batch-size", "50", "--nproc", "2", "--out", str(root / "two"))
    assert two.returncode == 0, two.stderr
    fit(Config(dataset="digits", hidden=(16,), latent=3, eval_samples=0, logs="none", lr=0.01, method="map", epochs=2, batch_size=100),
        root / "one", progress=False)
    return root, two


def test_two_ranks_at_batch_b_train_the_parameters_of_one_process_at_2b(map_runs):
    root, two = map_runs
    ranked, single = _weights(root / "two"), _weights(root / "one")
    assert ranked.keys() == single.keys() and any(k.startswith("local.") for k in ranked)  # the per-example points, sparse rows
    for name in single:
        assert torch.allclose(ranked[name], single[name], atol=2e-5), name
    assert RunDir(root / "two").load_checkpoint()["step"] == RunDir(root / "one").load_checkpoint()["step"] == 24  # 1197 examples, 100 a step
    assert two.stdout.count("model / guide") == 1  # rank 0 alone reports


def test_a_data_parallel_run_resumes_exactly_with_the_same_ranks_and_refuses_others(tmp_path):
    flags = [*DIGITS, "--batch-size", "64", "--nproc", "2"]
    straight = run_cli("fit", *flags, "--epochs", "2", "--out", str(tmp_path / "a"))
    first = run_cli("fit", *flags, "--epochs", "1", "--out", str(tmp_path / "b"))
    resumed = run_cli("fit", *flags, "--epochs", "2", "--out", str(tmp_path / "b"), "--resume")
    assert straight.returncode == first.returncode == resumed.returncode == 0, straight.stderr + first.stderr + resumed.stderr
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    checkpoint = RunDir(tmp_path / "a").load_checkpoint()
    assert checkpoint["ranks"] == 2 and not torch.equal(*checkpoint["rank_rng"])  # each rank its own noise
    with pytest.raises(PyrovaeError, match=r"trained by 2 process\(es\): resume it with --nproc 2, not 1"):
        fit(Config(epochs=3), tmp_path / "a", resume=True, progress=False)


def test_mcmc_em_chains_are_sharded_by_example_and_exchanged(tmp_path):
    run = run_cli("fit", *DIGITS, "--method", "mcmc-em", "--method-option", "leapfrog_steps=2", "--batch-size", "100", "--epochs", "1",
                  "--nproc", "2", "--out", str(tmp_path / "m"))
    assert run.returncode == 0, run.stderr
    state = RunDir(tmp_path / "m").load_checkpoint()["method"]
    assert bool((state["transitions"] > 0).all())  # rank 0's copy holds the chains rank 1 moved too
    assert bool((state["chains"].abs().sum(-1) > 0).all())


FAILING = textwrap.dedent(
    """
    import pyro, pyro.distributions as dist, torch, torch.distributed
    from torch import nn

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.decode, self.calls = nn.Linear(2, 64), 0

        def forward(self, x):
            self.calls += 1
            if torch.distributed.get_rank() == 1 and self.calls > 3:
                raise ValueError("rank one gave up")
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))
                pyro.sample("x", dist.Bernoulli(logits=self.decode(z)).to_event(1), obs=x)
    """
)


def test_a_rank_that_fails_stops_the_others_in_one_line(tmp_path):
    script = tmp_path / "failing.py"
    script.write_text(FAILING)
    run = run_cli("fit", "--model", f"{script}:Model", "--eager", *DIGITS, "--batch-size", "20", "--epochs", "5", "--nproc", "2",
                  "--out", str(tmp_path / "f"))
    assert run.returncode == 1
    lines = [line for line in run.stderr.splitlines() if line.startswith("pyrovae: error")]
    assert len(lines) == 1 and "rank 1 of 2 failed" in lines[0] and "rank one gave up" in lines[0], run.stderr
    assert "Traceback" not in run.stderr


def test_bad_nproc_and_stratified_batches_are_refused(tmp_path):
    bad = run_cli("fit", *DIGITS, "--nproc", "0", "--out", str(tmp_path / "z"))
    assert bad.returncode == 2 and "--nproc must be positive" in bad.stderr
    assert not (tmp_path / "z").exists()
    assert distributed.current() is None


LIGHTNING_SCRIPT = os.path.join(os.path.dirname(__file__), "programs", "lightning_ddp.py")


def test_lightning_ddp_on_two_devices_trains_what_pyrovae_fit_nproc_2_trains(map_runs, tmp_path):
    pytest.importorskip("lightning")
    root, _ = map_runs
    out = tmp_path / "lightning.pt"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, LIGHTNING_SCRIPT, str(out), "2", "50", "map", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = torch.load(out)
    assert saved["world_size"] == 2 and saved["steps"] == 24
    state = saved["method"]
    lightning = {f"{part}.{k}": v for part in ("model", "guide", "local") for k, v in state.get(part, {}).items() if torch.is_tensor(v)}
    ranked, single = _weights(root / "two"), _weights(root / "one")
    for name in ranked:
        assert torch.equal(lightning[name], ranked[name]), name  # the same shares, order and averaging as pyrovae fit --nproc 2
        assert torch.allclose(lightning[name], single[name], atol=2e-5), name


def test_the_lightning_checkpoint_carries_the_method_state_and_the_data_order():
    pytest.importorskip("lightning")
    from pyrovae.experiment import Config, build
    from pyrovae.lightning_adapter import PyrovaeModule

    config = Config(dataset="digits", hidden=(16,), latent=3, eval_samples=0, logs="none", method="mcmc-em", epochs=1)
    trained = PyrovaeModule(build(config))
    x = trained.experiment.split("train")[:40]
    trained.method.step(x, torch.arange(40))
    torch.randperm(5, generator=trained.generator)
    checkpoint: dict = {}
    trained.on_save_checkpoint(checkpoint)
    fresh = PyrovaeModule(build(config))
    fresh.on_load_checkpoint(checkpoint)
    assert torch.equal(fresh.method.chains, trained.method.chains) and torch.equal(fresh.generator.get_state(), trained.generator.get_state())
    with pytest.raises(Exception, match="not written by a PyrovaeModule"):
        fresh.on_load_checkpoint({})


STARTS_APART = textwrap.dedent(
    """
    import os
    import pyro, pyro.distributions as dist, torch
    from torch.distributions import constraints

    def model(x):
        start = float(os.environ.get("RANK", "0"))  # each rank would start elsewhere, were rank 0's values not broadcast
        loc = pyro.param("loc", torch.full((x.shape[1],), start))
        scale = pyro.param("noise", torch.ones(()), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(loc, scale).to_event(1), obs=x)

    def guide(x):
        pass
    """
)


def test_every_rank_starts_from_rank_0s_parameters_param_store_included(tmp_path):
    script = tmp_path / "apart.py"
    script.write_text(STARTS_APART)
    flags = dict(model=f"{script}:model", guide=f"{script}:guide", dataset="digits", dataset_options={"binarize": False}, epochs=1, eval_samples=0,
                 logs="none", lr=0.01)
    run = run_cli("fit", "--model", flags["model"], "--guide", flags["guide"], "--dataset", "digits", "--data-option", "binarize=false", "--epochs", "1",
                  "--eval-samples", "0", "--log", "none", "--lr", "0.01", "--batch-size", "50", "--nproc", "2", "--out", str(tmp_path / "two"))
    assert run.returncode == 0, run.stderr
    fit(Config(batch_size=100, **flags), tmp_path / "one", progress=False)
    two, one = (RunDir(tmp_path / name).load_checkpoint()["method"]["param_store"] for name in ("two", "one"))
    for name in ("loc", "noise"):
        assert torch.allclose(two[name], one[name], atol=1e-6), name


def test_more_ranks_than_examples_train_on_stand_ins_and_score_every_example_once(tmp_path):
    rows = tmp_path / "two.npy"
    np.save(rows, np.array([[1, 0, 1, 1, 0, 0], [0, 1, 1, 0, 1, 0]], dtype=np.uint8))
    run = run_cli("fit", "--dataset", str(rows), "--hidden", "4", "--latent", "2", "--epochs", "2", "--eval-samples", "5", "--log", "none",
                  "--method", "map", "--nproc", "3", "--out", str(tmp_path / "r"))
    assert run.returncode == 0, run.stderr
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["examples"] == 2 and math.isfinite(metrics["elbo"]) and RunDir(tmp_path / "r").load_checkpoint()["step"] == 2
    fit(Config(dataset=str(rows), hidden=(4,), latent=2, epochs=2, eval_samples=0, logs="none", method="map", batch_size=300), tmp_path / "one",
        progress=False)
    ranked, single = _weights(tmp_path / "r"), _weights(tmp_path / "one")
    assert all(torch.allclose(ranked[k], single[k], atol=1e-6) for k in single)  # a stand-in's weight is 0


def test_torchrun_trains_the_run_pyrovae_fit_nproc_trains(map_runs, tmp_path):
    root, _ = map_runs
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    flags = [*DIGITS, "--method", "map", "--epochs", "2", "--batch-size", "50", "--out", str(tmp_path / "torchrun")]
    flags.remove("--log"), flags.remove("none")  # torchrun's own parser takes --log for an abbreviation of its flags
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()), "-m", "pyrovae",
                           "fit", *flags], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranked, torchrun = _weights(root / "two"), _weights(tmp_path / "torchrun")
    assert all(torch.equal(ranked[k], torchrun[k]) for k in ranked)
    assert done.stdout.count("model / guide") == 1


@pytest.mark.parametrize("method", ["amortized", "map"])
def test_lightning_on_one_device_trains_and_validates_as_pyrovae_fit(method, tmp_path):
    pytest.importorskip("lightning")
    import lightning.pytorch as pl

    from pyrovae.experiment import build
    from pyrovae.lightning_adapter import PyrovaeModule

    config = Config(dataset="digits", hidden=(16,), latent=3, eval_samples=0, logs="none", lr=0.01, epochs=2, method=method)
    _, metrics = fit(config, tmp_path / "fit", progress=False)
    module = PyrovaeModule(build(config))
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module)
    assert trainer.callback_metrics["valid_elbo"].item() == pytest.approx(metrics["history"][-1]["valid_elbo"], abs=1e-5)
    fitted = _weights(tmp_path / "fit")
    state = module.method.state_dict()
    lightning = {f"{part}.{k}": v for part in ("model", "guide", "local") for k, v in state.get(part, {}).items() if torch.is_tensor(v)}
    assert all(torch.allclose(lightning[k], fitted[k], atol=1e-6) for k in fitted)
