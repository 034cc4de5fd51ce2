"""What a new user meets first: a fast start, help for every flag, the catalog `list` shows,
run directories that are locked while written, files with the umask's mode, read-only targets
refused in one line (or, for a result already computed, printed and not lost)."""

import contextlib
import errno
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

from pyrovae import catalog, write_catalog
from pyrovae.cli import _parser, main
from pyrovae.compare import gaps_table
from pyrovae.files import atomic_write, locked
from pyrovae.nets import ACTIVATIONS
from pyrovae.plots import SEPARATOR, grid_canvas

FAST = ["--dataset", "digits", "--hidden", "16", "--latent", "2", "--epochs", "1", "--eval-samples", "10", "--quiet"]


@pytest.mark.parametrize("argv", [["--help"], ["fit", "--help"], ["compare", "--help"], ["list"], ["list", "--json"], ["--version"]])
def test_help_list_and_version_load_neither_torch_nor_pyro(argv):
    code = "\n".join([
        "import sys", "from pyrovae.cli import main", "try:", f"    main({argv!r})", "except SystemExit:", "    pass",
        "assert not {'torch', 'pyro'} & set(sys.modules), sorted({'torch', 'pyro'} & set(sys.modules))",
    ])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_the_catalog_is_what_the_registries_hold():
    assert catalog.read() == write_catalog.from_registries(), "a registration changed: run python -m pyrovae.write_catalog"


def test_every_flag_has_help_and_names_its_choices():
    parser = _parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001 (argparse keeps its sub-parsers here)
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help, f"pyrovae {name} {action.option_strings or action.dest} has no help text"
    fit = " ".join(action.help for action in commands["fit"]._actions)
    for kind in ("methods", "guides", "models", "datasets", "priors", "decoders", "likelihoods", "objectives"):
        for entry in catalog.read()[kind]:
            assert entry["name"] in fit, (kind, entry["name"])
    assert all(name in fit for name in ACTIVATIONS)
    assert "(default: 50)" in fit and "(default: 200,200)" in fit  # Config's defaults
    assert "(default: 200)" in " ".join(commands["compare"].format_help().split())  # --eval-examples, shown by the formatter


