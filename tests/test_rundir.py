"""Run directories: checkpoints that cannot run code, damage refused in one line, runs that resume
exactly after a kill at any moment."""

import contextlib
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyrovae.cli import main
from pyrovae.experiment import Config, fit
from pyrovae.run import RunDir

TINY = dict(dataset="digits", latent=2, hidden=(8,), epochs=2, batch_size=200, eval_samples=0)
TINY_FLAGS = ["--dataset", "digits", "--latent", "2", "--hidden", "8", "--batch-size", "200", "--eval-samples", "0", "--quiet"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    fit(Config(**TINY), out, progress=False)
    return out


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A fresh copy of the trained run, to damage."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(args: list[str], capsys) -> str:
    """Run the command line; it must exit 2 with one line and no traceback. Returns that line."""
    code = main(args)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("pyrovae: error: "), lines[0]
    return lines[0]


def _same_training(a: dict, b: dict) -> None:
    """Two checkpoints hold bit-identical training: parameters, optimizer, random states, losses."""

    def same(x, y, where):
        if torch.is_tensor(x):
            assert torch.is_tensor(y) and x.dtype == y.dtype and torch.equal(x, y), where
        elif isinstance(x, dict):
            assert isinstance(y, dict) and x.keys() == y.keys(), where
            for key in x:
                same(x[key], y[key], f"{where}.{key}")
        else:
            assert x == y, where

    for key in ("method", "generator", "torch_rng", "step", "stopped_early", "best_state"):
        same(a[key], b[key], key)
    assert _losses(a["history"]) == _losses(b["history"])


def _losses(rows: list[dict]) -> list[dict]:
    """History rows without their wall-clock seconds."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


# --- checkpoints that would run code --------------------------------------------------------


class _Payload:
    """Unpickling it runs `code`: what a planted checkpoint would do."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def _plant(path: Path, marker: Path, form: str) -> None:
    payload = _Payload(f"open({str(marker)!r}, 'w').write('ran')")
    if form == "pickle":
        path.write_bytes(pickle.dumps({"method": payload}, protocol=2))
    else:
        torch.save({"method": payload, "step": 0}, path)


@pytest.mark.parametrize("form", ["pickle", "torch.save"])
@pytest.mark.parametrize("command", ["evaluate", "resume"])
def test_a_planted_checkpoint_runs_no_code(run, tmp_path, capsys, form, command):
    marker = tmp_path / "marker"
    _plant(run / "checkpoint.pt", tmp_path / "live", form)
    with contextlib.suppress(Exception):  # the payload is live: an unsafe load runs it
        torch.load(run / "checkpoint.pt", weights_only=False)
    assert (tmp_path / "live").read_text() == "ran"
    _plant(run / "checkpoint.pt", marker, form)
    before = _files(run)
    args = ["evaluate", str(run), "--samples", "5"] if command == "evaluate" else ["fit", "--resume", "--out", str(run), "--quiet"]
    line = _refused(args, capsys)
    assert "holds Python objects" in line and "not loaded" in line, line
    assert not marker.exists()
    assert _files(run) == before


# --- damaged run directories ------------------------------------------------------------------


def _edit_config(**changes):
    def damage(run: Path) -> None:
        config = json.loads((run / "config.json").read_text())
        for key, value in changes.items():
            if value is _DROP:
                del config[key]
            else:
                config[key] = value
        (run / "config.json").write_text(json.dumps(config))

    return damage


def _edit_checkpoint(edit):
    def damage(run: Path) -> None:
        state = torch.load(run / "checkpoint.pt", weights_only=True)
        torch.save(edit(state), run / "checkpoint.pt")

    return damage


def _without_optimizer(state: dict) -> dict:
    del state["method"]["optimizer"]
    return state


_DROP = object()

DAMAGE = {
    "checkpoint holding another dict": (_edit_checkpoint(lambda s: {"model": s["method"]["model"]}), "has no 'method' entry"),
    "checkpoint holding a list": (_edit_checkpoint(lambda s: [1, 2]), "holds a list"),
    "checkpoint step a string": (_edit_checkpoint(lambda s: {**s, "step": "16"}), "'step' entry is not a step count"),
    "checkpoint generator state of floats": (_edit_checkpoint(lambda s: {**s, "generator": s["generator"].float()}), "'generator' entry"),
    "checkpoint history of strings": (_edit_checkpoint(lambda s: {**s, "history": ["epoch 1"]}), "'history' entry"),
    "checkpoint without the optimizer": (_edit_checkpoint(_without_optimizer), "does not match config.json"),
    "truncated checkpoint": (lambda run: (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:2000]), "corrupt"),
    "latent edited in config.json": (_edit_config(latent=3), "does not match config.json"),
    "hidden edited in config.json": (_edit_config(hidden=[9]), "does not match config.json"),
    "latent not a number": (_edit_config(latent="abc"), '"latent" must be an integer, got "abc"'),
    "hidden a number": (_edit_config(hidden=5), '"hidden" must be a list of positive integers, got 5'),
    "hidden with a zero": (_edit_config(hidden=[8, 0]), '"hidden" must be a list of positive integers'),
    "lr a string": (_edit_config(lr="0.001"), '"lr" must be a number'),
    "capture a number": (_edit_config(capture=1), '"capture" must be true or false'),
    "options not an object": (_edit_config(model_options=[1]), '"model_options" must be an object'),
    "config without model": (_edit_config(model=_DROP), '"model" is missing'),
    "config with an unknown key": (_edit_config(modle="vae"), 'unknown setting "modle"'),
    "config a list": (lambda run: (run / "config.json").write_text("[1, 2]"), "holds a list"),
    "config not JSON": (lambda run: (run / "config.json").write_text("{model: vae"), "cannot read"),
}


