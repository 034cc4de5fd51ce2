"""Feature unlearning for a pre-trained VAE (Moon, Cho & Kim 2024): the decoder is fine-tuned so
that latents carrying a target feature decode without it, and the others as before, using
only draws from the prior (no training data).

The feature's latent direction is the difference of the mean encodings of a user's positive
and negative examples. A prior draw z carries the feature when its projection on the direction
lies past the midpoint of the two means' projections; its target is the frozen decoder's output
at z moved along the direction to the negatives' projection, and any other draw's target is the
frozen decoder's own output at z. The loss weighs the two kinds of draws equally.

References:
    Moon, Cho & Kim (2024), Feature Unlearning for Pre-trained GANs and VAEs, AAAI, sec. 3
    (the feature's latent representation, and fine-tuning with the shifted latents).
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pyrovae.batch import as_batch
from pyrovae.classifier import train_classifier
from pyrovae.errors import PyrovaeError
from pyrovae.evaluate import evaluate
from pyrovae.experiment import Experiment, load
from pyrovae.files import write_json
from pyrovae.plots import image_grid
from pyrovae.programs import program_modules
from pyrovae.run import RunDir
from pyrovae.sampling import decode_mean, encode, prior_latents
from pyrovae.sites import ModelSites

__all__ = ["Direction", "Feature", "feature", "latent_direction", "unlearn", "unlearn_run"]

THICK_QUANTILE = 0.9  # "thick strokes": the top tenth of mean ink


@dataclass(frozen=True)
class Feature:
    """A target feature of images: its name and a detector, flat images (n, D) -> bool (n,)."""

    name: str
    detect: Callable[[torch.Tensor], torch.Tensor]


def feature(name: str, experiment: Experiment, reference: torch.Tensor) -> Feature:
    """``thick``: an ink share (pixels at or above 1/2: a decoded mean is scored as its most probable
    image) at or above the `reference` images' 90th percentile; ``digit=K``: class
    K for a classifier trained on the run's labelled training split (a measuring device, never
    shown to the unlearning)."""
    if name == "thick":
        ink = lambda x: (x.reshape(len(x), -1) >= 0.5).float().mean(1)  # noqa: E731
        level = torch.quantile(ink(reference), THICK_QUANTILE).item()
        return Feature(f"thick strokes (ink share >= {level:.4f}, the top tenth)", lambda x: ink(x) >= level)
    if name.startswith("digit="):
        try:
            k = int(name.split("=", 1)[1])
        except ValueError:
            k = -1
        labels = experiment.data.split("train").y
        if labels is None or not bool((labels >= 0).any()):
            raise PyrovaeError(f"--feature {name} needs labels to train a classifier of digits; data set {experiment.data.name!r} has none: use --feature thick")
        if not 0 <= k <= int(labels.max()):
            raise PyrovaeError(f"--feature digit=K needs K in 0..{int(labels.max())}, got {name!r}")
        x = as_batch(experiment.split("train")).primary.cpu()
        classifier = train_classifier(x, labels.cpu(), seed=experiment.config.seed)
        return Feature(f"digit {k} (a project-trained MLP classifier)", lambda images: classifier.predict(images.reshape(len(images), -1).cpu().float()) == k)
    raise PyrovaeError(f"unknown --feature {name!r}: choose thick or digit=K")


@dataclass(frozen=True)
class Direction:
    """A feature's latent direction: the unit vector from the negatives' mean encoding to the
    positives', the negatives' projection on it, and the midpoint that tells draws apart."""

    vector: torch.Tensor
    negative: float
    threshold: float

    def carries(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.vector > self.threshold

    def shifted(self, z: torch.Tensor) -> torch.Tensor:
        """`z` moved along the direction to the negatives' projection where it carries the feature."""
        excess = (z @ self.vector - self.negative) * self.carries(z)
        return z - excess[:, None] * self.vector


