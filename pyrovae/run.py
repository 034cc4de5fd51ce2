"""A run directory: config.json, an atomically written checkpoint, metrics and plots."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from pyrovae.errors import PyrovaeError

__all__ = ["RUN_FORMAT", "RunDir", "atomic_write"]

RUN_FORMAT = 1
CHECKPOINT = "checkpoint.pt"


def atomic_write(path: Path, write: Any) -> None:
    """Call `write(file_path)` on a temporary file beside `path`, then move it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunDir:
    """The files of one training run; every write is atomic."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    def exists(self) -> bool:
        return (self.path / "config.json").exists()

    def create(self, config: dict[str, Any]) -> None:
        """Start a new run; refuses to overwrite one."""
        if self.exists():
            raise PyrovaeError(f"{self.path} already holds a run: pass --resume to continue it, or choose another --out")
        if self.path.exists() and any(self.path.iterdir()):
            raise PyrovaeError(f"{self.path} exists and is not empty: choose another --out")
        self.write_json("config.json", {"format": RUN_FORMAT, **config})

    def config(self) -> dict[str, Any]:
        """The run's config, refusing directories that are not runs of this format."""
        if not self.exists():
            raise PyrovaeError(f"{self.path} is not a pyrovae run directory (no config.json)")
        config = self.read_json("config.json")
        if config.get("format") != RUN_FORMAT:
            raise PyrovaeError(
                f"{self.path} was written by another pyrovae version (run format {config.get('format')!r}, "
                f"this version reads {RUN_FORMAT}): retrain it with this version"
            )
        return config

    def read_json(self, name: str) -> dict[str, Any]:
        try:
            return json.loads((self.path / name).read_text())
        except (OSError, ValueError) as error:
            raise PyrovaeError(f"cannot read {self.path / name}: {error}") from error

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        text = json.dumps(data, indent=2, sort_keys=False) + "\n"
        atomic_write(self.path / name, lambda tmp: Path(tmp).write_text(text))

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_write(self.checkpoint, lambda tmp: torch.save(state, tmp))

    def load_checkpoint(self) -> dict[str, Any]:
        if not self.checkpoint.exists():
            raise PyrovaeError(f"{self.path} has no checkpoint yet: train it first")
        try:
            return torch.load(self.checkpoint, map_location="cpu", weights_only=False)
        except Exception as error:
            raise PyrovaeError(f"the checkpoint {self.checkpoint} is corrupt ({type(error).__name__}): retrain the run") from error