@pytest.mark.parametrize("command", ["evaluate", "resume"])
@pytest.mark.parametrize("case", list(DAMAGE))
def test_damage_gets_one_line_and_writes_nothing(run, capsys, case, command):
    damage, expected = DAMAGE[case]
    damage(run)
    before = _files(run)
    # --epochs 3 would be saved in config.json: it must not be, the run being refused
    args = ["evaluate", str(run), "--samples", "5"] if command == "evaluate" else ["fit", "--resume", "--out", str(run), "--epochs", "3", "--quiet"]
    line = _refused(args, capsys)
    assert expected in line, line
    assert "config.json" in line or "checkpoint" in line, line  # names what is damaged
    assert _files(run) == before


# --- resuming --------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, expected", [
    (["--lr", "1000"], "--lr 1000.0 differs from the run's saved --lr 0.001"),
    (["--latent", "3"], "--latent 3 differs from the run's saved --latent 2"),
    (["--hidden", "8,8"], "--hidden 8,8 differs from the run's saved --hidden 8"),
    (["--eager"], "--eager differs from the run's saved captured training"),
    (["--data-option", "binarize=false"], "--data-option {\"binarize\": false} differs from the run's saved --data-option {}"),
    (["--seed", "1"], "--seed 1 differs"),
])
def test_resume_refuses_a_flag_that_differs_from_the_saved_config(run, capsys, flags, expected):
    before = _files(run)
    line = _refused(["fit", "--resume", "--out", str(run), *flags, "--quiet"], capsys)
    assert expected in line, line
    assert _files(run) == before


def test_resume_applies_and_reports_the_flags_that_may_change(run, capsys):
    flags = ["--epochs", "3", "--device", "cpu", "--threads", "1", *TINY_FLAGS]  # TINY_FLAGS equal the saved ones
    assert main(["fit", "--resume", "--out", str(run), *flags]) == 0
    out = capsys.readouterr().out
    assert f"resuming {run} with --epochs 3 (was --epochs 2)\n" in out, out
    assert json.loads((run / "config.json").read_text())["epochs"] == 3
    assert len(RunDir(run).load_checkpoint()["history"]) == 3
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 3
    # a plain --resume now continues to the new target, and changes nothing
    assert main(["fit", "--resume", "--out", str(run), "--quiet"]) == 0
    assert "resuming" not in capsys.readouterr().out