def latent_direction(positive: torch.Tensor, negative: torch.Tensor) -> Direction:
    """The `Direction` of the mean encodings ``(n, D)`` of positive and negative examples."""
    if len(positive) < 2 or len(negative) < 2:
        raise PyrovaeError(f"the feature's direction needs at least 2 positive and 2 negative examples, got {len(positive)} and {len(negative)}")
    difference = positive.mean(0) - negative.mean(0)
    if not bool(difference.norm() > 0):
        raise PyrovaeError("the positive and negative examples have the same mean encoding: the feature has no latent direction")
    vector = difference / difference.norm()
    low, high = (negative.mean(0) @ vector).item(), (positive.mean(0) @ vector).item()
    return Direction(vector, low, (low + high) / 2)


def _one_flat_latent(sites: ModelSites) -> str:
    if len(sites.latents) != 1 or len(next(iter(sites.latents.values()))) != 1 or sites.discrete:
        raise PyrovaeError(f"unlearning moves one flat, continuous latent site along a direction; this model has {sites.describe()}")
    return next(iter(sites.latents))


def unlearn(model: Callable, sites: ModelSites, direction: Direction, like: Any, steps: int = 1000, batch_size: int = 100,
            lr: float = 1e-4, seed: int = 0) -> list[float]:
    """Fine-tune `model`'s parameters in place (a frozen copy gives the targets); the losses:
    mean squared differences of the decoded means, the two kinds of draws weighed equally."""
    name = _one_flat_latent(sites)
    modules = [m for m in program_modules(model) if any(True for _ in m.parameters())]
    parameters = list({id(p): p for m in modules for p in m.parameters()}.values())
    if not parameters:
        raise PyrovaeError("unlearning fine-tunes the decoder's module parameters; this model has none")
    frozen = copy.deepcopy(model)
    for module in program_modules(frozen):
        module.requires_grad_(False)
    optimizer = torch.optim.Adam(parameters, lr=lr)
    losses = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in range(steps):
            z = prior_latents(model, sites, like, batch_size)[name]
            carries = direction.carries(z)
            with torch.no_grad():
                target = decode_mean(frozen, sites, {name: direction.shifted(z)}, like)
            error = (decode_mean(model, sites, {name: z}, like) - target).pow(2).reshape(batch_size, -1).mean(1)
            kinds = [error[mask].mean() for mask in (carries, ~carries) if bool(mask.any())]
            loss = torch.stack(kinds).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses


