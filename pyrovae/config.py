"""A run's settings (`Config`, saved as its config.json) and their checks; no torch here, so
that the command line can show its defaults and refuse bad values before loading anything."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyrovae
from pyrovae.errors import PyrovaeError

__all__ = ["Config", "check_number", "check_types", "is_integer", "is_number"]

SCHEDULES = ("constant", "burda")  # `pyrovae.schedules` (torch-free here)
SEEDS = 2**32  # numpy's seeds are 0 .. 2**32 - 1
MAX_LR = 1.0  # Adam's step size: above 1 every model here diverges (an --lr 1e6 run "finished" with an ELBO of -3e16)


def is_integer(value: Any) -> bool:
    """An int that is not a bool (JSON's and pickle's integers)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_number(owner: str, option: str, value: Any, positive: bool = True) -> float:
    """`value` as a float, refused in one line (``OWNER option OPTION must be ...``) unless a
    finite number > 0 (or >= 0 where not `positive`)."""
    if not is_number(value) or not math.isfinite(value) or (value <= 0 if positive else value < 0):
        raise PyrovaeError(f"{owner} option {option} must be a {'positive number' if positive else 'number >= 0'}, got {value!r}")
    return float(value)


@dataclass
class Config:
    """Everything needed to rebuild a run; saved as the run's config.json."""

    model: str = "vae"
    guide: str = "diagonal"
    method: str = "amortized"
    objective: str = "elbo"
    objective_options: dict[str, Any] = field(default_factory=dict)
    dataset: str = "digits"
    dataset_options: dict[str, Any] = field(default_factory=dict)
    data_dir: str | None = None
    likelihood: str | None = None
    latent: int = 50
    hidden: tuple[int, ...] = (200, 200)
    activation: str = "tanh"
    layers: int | None = None
    prior: str = "standard"
    decoder: str = "mlp"
    free_bits: float = 0.0
    model_options: dict[str, Any] = field(default_factory=dict)
    guide_options: dict[str, Any] = field(default_factory=dict)
    method_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 50
    batch_size: int = 100
    labelled_per_batch: int = 0  # > 0: that many labelled examples in every minibatch, the rest unlabelled (M2's training)
    lr: float = 1e-3
    schedule: str = "constant"  # the learning rate over epochs (`pyrovae.schedules`): constant, or burda
    particles: int = 1
    warmup: float = 0.0
    warmup_from: float = 0.0  # the latent sites' weight (a fraction of beta) at the first step; Pyro's dmm.py starts at 0.2
    beta: float = 1.0  # the latent sites' final weight: beta-VAE's beta (Higgins et al. 2017); warm-up ramps warmup_from * beta -> beta
    patience: int | None = None
    seed: int = 0
    eval_samples: int = 1000
    device: str = "cpu"
    capture: bool = True
    features: str | None = None  # a trained run whose encoder's posterior replaces x (M1+M2: M2 on M1's latents)
    fields: str = "x"  # the data's fields a model takes, in order: x, y, lengths, mask
    collate: str | None = None  # FILE.py:NAME of collate(args, kwargs) -> (args, kwargs), run on every batch
    unlabelled: str = "label"  # how an unlabelled example reaches the program: "label" (-1, pyrovae's m2), "omit" (called without y: Pyro's model(xs, ys=None))
    plate: str | None = None  # the model's per-example plate (None: "data", else found by size)
    logs: str = "csv,tensorboard"  # live metrics written per epoch (`pyrovae.logs`); tensorboard where its package is installed

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "hidden": list(self.hidden), "pyrovae": pyrovae.__version__}

    def check(self) -> None:
        """Refuse, in one line naming the flag, a setting of the wrong type or out of range."""
        check_types({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        bounds = [
            (self.epochs >= 0, f"--epochs must be >= 0, got {self.epochs}"),
            (math.isfinite(self.lr) and 0 < self.lr <= MAX_LR, f"--lr must be a number in (0, {MAX_LR:g}] (Adam's step size), got {self.lr}"),
            (self.batch_size >= 1, f"--batch-size must be positive, got {self.batch_size}"),
            (is_integer(self.labelled_per_batch) and 0 <= self.labelled_per_batch < max(self.batch_size, 1),
             f"--labelled-per-batch must be in 0..{self.batch_size - 1} (less than --batch-size), got {self.labelled_per_batch}"),
            (self.unlabelled in UNLABELLED_CALLS, f"unknown --unlabelled {self.unlabelled!r}: choose from {', '.join(UNLABELLED_CALLS)}"),
            (self.unlabelled == "label" or "y" in self.fields.split(","), "--unlabelled omit leaves the labels out of unlabelled examples: it needs --fields x,y"),
            (self.schedule in SCHEDULES, f"unknown --schedule {self.schedule!r}: choose from {', '.join(SCHEDULES)}"),
            (self.particles >= 1, f"--particles must be at least 1, got {self.particles}"),
            (self.eval_samples >= 0, f"--eval-samples must be >= 0, got {self.eval_samples}"),
            (math.isfinite(self.warmup) and self.warmup >= 0, f"--warmup must be >= 0 epochs, got {self.warmup}"),
            (math.isfinite(self.warmup_from) and 0 <= self.warmup_from <= 1, f"--warmup-from must be in [0, 1] (a fraction of --beta), got {self.warmup_from}"),
            (math.isfinite(self.beta) and self.beta > 0, f"--beta must be a positive number, got {self.beta}"),
            (self.patience is None or self.patience >= 1, f"--patience must be at least 1 epoch, got {self.patience}"),
            (0 <= self.seed < SEEDS, f"--seed must be in 0 .. {SEEDS - 1}, got {self.seed}"),
            (math.isfinite(self.free_bits) and self.free_bits >= 0, f"--free-bits must be >= 0, got {self.free_bits}"),
            (self.latent >= 1, f"--latent must be positive, got {self.latent}"),
        ]
        for holds, message in bounds:
            if not holds:
                raise PyrovaeError(message)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> Config:
        """A config from a saved run's settings: every field present, each of its annotated type."""
        names = [f.name for f in dataclasses.fields(cls)]
        data = {**ADDED_LATER, **data}
        unknown = [k for k in data if k not in names and k not in SAVED_EXTRAS]
        missing = [k for k in names if k not in data]
        if unknown or missing:
            what = f'unknown setting "{unknown[0]}"' if unknown else f'"{missing[0]}" is missing (a run saves every setting)'
            raise PyrovaeError(f"{source}: {what}: retrain the run, or restore its config.json")
        settings = {k: data[k] for k in names}
        check_types(settings, source)
        return cls(**{**settings, "hidden": tuple(settings["hidden"])})


UNLABELLED_CALLS = ("label", "omit")
SAVED_EXTRAS = ("format", "pyrovae")  # written beside the settings in config.json
ADDED_LATER: dict[str, Any] = {"fields": "x", "plate": None, "collate": None, "logs": "csv,tensorboard", "labelled_per_batch": 0, "beta": 1.0, "objective_options": {},
                               "schedule": "constant", "features": None, "warmup_from": 0.0,
                               "unlabelled": "label"}  # settings runs saved before they existed take as their default


def _kind(hint: Any) -> tuple[Callable[[Any], bool], str]:
    """(accepts, description) for a Config annotation: str, int, float, bool, tuple[int, ...], dict, X | None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        accepts, text = _kind(inner)
        return (lambda v: v is None or accepts(v)), f"{text} or null"
    if typing.get_origin(hint) is tuple:
        return (lambda v: isinstance(v, (list, tuple)) and all(is_integer(s) and s > 0 for s in v)), "a list of positive integers"
    if hint is dict or typing.get_origin(hint) is dict:
        return (lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v)), "an object of named options"
    kinds: dict[Any, tuple[Callable[[Any], bool], str]] = {
        str: (lambda v: isinstance(v, str), "a string"),
        bool: (lambda v: isinstance(v, bool), "true or false"),
        int: (is_integer, "an integer"),
        float: (is_number, "a number"),
    }
    return kinds[hint]


def check_types(settings: dict[str, Any], source: str = "config") -> None:
    """Refuse, in one line, a setting that is not of the type its Config field is annotated with."""
    hints = typing.get_type_hints(Config)
    for name, value in settings.items():
        accepts, text = _kind(hints[name])
        if not accepts(value):
            raise PyrovaeError(f'{source}: "{name}" must be {text}, got {json.dumps(value, default=repr)}')
