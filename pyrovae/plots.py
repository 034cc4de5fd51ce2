"""Sample grids, reconstructions and training curves, written as PNG files."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from pyrovae.batch import as_batch  # noqa: E402
from pyrovae.data import Dataset  # noqa: E402
from pyrovae.files import atomic_write  # noqa: E402
from pyrovae.infer.loop import History  # noqa: E402
from pyrovae.sampling import reconstruct, sample  # noqa: E402


class Run(Protocol):
    """What the plots read of a run (`pyrovae.experiment.Experiment`, a layer above)."""

    data: Dataset
    model: Callable
    guide: Callable
    method: Any

    def split(self, name: str) -> Any: ...

    def train_mode(self, training: bool) -> None: ...

__all__ = ["image_grid", "training_curve", "write_run_plots"]


def _save(fig: plt.Figure, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)


def image_grid(images: torch.Tensor, image_shape: tuple[int, int], path: Path, title: str, columns: int | None = None) -> None:
    """Tile images (N, H*W) into one grayscale PNG."""
    n = len(images)
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    h, w = image_shape
    canvas = torch.ones(rows * (h + 1), columns * (w + 1))
    for i, image in enumerate(images.detach().cpu().reshape(n, h, w)):
        r, c = divmod(i, columns)
        canvas[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = image
    fig, ax = plt.subplots(figsize=(columns * w / 14 + 1, rows * h / 14 + 1))
    ax.imshow(canvas.numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title), ax.axis("off")
    _save(fig, path)


def training_curve(history: History, path: Path) -> None:
    """Training loss and validation ELBO against epochs (nats per example)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [r["epoch"] for r in history.rows]
    ax.plot(epochs, [-r["train_loss"] for r in history.rows], label="train bound")
    if history.rows and "valid_elbo" in history.rows[0]:
        ax.plot(epochs, [r["valid_elbo"] for r in history.rows], label="validation ELBO")
    ax.set_xlabel("epoch"), ax.set_ylabel("nats per example"), ax.legend(), ax.grid(alpha=0.3)
    _save(fig, path)


def write_run_plots(experiment: Run, history: History, out: Path) -> None:
    """training.png, and for image data samples.png and (with a trained guide) reconstructions.png."""
    if history.rows:
        training_curve(history, out / "training.png")
    shape = experiment.data.image_shape
    if shape is None:
        return
    experiment.train_mode(False)
    split = "valid" if "valid" in experiment.data.splits else "train"
    x = as_batch(experiment.split(split))[:32]
    image_grid(sample(experiment.model, x, 64), shape, out / "samples.png", "samples from p(x|z), z ~ p(z)")
    if not experiment.method.trains_guide:
        return  # no trained encoder to reconstruct with
    pairs = torch.stack([x.primary, reconstruct(experiment.model, experiment.guide, x)], 1).reshape(2 * len(x), -1)
    image_grid(pairs, shape, out / "reconstructions.png", "data | reconstruction", columns=16)
