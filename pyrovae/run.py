"""A run directory: config.json, an atomically written checkpoint, metrics and plots.

Checkpoints are read with `torch.load(weights_only=True)`: a checkpoint holds tensors, numbers,
strings, lists and dicts only, so opening a run directory never runs code from it.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pyrovae.config import is_integer, is_number
from pyrovae.errors import PyrovaeError
from pyrovae.files import LOCK, TEMPORARY, atomic_write, one_line, write_json

__all__ = ["RUN_FORMAT", "RunDir"]

RUN_FORMAT = 1
CHECKPOINT = "checkpoint.pt"


def _is_rng_state(value: Any) -> bool:
    """A CPU generator's state: a byte tensor of the size torch writes."""
    return torch.is_tensor(value) and value.dtype == torch.uint8 and value.shape == torch.Generator().get_state().shape


def _is_history(value: Any) -> bool:
    """Epoch rows: dicts with an integer epoch and numbers for train_loss, seconds and the rest."""
    return isinstance(value, list) and all(
        isinstance(row, dict) and is_integer(row.get("epoch")) and is_number(row.get("train_loss")) and is_number(row.get("seconds"))
        and all(isinstance(k, str) and (v is None or is_number(v)) for k, v in row.items())
        for row in value
    )


# entry: (check, what it must be, required)
CHECKPOINT_ENTRIES: dict[str, tuple[Callable[[Any], bool], str, bool]] = {
    "method": (lambda v: isinstance(v, dict), "a dict of state dicts", True),
    "generator": (_is_rng_state, "a random generator's state", True),
    "torch_rng": (_is_rng_state, "a random generator's state", True),
    "history": (_is_history, "a list of epoch rows", True),
    "step": (lambda v: is_integer(v) and v >= 0, "a step count", True),
    "cuda_rng": (lambda v: torch.is_tensor(v) and v.dtype == torch.uint8, "a random generator's state", False),
    "stopped_early": (lambda v: isinstance(v, bool), "true or false", False),
    "best_state": (lambda v: v is None or isinstance(v, dict), "a dict of state dicts or None", False),
    "ranks": (lambda v: is_integer(v) and v >= 2, "a count of processes (2 or more)", False),
    "rank_rng": (lambda v: isinstance(v, list) and all(map(_is_rng_state, v)), "a list of random generators' states", False),
}


def _got(value: Any) -> str:
    """What a wrong entry holds instead, where its type says more than the entry's name."""
    if torch.is_tensor(value):
        return f" (got a {value.dtype} tensor of shape {list(value.shape)})"
    return "" if isinstance(value, (list, dict)) else f" (got a {type(value).__name__})"


def checkpoint_problem(state: Any) -> str | None:
    """What is wrong with a loaded checkpoint's structure, or None when nothing is."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a dict"
    for key, (check, what, required) in CHECKPOINT_ENTRIES.items():
        if key not in state:
            if required:
                return f"it has no {key!r} entry"
        elif not check(state[key]):
            return f"its {key!r} entry is not {what}{_got(state[key])}"
    return None


class RunDir:
    """The files of one training run; every write is atomic."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    def exists(self) -> bool:
        return (self.path / "config.json").exists()

    def check_new(self) -> None:
        """Refuse to start a new run here: a run is here already, or other files (the temporary
        files of a killed start and the lock file aside)."""
        if self.exists():
            raise PyrovaeError(f"{self.path} already holds a run: pass --resume to continue it, or choose another --out")
        if self.path.exists() and not self.path.is_dir():
            raise PyrovaeError(f"{self.path} is a file, not a run directory: choose another --out")
        if self.path.exists() and any(p.name != LOCK and not p.match(TEMPORARY) for p in self.path.iterdir()):
            raise PyrovaeError(f"{self.path} exists and is not empty: choose another --out")

    def create(self, config: dict[str, Any]) -> None:
        """Start a new run; refuses to overwrite one. Temporary files of a killed start are removed."""
        self.check_new()
        self.remove_temporary()
        self.save_config(config)

    def save_config(self, config: dict[str, Any]) -> None:
        self.write_json("config.json", {"format": RUN_FORMAT, **config})

    def remove_temporary(self) -> list[Path]:
        """Remove the temporary files a killed process left (atomic_write's `.NAME.*.tmp`)."""
        stale = [p for p in self.path.glob(TEMPORARY) if p.is_file()] if self.path.is_dir() else []
        for path in stale:
            path.unlink(missing_ok=True)
        return stale

    def config(self) -> dict[str, Any]:
        """The run's config, refusing directories that are not runs of this format."""
        if not self.exists():
            raise PyrovaeError(f"{self.path} is not a pyrovae run directory (no config.json): start the run without --resume")
        config = self.read_json("config.json")
        if not isinstance(config, dict):
            raise PyrovaeError(f"{self.path / 'config.json'} holds a {type(config).__name__}, not a run's settings")
        if config.get("format") != RUN_FORMAT:
            raise PyrovaeError(
                f"{self.path} was written by another pyrovae version (run format {config.get('format')!r}, "
                f"this version reads {RUN_FORMAT}): retrain it with this version"
            )
        return config

    def read_json(self, name: str) -> Any:
        try:
            return json.loads((self.path / name).read_text())
        except (OSError, ValueError) as error:
            raise PyrovaeError(f"cannot read {self.path / name}: {one_line(error)}") from error

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        write_json(self.path / name, data)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_write(self.checkpoint, lambda tmp: torch.save(state, tmp))

    def load_checkpoint(self) -> dict[str, Any]:
        """The checkpoint, loaded without running code and checked entry by entry."""
        if not self.checkpoint.exists():
            raise PyrovaeError(f"{self.path} has no checkpoint yet: train it first")
        try:
            state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            if "weights only load failed" not in str(error).lower():
                raise PyrovaeError(f"the checkpoint {self.checkpoint} is corrupt (UnpicklingError): retrain the run") from error
            raise PyrovaeError(
                f"the checkpoint {self.checkpoint} holds Python objects, not only tensors, numbers and containers; "
                "it was not loaded, since loading it could run code: retrain the run"
            ) from error
        except Exception as error:
            raise PyrovaeError(f"the checkpoint {self.checkpoint} is corrupt ({type(error).__name__}): retrain the run") from error
        problem = checkpoint_problem(state)
        if problem:
            raise PyrovaeError(f"{self.checkpoint} is not a pyrovae checkpoint: {problem}: retrain the run")
        return state
