"""The command line end to end on digits, and every bad input refused cleanly."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pyrovae.cli import main

FAST = ["--hidden", "32", "--latent", "4", "--quiet"]


def run_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "pyrovae", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_gaps_of_a_flow_run_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "iaf"
    assert main(["fit", "--dataset", "digits", "--guide", "iaf", "--guide-option", "flow_steps=1", "--epochs", "1", "--eval-samples", "0",
                 "--out", str(out), *FAST]) == 0
    capsys.readouterr()
    assert main(["compare", "--gaps", str(out), "--eval-examples", "3", "--proposal-steps", "10", "--samples", "50", "--json"]) == 0
    gaps = json.loads(capsys.readouterr().out)
    assert gaps["guide"] == "iaf" and gaps["qstar"] == "guide fine-tuned per example" and gaps["examples"] == 3
    assert abs(gaps["approximation_gap"] + gaps["amortization_gap"] - gaps["total_gap"]) < 1e-4
    assert json.loads((out / "gaps.json").read_text()) == gaps
    assert main(["compare", "--gaps", str(out), "--eval-examples", "3", "--proposal-steps", "10", "--samples", "50"]) == 0
    table = capsys.readouterr().out
    assert "amortization gap" in table and "±" in table and "{" not in table  # a table, not a key dump


def test_options_take_json_and_python_literals():
    from pyrovae.cli import _option

    assert _option("stable=False") == ("stable", False) and _option("stable=false") == ("stable", False)
    assert _option("context-size=None") == ("context_size", None)
    assert _option("flow_hidden=[100, 100]") == ("flow_hidden", [100, 100])
    assert _option("variant=rws") == ("variant", "rws")


def test_fit_evaluate_sample_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    done = run_cli("fit", "--dataset", "digits", "--epochs", "3", "--eval-samples", "50", "--out", str(out), *FAST[:-1])
    assert done.returncode == 0, done.stderr
    assert "log p(x), IS-50" in done.stdout
    # off a terminal, one line per epoch and one before the final scoring (none with --quiet: the resume below)
    lines = [line for line in done.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"] and all("valid ELBO" in line and "examples/s" in line for line in lines), done.stdout
    assert "scoring the valid split (IS-50)" in done.stdout and done.stdout.startswith("loading digits and building vae / diagonal / amortized")
    for name in ("config.json", "checkpoint.pt", "metrics.json", "log.csv", "samples.png", "reconstructions.png", "training.png", "latents.png", "interpolations.png"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("model", "guide", "method", "objective", "dataset", "split", "examples", "elbo", "log_likelihood",
                "num_samples", "epochs", "train_seconds", "examples_per_second"):
        assert key in metrics, key
    assert metrics["split"] == "valid" and metrics["examples"] == 300 and metrics["epochs"] == 3
    assert metrics["log_likelihood"] >= metrics["elbo"] - 0.05

    # the rest in this process (the console script itself is tested above and in test_console_script_and_module_agree)
    assert main(["evaluate", str(out), "--split", "valid", "--samples", "100", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["num_samples"] == 100 and scored["examples"] == 300
    assert abs(scored["log_likelihood"] - metrics["log_likelihood"]) < 1.0
    # the ELBO agrees with Pyro's Trace_ELBO on the reloaded run within Monte Carlo error, and
    # log p(x) of binary data lies above it by a small gap and below 0
    reference, error = _trace_elbo(out, "valid")
    assert abs(scored["elbo"] - reference) < 4 * error + 1e-3, (scored["elbo"], reference, error)
    assert scored["elbo"] < scored["log_likelihood"] < min(0.0, scored["elbo"] + 5.0), scored

    assert main(["evaluate", str(out), "--estimator", "ais", "--ais-steps", "100", "--chains", "4", "--leapfrog", "3", "--bdmc", "5", "--json"]) == 0
    annealed = json.loads(capsys.readouterr().out)
    assert annealed["estimator"] == "ais" and annealed["examples"] == 300 and annealed["ais_steps"] == 100 and annealed["chains"] == 4
    # a lower bound on log p(x) as IS is: the two agree within their Monte Carlo errors on this small latent space
    assert abs(annealed["log_likelihood"] - scored["log_likelihood"]) < 0.3 + 4 * annealed["stderr"], (annealed, scored)
    assert annealed["bdmc_examples"] == 5 and 0 <= annealed["bdmc_width"] + 0.1 < 1.0 and (out / "eval-valid-ais-100x4.json").exists()
    for bad in (["--estimator", "ais", "--ais-steps", "0"], ["--bdmc", "3"], ["--estimator", "ais", "--chains", "-1"]):
        assert main(["evaluate", str(out), *bad]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("pyrovae: error: --"), (bad, err)

    assert main(["sample", str(out), "--num", "16", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0

    capsys.readouterr()
    assert main(["fit", "--epochs", "5", "--out", str(out), "--resume", *FAST]) == 0
    assert not any(line.startswith(("epoch ", "loading ", "ready ")) for line in capsys.readouterr().out.splitlines())  # --quiet
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 5


def _trace_elbo(run: Path, split: str, repeats: int = 20) -> tuple[float, float]:
    """ELBO per example of a saved run by Pyro's Trace_ELBO, and the standard error of the figure
    `pyrovae evaluate --samples 100` gives (repeats of one draw per example estimate the spread)."""
    import pyro
    import torch

    from pyrovae.experiment import load

    experiment = load(run)
    experiment.model.eval(), experiment.guide.eval()
    x = experiment.split(split)
    pyro.set_rng_seed(1)
    with torch.no_grad():
        draws = torch.tensor([-pyro.infer.Trace_ELBO().loss(experiment.model, experiment.guide, x) / len(x) for _ in range(repeats)])
    return draws.mean().item(), (draws.std() * (1 / repeats + 1 / 100) ** 0.5).item()


def test_list_json_names_everything():
    done = run_cli("list", "--json")
    listing = json.loads(done.stdout)
    kinds = ("models", "guides", "objectives", "methods", "datasets", "priors", "decoders", "likelihoods")
    names = {kind: {e["name"] for e in listing[kind]} for kind in kinds}
    assert {"vae", "linear-gaussian"} <= names["models"] and {"diagonal", "exact"} <= names["guides"]
    assert names["objectives"] == {"elbo", "elbo-analytic", "elbo-enum", "elbo-graph", "iwae", "tcvae", "dip-vae"}
    assert names["methods"] == {"amortized", "local", "map", "mcmc-em", "wake-sleep", "factor-vae", "aae", "vae-gan"}
    assert {"digits", "binarized-mnist", "mnist", "jsb-chorales", "dsprites"} <= names["datasets"]
    assert names["priors"] == {"standard", "vampprior", "flow"}
    assert names["decoders"] == {"mlp", "conv", "pixelcnn"}
    assert names["likelihoods"] == {"bernoulli", "continuous-bernoulli", "gaussian"}
    assert all(e["description"] for kind in ("priors", "decoders", "likelihoods") for e in listing[kind])


def _save(path: Path, array) -> str:
    np.save(path, array)
    return str(path)


BAD = {
    "unknown model": (lambda d: ["fit", "--model", "vea"], "did you mean vae"),
    "unknown guide": (lambda d: ["fit", "--guide", "diagonl"], "did you mean diagonal"),
    "unknown objective": (lambda d: ["fit", "--objective", "elbow"], "unknown objective"),
    "unknown method": (lambda d: ["fit", "--method", "amortised"], "did you mean amortized"),
    "unknown dataset": (lambda d: ["fit", "--dataset", "digit"], "digits"),
    "guide does not fit the model": (lambda d: ["fit", "--guide", "exact"], "cannot serve"),
    "data of the wrong shape": (lambda d: ["fit", "--dataset", _save(d / "x.npy", np.zeros((4, 2, 2, 2, 2)))], "shape"),
    "non-binary data, bernoulli": (lambda d: ["fit", "--likelihood", "bernoulli", "--dataset", _save(d / "x.npy", np.random.rand(50, 6))], "binary"),
    "one non-binary value deep in the data": (lambda d: ["fit", "--likelihood", "bernoulli", "--dataset", _save(d / "x.npy", _one_bad_value())], "binary"),
    "NaN in data": (lambda d: ["fit", "--dataset", _save(d / "x.npy", np.full((50, 6), np.nan))], "NaN"),
    "missing data file": (lambda d: ["fit", "--dataset", str(d / "absent.npy")], "absent.npy"),
    "corrupt data file": (lambda d: ["fit", "--dataset", "binarized-mnist", "--data-dir", _corrupt_amat(d)], "corrupt"),
    "no GPU": (lambda d: ["fit", "--device", "cuda"], "CUDA"),
    "bad hidden sizes": (lambda d: ["fit", "--hidden", "a,b"], "sizes"),
    "negative epochs": (lambda d: ["fit", "--epochs", "-1"], "epochs"),
    "not a run": (lambda d: ["evaluate", str(d)], "not a pyrovae run"),
    "run from another version": (lambda d: ["evaluate", _old_run(d)], "another pyrovae version"),
    "resume of no run": (lambda d: ["fit", "--resume"], "not a pyrovae run"),
}


def _one_bad_value() -> np.ndarray:
    x = (np.random.rand(3000, 6) > 0.5).astype(np.float32)
    x[2900, 3] = 0.5
    return x


def _corrupt_amat(d: Path) -> str:
    folder = d / "data" / "binarized_mnist"
    folder.mkdir(parents=True)
    for split in ("train", "valid"):
        with gzip.open(folder / f"binarized_mnist_{split}.amat.gz", "wt") as f:
            f.write("0 1 2\n" * 3)
    return str(d / "data")


def _old_run(d: Path) -> str:
    run = d / "old"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"format": 0, "model": "vae"}))
    return str(run)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_one_line_and_writes_nothing(case, tmp_path, capsys):
    make_args, expected = BAD[case]
    args = make_args(tmp_path)
    out = tmp_path / "out"
    if args[0] == "fit":
        args += ["--out", str(out), "--epochs" if "--epochs" not in args else "--seed", "1", *FAST]
    before = sorted(p for p in tmp_path.rglob("*"))
    try:
        code = main(args)
    except SystemExit as exit:  # argparse usage errors
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expected.lower() in lines[0].lower(), lines[0]
    assert not out.exists()
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_refuses_to_overwrite_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["fit", "--epochs", "1", "--eval-samples", "0", "--out", str(out), *FAST]) == 0
    config = (out / "config.json").read_text()
    assert main(["fit", "--epochs", "1", "--out", str(out), *FAST]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (out / "config.json").read_text() == config


def test_console_script_and_module_agree():
    done = run_cli("--help")
    assert done.returncode == 0 and "fit" in done.stdout
    done = run_cli("fit", "--model", "nope")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_version_and_no_abbreviated_flags(capsys):
    import pyrovae

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"pyrovae {pyrovae.__version__}"
    for argv in (["fit", "--epoch", "1"], ["fit", "--lat", "3"], ["compare", "--budg", "5"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        err = capsys.readouterr().err
        assert done.value.code == 2 and "unrecognized arguments" in err and len(err.strip().splitlines()) == 1, (argv, err)


@pytest.mark.parametrize("argv", [
    ["compare", "--budget", "-1"], ["compare", "--budget", "0"], ["compare", "--steps", "0"], ["compare", "--steps", "2", "--checkpoints", "0"],
    ["compare", "--steps", "2", "--eval-examples", "0"], ["compare", "--steps", "2", "--hidden", "abc"], ["compare", "--budget", "nan"],
    ["compare", "--steps", "2", "--chains", "0"], ["compare", "--steps", "2", "--bdmc", "-1"],
    ["compare", "--steps", "2", "--lr", "5"], ["compare", "--steps", "2", "--methods", ","], ["compare", "--steps", "2", "--seed", "-1"],
    ["fit", "--batch-size", "0"], ["fit", "--lr", "nan"], ["fit", "--lr", "-1"], ["fit", "--lr", "1e6"], ["fit", "--particles", "0"],
    ["fit", "--hidden", "abc"], ["fit", "--seed", "-1"], ["fit", "--seed", str(2**32)], ["fit", "--warmup", "-1"], ["fit", "--warmup-from", "1.5"], ["fit", "--patience", "0"],
    ["fit", "--latent", "0"], ["fit", "--latent", str(10**10), "--epochs", "1"],
])
def test_bad_budgets_and_sizes_are_refused_in_one_line_before_anything_is_written(argv, tmp_path, capsys):
    out = tmp_path / "out"
    try:
        code = main([*argv, "--out", str(out)])
    except SystemExit as exit:  # argparse's own refusals (a flag's type)
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("pyrovae: error: ") and "--" in err, (argv, err)
    assert not out.exists()


def test_commands_run_on_one_torch_thread_unless_told_and_put_the_count_back():
    import torch

    from pyrovae.cli import torch_threads

    before = torch.get_num_threads()
    with torch_threads(None):
        assert torch.get_num_threads() == 1
    with torch_threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before
    assert main(["evaluate", "no-such-run", "--threads", "0"]) == 2

