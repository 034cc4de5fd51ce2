"""A trained run from Python: ``run = pyrovae.load("runs/bmnist")``, then encode, decode, sample,
reconstruct, interpolate and score (Kingma & Welling 2019, sec. 2.1 for the encoder and decoder).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pyrovae.ais import AISSettings, ais
from pyrovae.batch import Batch, Data, as_batch
from pyrovae.errors import PyrovaeError
from pyrovae.evaluate import evaluate
from pyrovae.experiment import Experiment
from pyrovae.experiment import load as load_experiment
from pyrovae.sampling import decode, encode, interpolate, reconstruct, sample

__all__ = ["TrainedRun", "load"]

Latents = torch.Tensor | dict[str, torch.Tensor]


def load(path: str | Path, data_dir: str | None = None, device: str | None = None) -> TrainedRun:
    """The run in directory `path`, rebuilt from its config and checkpoint, in evaluation mode."""
    experiment = load_experiment(path, data_dir, device)
    experiment.train_mode(False)
    return TrainedRun(experiment)


@dataclass
class TrainedRun:
    """A trained model and guide with the operations one uses them for. Latents are one tensor
    (B, *shape) for a model with one latent site, else a dict by site name."""

    experiment: Experiment

    @property
    def model(self) -> Callable:
        return self.experiment.model

    @property
    def guide(self) -> Callable:
        return self.experiment.guide

    def data(self, split: str = "valid", examples: int | None = None) -> torch.Tensor | Batch:
        """The first `examples` of a split of the run's data set, as the model takes them."""
        batch = as_batch(self.experiment.split(split))[:examples]
        return batch.primary if batch.is_tensor else batch

    def encode(self, x: Data, samples: int = 100) -> Latents:
        """The guide's posterior mean of each latent: its distribution's mean where it has one
        (Gaussian guides), else the average of `samples` draws (flows)."""
        self._needs_guide("encode")
        return self._unpack(encode(self.guide, self.experiment.method.sites, x, samples))

    def decode(self, z: Latents, like: Data | None = None) -> torch.Tensor:
        """The mean of p(x | z) for each row of `z`. A model with other arguments (a label, a
        condition) takes them from `like`, default the first rows of the validation split."""
        values = z if isinstance(z, dict) else {self._one_latent(): z}
        return decode(self.model, self.experiment.method.sites, values, like if like is not None else self.data("valid"))

    def sample(self, num: int = 64) -> torch.Tensor:
        """Means of p(x | z) for `num` draws z ~ p(z)."""
        return sample(self.model, self.data("valid", 1), num)

    def reconstruct(self, x: Data) -> torch.Tensor:
        """Means of p(x | z) with z ~ q(z | x)."""
        self._needs_guide("reconstruct")
        return reconstruct(self.model, self.guide, x)

    def interpolate(self, x1: torch.Tensor, x2: torch.Tensor, steps: int = 8) -> torch.Tensor:
        """Decodings of the straight line between the encodings of two examples (steps, *x.shape)."""
        self._needs_guide("interpolate")
        return interpolate(self.model, self.guide, self.experiment.method.sites, x1, x2, steps)

    def log_likelihood(self, x: Data, samples: int = 1000, estimator: str = "is", settings: AISSettings | None = None) -> torch.Tensor:
        """log p(x) per example (nats): importance sampling with the guide, or AIS (any run)."""
        if estimator == "ais":
            return ais(self.model, x, settings=settings or AISSettings(), plate=self.experiment.method.plate).log_likelihood
        if estimator != "is":
            raise PyrovaeError(f"estimator must be 'is' or 'ais', got {estimator!r}")
        self._needs_guide("importance sampling")
        return evaluate(self.model, self.guide, x, num_samples=samples, plate=self.experiment.method.plate).log_likelihood

    def _latents(self) -> list[str]:
        return list(self.experiment.method.sites.latents)

    def _one_latent(self) -> str:
        names = self._latents()
        if len(names) != 1:
            raise PyrovaeError(f"the model has latent sites {', '.join(map(repr, names))}: pass z as a dict by site name")
        return names[0]

    def _unpack(self, values: dict[str, torch.Tensor]) -> Latents:
        return next(iter(values.values())) if len(values) == 1 else values

    def _needs_guide(self, what: str) -> None:
        if self.experiment.amortized_guide is None:
            raise PyrovaeError(f"{what} needs an amortized guide; this run ({self.experiment.config.method}) has none: use estimator='ais' to score it")

    def __repr__(self) -> str:
        config = self.experiment.config
        return f"TrainedRun(model={config.model!r}, guide={config.guide!r}, method={config.method!r}, dataset={config.dataset!r})"
