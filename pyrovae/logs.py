"""Live metrics of a training run, one row per epoch: ``log.csv`` and TensorBoard event files
(``tensorboard/``, through `torch.utils.tensorboard`, with the `tensorboard` package installed).

A row holds the epoch, the training loss, the validation bound, the learning rate, examples per
second, elapsed seconds, and, for a trained guide, each latent site's KL and active units;
TensorBoard also gets the epoch's sample grid. A resumed run continues both logs from its
checkpoint's epoch: rows a killed process wrote after its last checkpoint are dropped.
"""

from __future__ import annotations

import csv
import importlib.util
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pyrovae.errors import PyrovaeError
from pyrovae.files import atomic_write

__all__ = ["KINDS", "EpochLog", "parse_kinds"]

KINDS = ("csv", "tensorboard")


def parse_kinds(text: str, explicit: bool = True) -> tuple[str, ...]:
    """``"csv,tensorboard"`` -> the logs to write; ``"none"`` -> none. TensorBoard without its
    package is refused when asked for (`explicit`), left out of the default."""
    kinds = tuple(k for k in text.split(",") if k.strip() and k != "none")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise PyrovaeError(f"unknown --log {unknown[0]!r}: choose from {', '.join(KINDS)} or none")
    if "tensorboard" in kinds and importlib.util.find_spec("tensorboard") is None:
        if explicit:
            raise PyrovaeError("--log tensorboard needs the tensorboard package: pip install 'pyrovae[tensorboard]', or --log csv")
        kinds = tuple(k for k in kinds if k != "tensorboard")
    return kinds


class EpochLog:
    """The logs of one run directory, continued from epoch `start` (0 for a new run)."""

    def __init__(self, out: Path, kinds: Sequence[str], start: int = 0) -> None:
        self.csv = out / "log.csv" if "csv" in kinds else None
        self.rows: list[dict[str, Any]] = []
        if self.csv is not None and self.csv.exists() and start > 0:
            with open(self.csv, newline="") as file:
                self.rows = [row for row in csv.DictReader(file) if int(row["epoch"]) <= start]
        self.writer = None
        if "tensorboard" in kinds:
            from torch.utils.tensorboard import SummaryWriter  # optional: imports the tensorboard package

            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start + 1 if start else None)

    def write(self, row: dict[str, Any], images: torch.Tensor | None = None) -> None:
        """One epoch's row; `images` (N, 1, H, W) in [0, 1] as a grid in TensorBoard."""
        if self.csv is not None:
            self.rows.append(row)
            columns = list(dict.fromkeys(k for r in self.rows for k in r))
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(self.rows)
            atomic_write(self.csv, lambda tmp: Path(tmp).write_text(buffer.getvalue()))
        if self.writer is not None:
            epoch = int(row["epoch"])
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key.replace(".", "/"), value, epoch)
            if images is not None:
                self.writer.add_images("samples", images, epoch)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