def test_a_run_stopped_before_its_first_checkpoint_starts_again_and_ends_the_same(trained, run, capsys):
    for path in run.iterdir():
        if path.name != "config.json":
            shutil.rmtree(path) if path.is_dir() else path.unlink()  # the logs too: tensorboard/ is a directory
    (run / ".checkpoint.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
    (run / ".training.png.z3.tmp").write_bytes(b"half a plot")
    assert main(["fit", "--resume", "--out", str(run), "--quiet"]) == 0
    assert "has no checkpoint yet" in capsys.readouterr().out
    _same_training(RunDir(run).load_checkpoint(), RunDir(trained).load_checkpoint())
    assert not list(run.glob(".*.tmp"))


def test_a_start_killed_while_writing_config_json_can_start_again(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".config.json.a1b2.tmp").write_text("{")
    assert main(["fit", "--out", str(out), "--epochs", "0", *TINY_FLAGS]) == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".lock"]  # the temporary file is gone
    # epoch 0 has a checkpoint: the untrained run can be evaluated
    assert RunDir(out).load_checkpoint()["history"] == []
    assert main(["evaluate", str(out), "--samples", "5"]) == 0


@pytest.mark.parametrize("method, options", [
    ("amortized", dict(patience=1)), ("local", {}), ("map", {}), ("mcmc-em", {}), ("wake-sleep", {}),
])
def test_every_method_checkpoint_loads_as_weights_only(tmp_path, method, options):
    """Each method's state (optimizers, chains, step sizes, best state) is plain data."""
    from pyrovae.experiment import load

    out = tmp_path / method
    fit(Config(**{**TINY, "method": method, **options}), out, progress=False)
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert (state["best_state"] is not None) == ("patience" in options)
    _same_training(state, RunDir(out).load_checkpoint())
    load(out)


# --- killed at random moments ----------------------------------------------------------------

# A fork server: it warms up with one whole run (every lazy import done), then runs each `pyrovae`
# command line in a forked child (a fresh process that starts warm, so that many kills fit in
# seconds), kills the child with SIGKILL when the request's trigger fires, and answers with how
# the child ended. The server reaps its own children: a pid is never signalled once reusable.
SERVER = r"""
import contextlib, glob, io, json, os, signal, sys, time
import pyrovae.cli

with contextlib.redirect_stdout(io.StringIO()):
    assert pyrovae.cli.main(json.loads(sys.argv[1])) == 0
print("ready", flush=True)

def files(out, pattern):
    found = {}
    for path in glob.glob(os.path.join(out, pattern)):
        try:
            found[path] = os.stat(path).st_ino
        except FileNotFoundError:
            pass
    return found

for line in sys.stdin:
    request = json.loads(line)
    trigger, out = request["trigger"], request["out"]
    pattern = trigger.get("file")
    seen, changes = (files(out, pattern) if pattern else None), 0
    start, fired = time.perf_counter(), None if pattern else time.perf_counter()
    pid = os.fork()
    if pid == 0:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1)
        os.dup2(log, 2)
        try:
            code = pyrovae.cli.main(request["argv"])
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    killed = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if fired is None:
            now = files(out, pattern)
            if now != seen:
                seen, changes = now, changes + 1
                if changes >= trigger.get("changes", 1):
                    fired = time.perf_counter()
        if fired is not None and time.perf_counter() - fired >= trigger.get("after", 0.0):
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            killed = True
            break
        time.sleep(0.0002)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status), "killed": killed, "seconds": time.perf_counter() - start}), flush=True)
"""

KILL_FLAGS = ["--dataset", "digits", "--latent", "2", "--hidden", "128,128", "--batch-size", "200", "--epochs", "4", "--eval-samples", "0", "--quiet", "--threads", "1"]


