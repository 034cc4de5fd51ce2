"""Sample grids, reconstructions, interpolations, latent maps and training curves, as PNG files."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from pyro import poutine  # noqa: E402

from pyrovae.batch import as_batch  # noqa: E402
from pyrovae.data import Dataset  # noqa: E402
from pyrovae.files import atomic_write  # noqa: E402
from pyrovae.infer.loop import History  # noqa: E402
from pyrovae.sampling import encode, interpolate, reconstruct, sample, sample_sequences, traverse, why_no_images  # noqa: E402


class Run(Protocol):
    """What the plots read of a run (`pyrovae.experiment.Experiment`, a layer above)."""

    data: Dataset
    model: Callable
    guide: Callable
    method: Any

    def split(self, name: str) -> Any: ...

    def train_mode(self, training: bool) -> None: ...

    def predictions(self, split: str) -> tuple[torch.Tensor, torch.Tensor] | None: ...

__all__ = ["canvas_plots", "classifier_plots", "completion_plots", "confusion", "grid_canvas", "image_grid", "latent_map", "piano_rolls", "scene_plots", "training_curve", "traversal_plots", "write_run_plots"]


def _save(fig: plt.Figure, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)


SEPARATOR = 0.15  # on the gray_r scale of the grids: 0 is white paper, 1 is black ink


def grid_canvas(images: torch.Tensor, image_shape: tuple[int, int], columns: int | None = None) -> torch.Tensor:
    """The pixels of `image_grid`: cells one pixel apart on SEPARATOR, empty cells 0."""
    n = len(images)
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    h, w = image_shape
    canvas = torch.full((rows * (h + 1) - 1, columns * (w + 1) - 1), SEPARATOR)
    for i in range(rows * columns):
        r, c = divmod(i, columns)
        cell = images[i].detach().cpu().reshape(h, w) if i < n else torch.zeros(h, w)
        canvas[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = cell
    return canvas


def image_grid(images: torch.Tensor, image_shape: tuple[int, int], path: Path, title: str, columns: int | None = None) -> None:
    """Tile images (N, H*W) with values in [0, 1] into one grayscale PNG: light grey lines
    between the cells, and the cells past the last image left blank."""
    canvas = grid_canvas(images, image_shape, columns)
    rows, columns = (canvas.shape[0] + 1) // (image_shape[0] + 1), (canvas.shape[1] + 1) // (image_shape[1] + 1)
    h, w = image_shape
    inches = min(1 / 14, 24 / (columns * w))  # a pixel a 14th of an inch, the figure at most 24 inches wide
    fig, ax = plt.subplots(figsize=(columns * w * inches + 1, rows * h * inches + 1))
    ax.imshow(canvas.numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title), ax.axis("off")
    _save(fig, path)


def training_curve(history: History, path: Path) -> None:
    """Training bound and validation ELBO against epochs (nats per example); markers, so that
    a one-epoch run shows its point."""
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [r["epoch"] for r in history.rows]
    ax.plot(epochs, [-r["train_loss"] for r in history.rows], marker="o", label="train bound (minus the loss)")
    if history.rows and "valid_elbo" in history.rows[0]:
        ax.plot(epochs, [r["valid_elbo"] for r in history.rows], marker="o", label="validation ELBO, 1 sample per example")
    ax.set_xlabel("epoch"), ax.set_ylabel("nats per example"), ax.legend(), ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _save(fig, path)


def latent_map(means: torch.Tensor, labels: torch.Tensor | None, path: Path, title: str) -> None:
    """Posterior means (N, D) as a 2-D scatter, projected on their first two principal axes
    where D > 2, coloured by label where there are labels."""
    means = means.detach().cpu().reshape(len(means), -1).float()
    if means.shape[1] > 2:
        centred = means - means.mean(0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        points, axes = centred @ v[:2].T, ("principal axis 1", "principal axis 2")
    else:
        points, axes = means, ("z1", "z2") if means.shape[1] == 2 else ("z1", "")
    if points.shape[1] == 1:
        points = torch.cat([points, torch.zeros_like(points)], 1)
    fig, ax = plt.subplots(figsize=(6, 5))
    coloured = {} if labels is None else {"c": labels.cpu(), "cmap": "tab10"}
    shown = ax.scatter(points[:, 0], points[:, 1], s=4, alpha=0.7, **coloured)
    if labels is not None:
        fig.colorbar(shown, ax=ax, label="label")
    ax.set_xlabel(axes[0]), ax.set_ylabel(axes[1]), ax.set_title(title), ax.grid(alpha=0.3)
    _save(fig, path)


def confusion(labels: torch.Tensor, predicted: torch.Tensor, classes: int, path: Path, title: str) -> torch.Tensor:
    """The confusion matrix (rows: true class, columns: predicted) as counts, drawn with them."""
    counts = torch.bincount(labels * classes + predicted, minlength=classes * classes).reshape(classes, classes)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(counts.numpy(), cmap="Blues")
    for (i, j), n in zip(torch.cartesian_prod(torch.arange(classes), torch.arange(classes)).tolist(), counts.flatten().tolist()):
        ax.text(j, i, str(n), ha="center", va="center", fontsize=7, color="white" if n > counts.max() / 2 else "black")
    ax.set_xlabel("predicted class"), ax.set_ylabel("true class"), ax.set_title(title)
    ax.set_xticks(range(classes)), ax.set_yticks(range(classes))
    _save(fig, path)
    return counts


@torch.no_grad()
def classifier_plots(experiment: Run, out: Path, per_class: int = 8) -> None:
    """For a model with a classifier (M2's q(y|x)): confusion.png on the labelled examples of
    the test (else valid) split, and for image data classes.png, `per_class` samples of each
    class y (a row each) with z ~ p(z)."""
    model = experiment.model
    classes = int(model.classes)
    found = next(((s, p) for s in ("test", "valid") if s in experiment.data.splits and (p := experiment.predictions(s)) is not None), None)
    if found is not None:
        split, (labels, predicted) = found
        error = (predicted != labels).float().mean().item()
        confusion(labels, predicted, classes, out / "confusion.png", f"q(y|x) on {len(labels)} {split} examples: {100 * error:.2f}% error")
    shape = experiment.data.image_shape
    if shape is not None:
        like = as_batch(experiment.split("train"))[:1]
        y = torch.arange(classes, device=like.primary.device).repeat_interleave(per_class)
        image_grid(sample(model, like, len(y), given={"y": y}), shape, out / "classes.png", "samples of each class y (rows), z ~ p(z)", columns=per_class)


@torch.no_grad()
def completion_plots(experiment: Run, out: Path, examples: int = 8, draws: int = 4) -> None:
    """For a completion model (a ``given`` mask of the pixels it conditions on: the CVAE):
    completions.png, a column per held-out example: the given pixels (the rest grey), the
    truth, and `draws` completions, the means of p(x_out | x_in, z) for z ~ p(z | x_in)."""
    experiment.train_mode(False)
    split = "valid" if "valid" in experiment.data.splits else "train"
    x = as_batch(experiment.split(split))[:examples]
    truth = x.primary.reshape(len(x), -1)
    given = experiment.model.given.to(truth.device)
    shown = torch.where(given, truth, torch.full_like(truth, 0.5))
    completed = torch.stack([sample(experiment.model, x[i : i + 1], draws) for i in range(len(x))], 1).reshape(draws * len(x), -1)
    image_grid(torch.cat([shown, truth, completed]), experiment.data.image_shape, out / "completions.png",
               f"given (row 1), truth (row 2), {draws} completions (rows below)", columns=len(x))


@torch.no_grad()
def piano_rolls(experiment: Run, out: Path, draws: int = 4) -> None:
    """For sequence data: piano_rolls.png, two held-out sequences and `draws` sequences sampled
    from the model at the first one's length (notes by time, a note played in black)."""
    experiment.train_mode(False)
    split = "valid" if "valid" in experiment.data.splits else "train"
    x = as_batch(experiment.split(split))[:2]
    lengths = experiment.data.split(split).lengths
    length = int(lengths[0]) if lengths is not None else x.primary.shape[1]
    drawn = sample_sequences(experiment.model, x, draws)[:, :length]
    rolls = [("held out", x.primary[i, : int(lengths[i]) if lengths is not None else None]) for i in range(len(x))]
    rolls += [(f"sample {i + 1}", roll) for i, roll in enumerate(drawn)]
    fig, axes = plt.subplots(len(rolls), 1, figsize=(8, 1.6 * len(rolls)), sharex=True)
    for ax, (title, roll) in zip(axes, rolls):
        ax.imshow(roll.reshape(len(roll), -1).T.cpu().numpy(), aspect="auto", origin="lower", cmap="Greys", interpolation="nearest")
        ax.set_ylabel("note"), ax.set_title(title, fontsize=9)
    axes[-1].set_xlabel("time step")
    _save(fig, out / "piano_rolls.png")


@torch.no_grad()
def canvas_plots(experiment: Run, out: Path, examples: int = 8, columns: int = 10) -> None:
    """For a model that draws in steps (a ``canvases(latents)`` method: DRAW): canvases.png, a row per
    held-out example (its z_t from the guide) and per prior draw, the canvas at `columns` steps
    spaced evenly to the last."""
    experiment.train_mode(False)
    split = "valid" if "valid" in experiment.data.splits else "train"
    x = as_batch(experiment.split(split))[:examples]
    model = experiment.model
    inferred = x.call(poutine.trace(experiment.guide).get_trace)
    drawn = x.call(poutine.trace(poutine.uncondition(model)).get_trace)
    rows = [model.canvases({name: site["value"] for name, site in trace.nodes.items() if site["type"] == "sample"}) for trace in (inferred, drawn)]
    steps = torch.linspace(0, len(rows[0]) - 1, min(columns, len(rows[0]))).round().long()
    strips = torch.cat([canvases[steps].transpose(0, 1) for canvases in rows]).reshape(-1, rows[0].shape[-1])
    image_grid(strips, experiment.data.image_shape, out / "canvases.png",
               f"canvas at steps {', '.join(str(int(t) + 1) for t in steps)}: {len(x)} {split} images (top), {len(x)} prior draws (bottom)",
               columns=len(steps))


@torch.no_grad()
def scene_plots(experiment: Run, out: Path, examples: int = 16, columns: int = 8) -> None:
    """For a guide that infers scenes of objects (a ``scenes(x)`` method: AIR): scenes.png, held-out
    images with the boxes of one draw of the guide's objects, a colour per step, its count above."""
    experiment.train_mode(False)
    split = "valid" if "valid" in experiment.data.splits else "train"
    x = as_batch(experiment.split(split)).primary[:examples]
    counts, boxes = experiment.guide.scenes(x)
    truth = experiment.data.split(split).boxes
    h, w = experiment.data.image_shape
    rows = math.ceil(len(x) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.75 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= len(x):
            continue
        ax.imshow(x[i].reshape(h, w).cpu().numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        for t, (x0, y0, bw, bh) in enumerate(boxes[i].tolist()):
            if not math.isnan(x0):  # pixel centres are at integers: a box's edges are half a pixel out
                ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), bw, bh, fill=False, lw=1.2, color=f"C{t}"))
        known = "" if truth is None else f" of {int((~truth[i, :, 0].isnan()).sum())}"
        ax.set_title(f"{int(counts[i])}{known}", fontsize=8)
        ax.set_xlim(-0.5, w - 0.5), ax.set_ylim(h - 0.5, -0.5)
    fig.suptitle(f"inferred objects on {len(x)} {split} images: count" + (" of true count" if truth is not None else ""), fontsize=9)
    _save(fig, out / "scenes.png")