@torch.no_grad()
def _report(before: Callable, after: Callable, guide: Callable, sites: ModelSites, target: Feature, direction: Direction,
            held_out: torch.Tensor, like: Any, samples: int, is_samples: int, seed: int) -> dict[str, Any]:
    name = _one_flat_latent(sites)
    torch.manual_seed(seed)
    z = torch.cat([prior_latents(before, sites, like, 500)[name] for _ in range(-(-samples // 500))])[:samples]
    decoded = {k: torch.cat([decode_mean(m, sites, {name: part}, like) for part in z.split(500)]) for k, m in (("before", before), ("after", after))}
    free = ~direction.carries(z)
    present = target.detect(held_out)
    report: dict[str, Any] = {"feature": target.name, "samples": samples}
    for k, images in decoded.items():
        report[f"feature_rate_{k}"] = target.detect(images).float().mean().item()
    report["mean_abs_change_feature_free_draws"] = (decoded["after"] - decoded["before"])[free].abs().mean().item()
    report["mean_abs_change_feature_draws"] = (decoded["after"] - decoded["before"])[~free].abs().mean().item() if bool((~free).any()) else None
    report["draws_carrying_the_direction"] = (~free).float().mean().item()
    free_x = held_out[~present][:500]
    codes = encode(guide, sites, free_x)[name]
    change = decode_mean(after, sites, {name: codes}, like) - decode_mean(before, sites, {name: codes}, like)
    report["mean_abs_change_feature_free_reconstructions"] = change.abs().mean().item()
    for part, mask in (("without", ~present), ("with", present)):
        x = held_out[mask]
        report[f"held_out_{part}_feature"] = len(x)
        for k, model in (("before", before), ("after", after)):
            report[f"log_likelihood_{part}_feature_{k}"] = (
                evaluate(model, guide, list(x.split(500)), num_samples=is_samples).log_likelihood.mean().item() if len(x) else None)
    report["_images"] = (decoded["before"][:64], decoded["after"][:64])
    return report


def unlearn_run(path: str | Path, feature_name: str, out: str | Path, steps: int = 1000, lr: float = 1e-4, batch_size: int = 100,
                examples: int = 1000, samples: int = 2000, is_samples: int = 100, seed: int = 0, data_dir: str | None = None) -> dict[str, Any]:
    """Unlearn `feature_name` from the decoder of the run in `path` and write the result as a new
    run directory `out`: its config, the checkpoint with the fine-tuned decoder (the guide and
    the rest as they were), ``unlearning.json`` (feature rate in samples, held-out log p(x)
    with and without the feature, before and after) and sample grids before and after. The
    user's examples are the first `examples` of the run's valid split."""
    source, target_dir = RunDir(path), Path(out)
    if target_dir.exists():
        raise PyrovaeError(f"{target_dir} exists: choose another --out (unlearning writes a new run directory)")
    for option, value, low in (("--steps", steps, 1), ("--batch-size", batch_size, 2), ("--examples", examples, 10), ("--samples", samples, 10),
                               ("--is-samples", is_samples, 1)):
        if value < low:
            raise PyrovaeError(f"{option} must be at least {low}, got {value}")
    if not (0 < lr <= 1):
        raise PyrovaeError(f"--lr must be in (0, 1], got {lr}")
    experiment = load(path, data_dir)
    if experiment.amortized_guide is None or experiment.method.sites is None:
        raise PyrovaeError("unlearning finds the feature's direction with the run's encoder; this run trained none")
    if experiment.data.image_shape is None or experiment.config.fields != "x":
        raise PyrovaeError("unlearning is for unconditional models of images (one data field, x)")
    sites = experiment.method.sites
    experiment.train_mode(False)
    held_out = as_batch(experiment.split("valid")).primary[:examples]
    target = feature(feature_name, experiment, held_out)
    present = target.detect(held_out)
    if int(present.sum()) < 2 or int((~present).sum()) < 2:
        raise PyrovaeError(f"the {len(held_out)} examples hold {int(present.sum())} with the feature and {int((~present).sum())} without: need 2 of each")
    name = _one_flat_latent(sites)
    codes = encode(experiment.guide, sites, held_out)[name]
    direction = latent_direction(codes[present], codes[~present])
    original = copy.deepcopy(experiment.model)
    start = time.perf_counter()
    losses = unlearn(experiment.model, sites, direction, held_out[:1], steps, batch_size, lr, seed)
    seconds = time.perf_counter() - start
    for module in program_modules(experiment.model):
        module.eval()
    report = _report(original, experiment.model, experiment.guide, sites, target, direction, held_out, held_out[:1], samples, is_samples, seed)
    before, after = report.pop("_images")
    result = {"run": str(path), "settings": {"feature": feature_name, "steps": steps, "lr": lr, "batch_size": batch_size, "examples": len(held_out),
              "seed": seed}, **report, "loss_first": losses[0], "loss_last": losses[-1], "unlearn_seconds": seconds}
    checkpoint = source.load_checkpoint()
    checkpoint["method"] = experiment.method.state_dict()
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target_dir.name}.", suffix=".partial", dir=target_dir.parent))
    try:  # the new run appears whole or not at all
        run = RunDir(staging)
        run.save_config({k: v for k, v in source.config().items() if k != "format"})
        run.save_checkpoint(checkpoint)
        write_json(staging / "unlearning.json", result)
        shape = experiment.data.image_shape
        image_grid(before, shape, staging / "samples-before.png", "samples before unlearning")
        image_grid(after, shape, staging / "samples-after.png", f"the same draws after unlearning {feature_name}")
        os.rename(staging, target_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result