def _trigger(rng: random.Random, kind: str, seconds: float) -> dict:
    """Where to kill: anywhere, just after config.json, during a checkpoint's write, between
    checkpoints, right after the next checkpoint, or while the plots and metrics are written.
    Triggers on files, not on time, are what make every needed state reachable on a loaded
    machine."""
    return {
        "anywhere": {"after": rng.uniform(0, seconds)},
        "early": {"after": rng.uniform(0, seconds / 4)},
        "after config": {"file": "config.json", "after": rng.uniform(0, 0.003)},
        "checkpoint write": {"file": ".checkpoint.pt.*.tmp"},
        "between checkpoints": {"file": "checkpoint.pt", "after": rng.uniform(0, 0.05)},
        # the second checkpoint written by this attempt, killed at once: mid-training from a fresh run
        "next checkpoint": {"file": "checkpoint.pt", "changes": 2},
        "plot write": {"file": ".*.png.*.tmp"},
    }[kind]


def _state_after_kill(out: Path) -> str:
    if not (out / "config.json").exists():
        return "no config"
    if not (out / "checkpoint.pt").exists():
        return "no checkpoint"
    epochs = len(RunDir(out).load_checkpoint()["history"])
    return "trained" if epochs == 4 else "mid-training" if epochs else "epoch 0"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the fork server needs os.fork (POSIX)")
def test_runs_killed_at_random_moments_resume_bit_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    warm = json.dumps(["fit", *KILL_FLAGS, "--out", str(tmp_path / "warm-up")])
    server = subprocess.Popen([sys.executable, "-c", SERVER, warm], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    reference = tmp_path / "reference"  # a plain `python -m pyrovae` run, beside the server's warm-up
    done = subprocess.run([sys.executable, "-m", "pyrovae", "fit", *KILL_FLAGS, "--out", str(reference)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    expected = RunDir(reference).load_checkpoint()
    assert server.stdout.readline() == "ready\n", "the fork server did not start"

    def attempt(out: Path, trigger: dict, log: Path) -> dict:
        argv = ["fit", *KILL_FLAGS, "--out", str(out), *(["--resume"] if (out / "config.json").exists() else [])]
        server.stdin.write(json.dumps({"argv": argv, "out": str(out), "trigger": trigger, "log": str(log)}) + "\n")
        server.stdin.flush()
        answer = server.stdout.readline()
        assert answer, "the fork server died"
        return json.loads(answer)

    try:
        # an unkilled child of the server trains exactly as `python -m pyrovae` does
        plain = attempt(tmp_path / "forked", {"file": "never"}, tmp_path / "forked.log")
        assert plain["code"] == 0, (tmp_path / "forked.log").read_text()
        _same_training(RunDir(tmp_path / "forked").load_checkpoint(), expected)

        rng, seconds = random.Random(0), plain["seconds"]
        kinds = ["early", "next checkpoint", "after config", "checkpoint write", "between checkpoints", "anywhere", "plot write"]
        kills, states, chain = 0, set(), 0
        needed = {"no checkpoint", "mid-training", "temporary file"}
        while (kills < 12 or not needed <= states) and chain < 24:  # a loaded machine may need more chains to land in the narrow states
            chain += 1
            out = tmp_path / f"chain{chain}"
            for number in range(40):
                log = tmp_path / f"chain{chain}-{number}.log"
                result = attempt(out, _trigger(rng, kinds[(chain + number) % len(kinds)], seconds), log)
                if not result["killed"]:
                    assert result["code"] == 0, log.read_text()
                    break
                kills += 1
                states.add(_state_after_kill(out))
                if list(out.glob(".*.tmp")):
                    states.add("temporary file")
            else:
                pytest.fail(f"chain {chain} never finished")
            _same_training(RunDir(out).load_checkpoint(), expected)
            assert json.loads((out / "metrics.json").read_text())["epochs"] == 4
            assert not list(out.glob(".*.tmp")), list(out.glob(".*.tmp"))
    finally:
        server.stdin.close()
        server.wait(timeout=30)
    assert kills >= 12 and needed <= states, (kills, states)