def write_run_plots(experiment: Run, history: History, out: Path) -> None:
    """training.png; for image data samples.png; with a trained guide reconstructions.png,
    latents.png (the held-out posterior means) and, for image data, interpolations.png and
    traversals.png (`traversal_plots`, one flat latent site); for a
    model with a classifier confusion.png and classes.png (`classifier_plots`); for a completion
    model completions.png (`completion_plots`); for a model of sequence steps piano_rolls.png; for
    a model that draws in steps canvases.png; for a guide of scenes of objects scenes.png."""
    if history.rows:
        training_curve(history, out / "training.png")
    shape = experiment.data.image_shape
    experiment.train_mode(False)
    split = "valid" if "valid" in experiment.data.splits else "train"
    x = as_batch(experiment.split(split))
    unshowable = why_no_images(experiment.model, x) if shape is not None else None
    if unshowable:
        print(f"note: no sample or reconstruction plots: {unshowable}", file=sys.stderr)
        shape = None
    if shape is not None:
        image_grid(sample(experiment.model, x[:32], 64), shape, out / "samples.png", "samples: means of p(x|z), z ~ p(z)")
    if callable(getattr(experiment.model, "classify", None)):
        classifier_plots(experiment, out)
    if shape is not None and torch.is_tensor(getattr(experiment.model, "given", None)):
        completion_plots(experiment, out)
    sites = experiment.method.sites
    if experiment.data.kind == "sequence" and sites is not None and len(sites.observed) > 1:  # one observed site per step
        piano_rolls(experiment, out)
    guide = experiment.guide if experiment.method.trains_guide else None
    if shape is not None and guide is not None and callable(getattr(experiment.model, "canvases", None)):
        canvas_plots(experiment, out)
    if shape is not None and guide is not None and callable(getattr(guide, "scenes", None)):
        scene_plots(experiment, out)
    if guide is None or sites is None or not sites.latents or not x.is_tensor:
        return  # no trained encoder (or its data is more than one tensor)
    if shape is not None:
        pairs = torch.stack([x[:32].primary, reconstruct(experiment.model, guide, x[:32])], 1).reshape(2 * len(x[:32]), -1)
        image_grid(pairs, shape, out / "reconstructions.png", "data | reconstruction", columns=16)
    if len(sites.latents) == 1:
        (name,) = sites.latents
        held_out = x[:2000]
        means = torch.cat([encode(guide, sites, part)[name] for part in held_out.chunks(500)])
        labels = experiment.data.split(split).y
        latent_map(means, None if labels is None else labels[: len(means)], out / "latents.png",
                   f"posterior means of {name}, {len(means)} {split} examples")
    if shape is not None and not sites.discrete:  # a line between two 0/1 draws is no draw
        lines = [interpolate(experiment.model, guide, sites, x.primary[2 * i], x.primary[2 * i + 1], steps=10) for i in range(min(4, len(x) // 2))]
        if lines:
            image_grid(torch.cat(lines), shape, out / "interpolations.png", "decodings along the line between two encodings", columns=10)
        if len(sites.latents) == 1 and len(next(iter(sites.latents.values()))) == 1:
            traversal_plots(experiment, x.primary[:3], shape, out / "traversals.png")


def traversal_plots(experiment: Run, examples: torch.Tensor, shape: tuple[int, int], path: Path, steps: int = 9, dims: int = 16) -> None:
    """Latent traversals (`pyrovae.sampling.traverse`) of a few examples side by side: a row per
    latent coordinate (the first `dims`), `steps` decodings from -2.5 to 2.5 per example."""
    sites = experiment.method.sites
    grids = [traverse(experiment.model, experiment.guide, sites, x, steps, dims=dims) for x in examples]
    gap = torch.zeros(grids[0].shape[0], 1, grids[0].shape[-1])  # a blank column between examples
    rows = torch.cat([part for g in grids for part in (g, gap)][:-1], dim=1)
    image_grid(rows.reshape(-1, rows.shape[-1]), shape, path,
               f"latent traversals: coordinate d of {next(iter(sites.latents))} from -2.5 to 2.5, a row per d", columns=rows.shape[1])