def test_a_run_in_use_is_refused_and_its_lock_dies_with_its_process(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["fit", *FAST, "--out", str(out)]) == 0
    with locked(out):  # as another process writing the run would hold it
        assert main(["fit", *FAST, "--epochs", "2", "--resume", "--out", str(out)]) == 2
        assert "in use by another pyrovae process" in capsys.readouterr().err
        assert main(["fit", *FAST, "--out", str(tmp_path / "other")]) == 0  # other runs are not blocked
    holder = subprocess.Popen([sys.executable, "-c", f"from pyrovae.files import locked\nwith locked(__import__('pathlib').Path({str(out)!r})):\n"
                               "    print('held', flush=True)\n    __import__('time').sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["fit", *FAST, "--epochs", "2", "--resume", "--out", str(out)]) == 2
        assert f"pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert main(["fit", *FAST, "--epochs", "2", "--resume", "--out", str(out)]) == 0  # a killed holder leaves no stale lock
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 2


def test_a_refused_start_leaves_no_directory_behind(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with locked(out):
            raise RuntimeError("failed before writing anything")
    assert not out.exists()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_take_the_umask_mode(tmp_path, umask):
    before = os.umask(umask)
    try:
        atomic_write(tmp_path / "f.json", lambda tmp: open(tmp, "w").write("{}"))
    finally:
        os.umask(before)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_targets_that_cannot_be_written_are_refused_before_the_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for argv in (["fit", *FAST, "--out", str(blocker / "run")], ["compare", "--steps", "2", "--out", str(blocker / "cmp")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("pyrovae: error: cannot write") and len(err.strip().splitlines()) == 1, err
    run = tmp_path / "run"
    assert main(["fit", *FAST, "--out", str(run)]) == 0
    assert main(["sample", str(run), "--num", "4", "--out", str(blocker / "s.png")]) == 2
    assert capsys.readouterr().err.startswith("pyrovae: error: cannot write")


def test_a_result_is_printed_even_where_it_cannot_be_saved(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(["fit", *FAST, "--out", str(run)]) == 0
    capsys.readouterr()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert main(["evaluate", str(run), "--samples", "5", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["log_likelihood"] < 0
    assert "not saved" in captured.err and "Read-only file system" in captured.err
    assert not list(run.glob("eval-*.json"))


def test_the_gaps_table_gives_standard_errors_and_explains_a_negative_gap():
    result = {"run": "R", "split": "valid", "examples": 20, "guide": "iaf", "qstar": "guide fine-tuned per example", "log_px": -90.0,
              "elbo_qstar": -93.0, "elbo_q": -92.7, "approximation_gap": 3.0, "amortization_gap": -0.3, "total_gap": 2.7,
              "approximation_gap_se": 0.2, "amortization_gap_se": 0.1, "total_gap_se": 0.15}
    table = gaps_table(result)
    assert "-0.300 ± 0.100" in table and "3.000 ± 0.200" in table and "raise --proposal-steps" in table
    assert "negative" not in gaps_table({**result, "amortization_gap": 0.3, "total_gap": 3.3})


def test_sample_grids_have_light_separators_and_blank_empty_cells():
    images = torch.ones(5, 4)  # five solid black 2x2 images in a 3x3 grid
    canvas = grid_canvas(images, (2, 2), columns=3)
    assert canvas.shape == (5, 8)  # two rows and three columns of 2x2 cells, one pixel apart
    assert torch.all(canvas[2, :] == SEPARATOR) and torch.all(canvas[:, 2] == SEPARATOR)  # the lines between cells
    assert torch.all(canvas[0:2, 0:2] == 1) and torch.all(canvas[3:5, 3:5] == 1)  # images 0 and 4
    assert torch.all(canvas[3:5, 6:8] == 0)  # the sixth cell is empty: paper, not ink
    assert SEPARATOR < 0.5


def test_a_delta_run_is_scored_by_fitted_proposals(tmp_path, capsys):
    """A point-estimate guide gives no ELBO: its decoder is scored as local, map and mcmc-em
    decoders are, by a Gaussian fitted per held-out example; asking for the guide is refused."""
    run = tmp_path / "delta"
    assert main(["fit", *FAST, "--guide", "delta", "--out", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["log_likelihood"] is not None and metrics["elbo"] <= metrics["log_likelihood"] + 0.05
    capsys.readouterr()
    assert main(["evaluate", str(run), "--samples", "20", "--proposal-steps", "20", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["proposal"].startswith("a diagonal Gaussian fitted") and scored["log_likelihood_stderr"] > 0
    assert main(["evaluate", str(run), "--samples", "20", "--proposal", "guide"]) == 2
    assert "--proposal fitted" in capsys.readouterr().err


def test_the_final_scoring_has_a_bar_on_a_terminal_only(monkeypatch, capsys):
    from pyrovae.experiment import scoring_bar

    with scoring_bar(300, show=True) as advance:
        assert advance is None  # stderr is not a terminal under pytest
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with scoring_bar(300, show=False) as advance:
        assert advance is None
    with scoring_bar(300, show=True) as advance:
        assert advance is not None
        advance(200), advance(100)
    assert "300/300" in capsys.readouterr().err


def test_a_run_too_large_for_memory_is_refused_before_it_is_allocated(tmp_path, capsys, monkeypatch):
    from pyrovae import experiment, memory

    out = tmp_path / "huge"
    assert main(["fit", "--latent", "100000000", "--epochs", "1", "--out", str(out)]) == 2  # 20e9 parameters, built on "meta" only
    assert "needs more than 149.0 GiB" in capsys.readouterr().err and not out.exists()
    memory.check_fits(10, torch.device("cpu"), available=80)
    with pytest.raises(memory.PyrovaeError, match="needs more than"):
        memory.check_fits(10, torch.device("cpu"), available=79)
    # the second check counts model, guide and method together: the default VAE's model alone (63,264
    # parameters, 506 kB with gradients) passes the first, all 136,564 (1.09 MB, 546 kB held) fail the second
    monkeypatch.setattr(memory, "available_bytes", lambda device: 520_000)
    monkeypatch.setattr(experiment, "capped", lambda device: contextlib.nullcontext())  # the cap would refuse first: tested below
    assert main(["fit", "--epochs", "1", "--out", str(out)]) == 2
    assert "(136,564 parameters" in capsys.readouterr().err and not out.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the cap reads Linux's /proc")
def test_the_address_space_cap_turns_an_unforeseen_allocation_into_an_error_and_is_lifted_after(monkeypatch):
    from pyrovae import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**28)
    with pytest.raises(RuntimeError, match="can't allocate memory"), memory.capped(torch.device("cpu")):
        torch.empty(2**29, dtype=torch.uint8)  # 512 MiB of address space, never touched
    assert torch.empty(2**29, dtype=torch.uint8).numel() == 2**29
